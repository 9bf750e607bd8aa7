"""The official openai SDK against the proxy in front of qtrap_sim backends."""

from __future__ import annotations

import openai
import pytest
import requests

from tests.conftest import Fleet


def _client(fleet: Fleet, **kw: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=fleet.v1, api_key="unused", max_retries=0, **kw)  # type: ignore[arg-type]


def test_chat_non_streaming(fleet: Fleet) -> None:
    raw = _client(fleet).chat.completions.with_raw_response.create(
        model="qwen3-8b",
        messages=[{"role": "user", "content": "two plus two"}],
        max_tokens=7,
        seed=3,
        temperature=0,
    )
    resp = raw.parse()
    assert resp.choices[0].message.content and resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 7
    assert raw.headers["x-qtrap-precision"] == "bf16" and raw.headers["x-qtrap-backend"] == "sim-bf16"
    rid = raw.headers["x-qtrap-request-id"]
    rec = requests.get(f"{fleet.proxy_url}/qtrap/v1/requests/{rid}", timeout=5).json()
    assert (
        rec["status"] == "ok"
        and rec["completion_tokens"] == 7
        and rec["prompt_tokens"] == resp.usage.prompt_tokens
    )
    assert rec["energy_j"] is None and rec["energy_null_reason"]


def test_chat_streaming_with_and_without_usage(fleet: Fleet) -> None:
    client = _client(fleet)
    chunks = list(
        client.chat.completions.create(
            model="qwen3-8b@int4", messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True
        )
    )
    assert all(c.usage is None for c in chunks), "usage injected by the proxy must not leak to the client"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 6

    chunks = list(
        client.chat.completions.create(
            model="qwen3-8b",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"x-qtrap-precision": "int4"},
        )
    )
    with_usage = [c for c in chunks if c.usage is not None]
    assert len(with_usage) == 1 and not with_usage[0].choices
    assert with_usage[0].usage is not None and with_usage[0].usage.completion_tokens == 6


def test_stream_records_token_timeline(fleet: Fleet) -> None:
    with _client(fleet).chat.completions.with_streaming_response.create(
        model="qwen3-8b",
        messages=[{"role": "user", "content": "count"}],
        max_tokens=12,
        stream=True,
        extra_headers={"x-qtrap-chain-id": "chain-1", "x-qtrap-hop": "2"},
    ) as resp:
        rid = resp.headers["x-qtrap-request-id"]
        assert sum(1 for c in resp.parse() if c.choices) >= 12
    rec = requests.get(f"{fleet.proxy_url}/qtrap/v1/requests/{rid}", timeout=5).json()
    assert rec["chain_id"] == "chain-1" and rec["hop"] == 2
    assert rec["completion_tokens"] == 12 and sum(rec["timeline"]["tokens"]) == 12 and rec["tokens_exact"]
    t = rec["timeline"]["t_s"]
    assert t == sorted(t) and rec["ttft_s"] == pytest.approx(t[0], abs=1e-5) and rec["e2e_s"] >= t[-1]


def test_completions_both_modes(fleet: Fleet) -> None:
    client = _client(fleet)
    r = client.completions.create(model="qwen3-8b", prompt="once upon", max_tokens=4)
    assert r.usage is not None and r.usage.completion_tokens == 4 and r.choices[0].text
    chunks = list(client.completions.create(model="qwen3-8b@int4", prompt="once", max_tokens=4, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices).count(" ") == 4


def test_models_lists_pools_and_pins(fleet: Fleet) -> None:
    ids = {m.id for m in _client(fleet).models.list()}
    assert ids == {"qwen3-8b", "qwen3-8b@bf16", "qwen3-8b@int4", "qwen3-8b@int8"}


def test_errors_surface_as_sdk_exceptions(fleet: Fleet) -> None:
    client = _client(fleet)
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.NotFoundError) as ei:
        client.chat.completions.create(model="llama-70b", messages=msgs)  # type: ignore[arg-type]
    assert ei.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="qwen3-8b@fp8", messages=msgs)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="qwen3-8b", messages=[])
    with pytest.raises(openai.BadRequestError, match="pinned twice"):
        client.chat.completions.create(
            model="qwen3-8b@int4",
            messages=msgs,  # type: ignore[arg-type]
            extra_headers={"x-qtrap-precision": "bf16"},
        )
    # the backend's own 400 (context too long) is passed through with its body
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model="qwen3-8b", messages=msgs, max_tokens=10**6)  # type: ignore[arg-type]


def test_health_reports_each_backend(fleet: Fleet) -> None:
    r = requests.get(f"{fleet.proxy_url}/health", timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "ok"
    assert {b["name"]: b["ok"] for b in body["backends"]} == {
        "sim-bf16": True,
        "sim-int4": True,
        "sim-tgi-int8": True,
    }
