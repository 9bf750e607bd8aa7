#!/bin/sh
# curl through the LiteLLM proxy: a non-streaming and a streaming request; prints the qtrap headers and usage.
# usage: curl.sh LITELLM_URL LABEL
L=$1; label=$2
echo "## curl non-streaming (X-Request-Id: $label-curl-1)"
curl -s -D - -o body.json "$L/v1/chat/completions" -H 'content-type: application/json' \
  -H 'Authorization: Bearer sk-litellm-local' -H "X-Request-Id: $label-curl-1" \
  -d '{"model": "qwen3-8b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}' \
  | grep -i -e qtrap -e request-id -e x-litellm-call-id
jq -c '.usage' body.json
echo "## curl streaming, include_usage (X-Request-Id: $label-curl-2)"
curl -sN -D headers.txt "$L/v1/chat/completions" -H 'content-type: application/json' \
  -H 'Authorization: Bearer sk-litellm-local' -H "X-Request-Id: $label-curl-2" \
  -d '{"model": "qwen3-8b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50,
       "stream": true, "stream_options": {"include_usage": true}}' > stream.txt
grep -i -e qtrap -e request-id -e x-litellm-call-id headers.txt
grep -c '^data: ' stream.txt
grep '"usage"' stream.txt
tail -n 2 stream.txt
rm -f body.json headers.txt stream.txt
