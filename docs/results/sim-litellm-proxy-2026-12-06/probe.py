"""Requests through the LiteLLM proxy with the openai SDK; prints what reached the client, trimmed, as JSON.

usage: probe.py LITELLM_URL QTRAP_URL LABEL > probe-LABEL.json
"""

import json
import sys
import time

import httpx
from openai import OpenAI

litellm_url, qtrap_url, label = sys.argv[1:4]
client = OpenAI(base_url=litellm_url + "/v1", api_key="sk-litellm-local")
msgs = [{"role": "user", "content": "hi"}]
out: dict = {"litellm": litellm_url, "label": label, "requests": []}


def keep(headers) -> dict:
    return {k: v for k, v in headers.items() if "qtrap" in k or "request-id" in k or k == "x-litellm-call-id"}


def qtrap_id(headers) -> str | None:
    return headers.get("llm_provider-x-qtrap-request-id")


# 1. non-streaming, with a client X-Request-Id
raw = client.chat.completions.with_raw_response.create(
    model="qwen3-8b", messages=msgs, max_tokens=50, extra_headers={"X-Request-Id": f"{label}-sdk-1"}
)
resp = raw.parse()
out["requests"].append(
    {
        "what": "sdk non-streaming, model qwen3-8b, X-Request-Id sent",
        "sent_x_request_id": f"{label}-sdk-1",
        "headers": keep(raw.headers),
        "id": resp.id,
        "usage": resp.usage.model_dump(),
        "usage.model_extra": resp.usage.model_extra,
        "qtrap_id": qtrap_id(raw.headers),
    }
)

# 2. streaming with include_usage
raw = client.chat.completions.with_raw_response.create(
    model="qwen3-8b",
    messages=msgs,
    max_tokens=50,
    stream=True,
    stream_options={"include_usage": True},
    extra_headers={"X-Request-Id": f"{label}-sdk-2"},
)
last = None
n = 0
for chunk in raw.parse():
    n += 1
    if chunk.usage is not None:
        last = chunk
out["requests"].append(
    {
        "what": "sdk streaming, include_usage, X-Request-Id sent",
        "sent_x_request_id": f"{label}-sdk-2",
        "headers": keep(raw.headers),
        "chunks": n,
        "usage_chunk": {
            "id": last.id,
            "choices": [c.model_dump(exclude_none=True) for c in last.choices],
            "usage": last.usage.model_dump(),
            "usage.model_extra": last.usage.model_extra,
        },
        "qtrap_id": qtrap_id(raw.headers),
    }
)

# 3. a pinned precision (model entry openai/qwen3-8b@int4)
raw = client.chat.completions.with_raw_response.create(
    model="qwen3-8b-int4", messages=msgs, max_tokens=50, extra_headers={"X-Request-Id": f"{label}-sdk-3"}
)
resp = raw.parse()
out["requests"].append(
    {
        "what": "sdk non-streaming, model qwen3-8b-int4 (openai/qwen3-8b@int4), X-Request-Id sent",
        "sent_x_request_id": f"{label}-sdk-3",
        "headers": keep(raw.headers),
        "usage.model_extra": resp.usage.model_extra,
        "qtrap_id": qtrap_id(raw.headers),
    }
)

# 4. x-qtrap-precision and x-qtrap-chain-id from the client, through the header tap
raw = client.chat.completions.with_raw_response.create(
    model="qwen3-8b-tap",
    messages=msgs,
    max_tokens=50,
    extra_headers={
        "X-Request-Id": f"{label}-tap-1",
        "x-qtrap-precision": "int4",
        "x-qtrap-chain-id": f"{label}-chain",
    },
)
resp = raw.parse()
out["requests"].append(
    {
        "what": "sdk non-streaming via the tap, X-Request-Id, x-qtrap-precision: int4, x-qtrap-chain-id sent",
        "sent_x_request_id": f"{label}-tap-1",
        "headers": keep(raw.headers),
        "usage.model_extra": resp.usage.model_extra,
        "qtrap_id": qtrap_id(raw.headers),
    }
)

time.sleep(3)  # past meter.settle_s: the records are final
with httpx.Client(base_url=qtrap_url) as q:
    for r in out["requests"]:
        rec = q.get(f"/qtrap/v1/requests/{r['qtrap_id']}").json()
        r["record"] = {
            k: rec.get(k)
            for k in ("id", "final", "energy_j", "precision", "stream", "client_request_id", "chain_id")
        }
        if r.get("sent_x_request_id"):
            found = q.get("/qtrap/v1/requests", params={"client_request_id": r["sent_x_request_id"]}).json()
            r["found_by_client_request_id"] = [d["id"] for d in found["data"]]
json.dump(out, sys.stdout, indent=1)
print()
