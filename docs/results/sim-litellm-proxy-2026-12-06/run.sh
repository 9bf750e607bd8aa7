#!/bin/sh
# The run of docs/results/sim-litellm-proxy-2026-12-06, in a folder holding this folder's files.
# Q: the qtrap checkout; PY: its Python (with Q on PYTHONPATH); LL: LiteLLM's own venv.
set -e
Q=${Q:-/work/wt-litellm}; PY=${PY:-/work/main/.venv/bin/python}; LL=${LL:-/work/litellm-venv}
export PYTHONPATH=$Q LITELLM_LOCAL_MODEL_COST_MAP=True
mkdir -p out
$PY -m qtrap_sim --config sim.yaml > sim.log 2>&1 & SIM=$!
sleep 4
$PY -m qtrap_proxy serve --config proxy.yaml --log-level warning > proxy.log 2>&1 & PROXY=$!
$PY header_tap.py http://127.0.0.1:18080 18090 > tap.log 2>&1 & TAP=$!
sleep 5
date -u +%Y-%m-%dT%H:%M:%SZ > out/since.txt
for cfg in default forward groups; do
  case $cfg in default) f=litellm.yaml;; forward) f=litellm-forward.yaml;; groups) f=litellm-groups.yaml;; esac
  $LL/bin/litellm --config $f --host 127.0.0.1 --port 14000 > out/litellm-$cfg.log 2>&1 & LITELLM=$!
  until curl -sf 127.0.0.1:14000/health/liveliness > /dev/null; do sleep 2; done
  $PY probe.py http://127.0.0.1:14000 http://127.0.0.1:18080 $cfg > out/probe-$cfg.json
  sh curl.sh http://127.0.0.1:14000 $cfg > out/curl-$cfg.txt
  sleep 3   # the curl requests' records settle
  for i in 1 2; do
    curl -s "127.0.0.1:18080/qtrap/v1/requests?client_request_id=$cfg-curl-$i" | jq -c '[.data[] | {id, client_request_id, final, energy_j, stream}]'
  done > out/curl-$cfg-records.txt
  mv upstream-headers.jsonl out/upstream-headers-$cfg.jsonl
  kill $LITELLM; wait $LITELLM || true
done
date -u +%Y-%m-%dT%H:%M:%SZ > out/until.txt
curl -s "127.0.0.1:18080/qtrap/v1/usage?since=$(cat out/since.txt)&until=$(cat out/until.txt)&group_by=precision" > out/usage.json
$PY -m qtrap_proxy records export --ledger ledger.sqlite --out out/records.jsonl
kill $TAP $PROXY $SIM
wait
