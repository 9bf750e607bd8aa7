"""The OpenAI surface beyond chat: model entries (`root`, `GET /v1/models/{id}`), embeddings with their
energy and record, vLLM's /tokenize and /detokenize passed through, and the split health probes; a real
proxy (DCGM meter) in front of two simulated vLLM backends (pool `q8`, upstream model id `qwen3-8b`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import requests

from qtrap_proxy.energy import reasons
from tests.helpers import backend, free_port, proxy, sim, wait_meter


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("surface")
    p16, p4 = free_port(), free_port()
    common = ["--model", "qwen3-8b", "--step-ms", "2"]
    with (
        sim(p16, *common, "--precision", "bf16"),
        sim(p4, *common, "--precision", "int4", "--gpu-index", "1"),
    ):
        cfg: dict[str, Any] = {
            "backends": [
                backend("sim-bf16", p16, "bf16", pool="q8", devices=[{"host": "qtrap-sim", "index": 0}]),
                backend("sim-int4", p4, "int4", pool="q8", devices=[{"host": "qtrap-sim", "index": 1}]),
            ],
            "pools": {"q8": {"default_precision": "bf16"}},
            "meter": {
                "kind": "dcgm",
                "urls": [f"http://127.0.0.1:{p}/dcgm/metrics" for p in (p16, p4)],
                "settle_s": 0.3,
            },
        }
        with proxy(tmp, cfg):
            u = f"http://127.0.0.1:{cfg['server']['port']}"
            wait_meter(u)
            yield u


def test_model_entries_name_the_upstream_model(url: str) -> None:
    data = {m["id"]: m for m in requests.get(url + "/v1/models", timeout=5).json()["data"]}
    assert set(data) == {"q8", "q8@bf16", "q8@int4"}
    assert data["q8"]["root"] == "qwen3-8b" and data["q8"]["parent"] is None
    assert data["q8@int4"]["root"] == "qwen3-8b" and data["q8@int4"]["parent"] == "q8"
    with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
        m = client.models.retrieve("q8@int4")
        assert m.id == "q8@int4" and m.model_extra is not None
        assert m.model_extra["root"] == "qwen3-8b" and m.model_extra["parent"] == "q8"
        with pytest.raises(openai.NotFoundError) as ei:
            client.models.retrieve("llama-70b")
        assert ei.value.code == "model_not_found"


def test_embeddings_are_relayed_accounted_and_carry_energy(url: str) -> None:
    with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
        raw = client.embeddings.with_raw_response.create(
            model="q8@int4", input=["one two three", "four five"], dimensions=8
        )
    resp = raw.parse()
    assert [d.index for d in resp.data] == [0, 1] and all(len(d.embedding) == 8 for d in resp.data)
    assert resp.data[0].embedding != resp.data[1].embedding
    assert resp.usage.prompt_tokens == 5
    assert raw.headers["x-qtrap-precision"] == "int4" and raw.headers["x-qtrap-backend"] == "sim-int4"
    extra = resp.usage.model_extra or {}
    assert extra["qtrap"]["request_id"] == raw.headers["x-qtrap-request-id"]
    rid = extra["qtrap"]["request_id"]
    deadline = time.monotonic() + 20
    while True:
        rec = requests.get(f"{url}/qtrap/v1/requests/{rid}", timeout=5).json()
        if rec["final"]:
            break
        assert time.monotonic() < deadline, rec
        time.sleep(0.1)
    assert rec["route"] == "embeddings" and rec["status"] == "ok" and not rec["stream"]
    assert rec["prompt_tokens"] == 5 and rec["completion_tokens"] == 0
    assert rec["energy_j"] is not None and rec["energy_j"] > 0, rec
    metrics = requests.get(url + "/metrics", timeout=5).text
    assert 'qtrap_tokens_total{backend="sim-int4",kind="prompt",pool="q8",precision="int4"} 5.0' in metrics


def test_embeddings_errors(url: str) -> None:
    r = requests.post(url + "/v1/embeddings", json={"model": "q8"}, timeout=5)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    r = requests.post(url + "/v1/embeddings", json={"model": "nope", "input": "x"}, timeout=5)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = requests.post(
        url + "/v1/embeddings",
        json={"model": "q8", "input": "x"},
        headers={"x-qtrap-hop-split": "lines"},
        timeout=5,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "x-qtrap-hop-split"


def test_tokenize_and_detokenize_pass_through(url: str) -> None:
    r = requests.post(url + "/tokenize", json={"model": "q8@int4", "prompt": "the year zebra"}, timeout=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == 3 and len(body["tokens"]) == 3 and body["max_model_len"] > 0
    assert r.headers["x-qtrap-backend"] == "sim-int4"
    back = requests.post(url + "/detokenize", json={"model": "q8@int4", "tokens": body["tokens"]}, timeout=5)
    assert back.status_code == 200 and back.json() == {"prompt": "the year zebra"}
    # the only pool: model may be left out, as vLLM allows
    r = requests.post(url + "/tokenize", json={"prompt": "a b"}, timeout=5)
    assert r.status_code == 200 and r.json()["count"] == 2
    # not GPU work: no record, so no request id either
    assert "x-qtrap-request-id" not in r.headers and r.headers["x-qtrap-precision"] == "bf16"
    # the backend's own 400 passes through; an unknown model is the proxy's 404
    r = requests.post(url + "/detokenize", json={"model": "q8", "tokens": "x"}, timeout=5)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    r = requests.post(url + "/tokenize", json={"model": "nope", "prompt": "x"}, timeout=5)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_health_live_and_ready(url: str) -> None:
    live = requests.get(url + "/health/live", timeout=5)
    assert live.status_code == 200 and live.json() == {"status": "ok"}
    ready = requests.get(url + "/health/ready", timeout=5)
    assert ready.status_code == 200, ready.text
    assert ready.json() == {
        "status": "ready",
        "reasons": [],
        "pools": {"q8": True},
        "ledger": "ok",
    }
    assert requests.get(url + "/health", timeout=5).json()["status"] == "ok"


def test_ready_fails_without_a_backend_while_live_holds(tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp = tmp_path_factory.mktemp("not-ready")
    dead = free_port()
    cfg: dict[str, Any] = {"backends": [backend("gone", dead, "bf16")]}
    with proxy(tmp, cfg):
        u = f"http://127.0.0.1:{cfg['server']['port']}"
        assert requests.get(u + "/health/live", timeout=5).status_code == 200
        r = requests.get(u + "/health/ready", timeout=10)
        assert r.status_code == 503
        body = r.json()
        assert body["status"] == "not_ready" and body["pools"] == {"qwen3-8b": False}
        assert body["reasons"] == ["pool qwen3-8b: no backend passed its health probe"]


def test_responses_api_non_streaming_and_streamed(url: str) -> None:
    with openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
        raw = client.responses.with_raw_response.create(
            model="q8@int4", input="say something", max_output_tokens=9
        )
        resp = raw.parse()
        assert resp.status == "completed" and len(resp.output_text.split()) == 9
        assert resp.usage is not None and resp.usage.output_tokens == 9
        extra = resp.usage.model_extra or {}
        assert extra["qtrap"]["request_id"] == raw.headers["x-qtrap-request-id"]
        assert extra["qtrap"]["precision"] == "int4"
        events = list(client.responses.create(model="q8", input="say more", max_output_tokens=7, stream=True))
    assert [e.type for e in events][-1] == "response.completed"
    assert sum(1 for e in events if e.type == "response.output_text.delta") == 7
    done = events[-1].response  # type: ignore[union-attr]
    assert done.usage is not None and done.usage.output_tokens == 7
    usage_extra = done.usage.model_extra or {}
    q = usage_extra["qtrap"]
    assert q["precision"] == "bf16" and q["provisional"] is True
    # measured: a figure, or (a device the meter has not yet seen busy) null and why, never 0
    assert (usage_extra["energy_j"] or 0) > 0 or q["energy_unknown_reason"] == reasons.NOT_MEASURED_YET
    deadline = time.monotonic() + 20
    while True:
        rec = requests.get(f"{url}{q['record_url']}", timeout=5).json()
        if rec["final"]:
            break
        assert time.monotonic() < deadline, rec
        time.sleep(0.1)
    assert rec["route"] == "responses" and rec["stream"] and rec["status"] == "ok"
    assert rec["completion_tokens"] == 7 and sum(rec["timeline"]["tokens"]) == 7
    assert rec["energy_j"] is not None and rec["energy_j"] > 0
