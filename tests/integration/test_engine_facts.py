"""Engine facts end to end: simulated engines send vLLM's llm_request spans (their clock skewed) to the
proxy's OTLP receiver, or TGI's timing headers; the proxy joins them to its requests, estimates the
clock offset and attributes with them; a backend whose spans never come keeps the proxy's view."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from qtrap_proxy.energy import reasons
from tests.helpers import backend, free_port, proxy, sim, wait_meter

SKEW_S = 2.5  # the bf16 engine's clock runs this far ahead of the proxy's


@dataclass
class FactsSetup:
    url: str
    otlp_port: int


@pytest.fixture(scope="module")
def facts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FactsSetup]:
    tmp: Path = tmp_path_factory.mktemp("facts")
    p16, p4, ptgi, otlp = free_port(), free_port(), free_port(), free_port()
    common = ["--model", "qwen3-8b"]
    endpoint = f"http://127.0.0.1:{otlp}/v1/traces"
    with (
        sim(p16, *common, "--precision", "bf16", "--gpu-index", "0", "--otlp-traces-endpoint", endpoint,
            "--otlp-batch-delay-ms", "50", "--clock-skew-s", str(SKEW_S)),
        # configured for spans but sends none: its requests wait for them, then keep the proxy's view
        sim(p4, *common, "--precision", "int4", "--gpu-index", "1"),
        sim(ptgi, *common, "--precision", "int8", "--api", "tgi", "--gpu-index", "2"),
    ):  # fmt: skip
        devices = [{"host": "qtrap-sim", "index": i} for i in range(3)]
        cfg: dict[str, Any] = {
            "backends": [
                backend("sim-bf16", p16, "bf16", model="qwen3-8b", devices=[devices[0]], engine_facts="otlp"),
                backend("sim-int4", p4, "int4", model="qwen3-8b", devices=[devices[1]], engine_facts="otlp"),
                backend(
                    "sim-tgi",
                    ptgi,
                    "int8",
                    kind="tgi",
                    model="qwen3-8b",
                    devices=[devices[2]],
                    engine_facts="headers",
                ),
            ],
            "pools": {"qwen3-8b": {"default_precision": "bf16"}},
            "meter": {
                "kind": "dcgm",
                "urls": [f"http://127.0.0.1:{p}/dcgm/metrics" for p in (p16, p4, ptgi)],
                "settle_s": 8.0,
                "compare_views": True,
            },
            "otlp_receiver": {"enabled": True, "port": otlp, "wait_s": 1.5},
        }
        with proxy(tmp, cfg):
            url = f"http://127.0.0.1:{cfg['server']['port']}"
            wait_meter(url)
            yield FactsSetup(url, otlp)


def _chat(url: str, precision: str, stream: bool, headers: dict[str, str] | None = None) -> str:
    r = requests.post(
        url + "/v1/chat/completions",
        json={
            "model": f"qwen3-8b@{precision}",
            "max_tokens": 24,
            "stream": stream,
            "messages": [{"role": "user", "content": "word " * 300}],
        },
        headers=headers or {},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.headers["x-qtrap-request-id"]


def _final(url: str, rid: str, timeout_s: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        rec: dict[str, Any] = requests.get(f"{url}/qtrap/v1/requests/{rid}", timeout=5).json()
        if rec["final"]:
            return rec
        assert time.monotonic() < deadline, f"record {rid} never became final: {rec}"
        time.sleep(0.05)


@pytest.mark.parametrize("stream", [True, False])
def test_spans_join_their_requests_and_place_the_phases(facts: FactsSetup, stream: bool) -> None:
    client_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    rid = _chat(facts.url, "bf16", stream, {"traceparent": f"00-{client_trace}-00f067aa0ba902b7-01"})
    rec = _final(facts.url, rid)
    assert rec["facts"] == "engine" and rec["facts_reason"] is None, rec
    timing = rec["engine_timing"]
    assert timing["source"] == "otlp"
    assert timing["prompt_tokens"] == rec["prompt_tokens"] and timing["completion_tokens"] == 24
    err = timing["clock_error_s"]
    assert err < 0.05
    # the phases in order, inside the request as the proxy saw it
    assert (
        -err
        <= timing["queued_s"]
        <= timing["prefill_start_s"]
        <= timing["first_token_s"]
        <= timing["last_token_s"]
    )
    assert timing["last_token_s"] <= rec["e2e_s"] + err
    if stream:  # the first chunk cannot reach the proxy before the engine made the first token
        assert rec["ttft_s"] >= timing["first_token_s"] - err
    assert rec["energy_j"] > 0 and rec["energy_proxy_view_j"] is not None and rec["energy_proxy_view_j"] > 0


def test_the_clock_offset_is_estimated_within_its_bound(facts: FactsSetup) -> None:
    for stream in (True, False, True):
        _final(facts.url, _chat(facts.url, "bf16", stream))
    clocks = requests.get(facts.url + "/qtrap/v1/energy", timeout=5).json()["engine_facts"]["clocks"]
    clock = next(c for c in clocks if c["backend"] == "sim-bf16")
    assert clock["samples"] >= 3
    assert abs(clock["offset_s"] - SKEW_S) <= clock["offset_error_s"] + 1e-3
    assert clock["offset_error_s"] < 0.05


def test_spans_that_never_come_leave_the_proxys_view_with_the_reason(facts: FactsSetup) -> None:
    rid = _chat(facts.url, "int4", stream=False)
    rec = _final(facts.url, rid)
    assert rec["facts"] == "proxy" and rec["facts_reason"] == reasons.FACTS_NEVER_CAME
    assert rec["engine_timing"] is None
    assert rec["energy_j"] is not None and rec["energy_j"] > 0  # measured all the same


def test_tgi_headers_are_facts_for_non_streaming_answers_only(facts: FactsSetup) -> None:
    r = requests.post(
        facts.url + "/generate",
        json={"inputs": "word " * 200, "parameters": {"max_new_tokens": 16}},
        headers={"x-qtrap-model": "qwen3-8b@int8"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    rid = r.headers["x-qtrap-request-id"]
    rec = _final(facts.url, rid)
    assert rec["facts"] == "engine", rec
    timing = rec["engine_timing"]
    assert timing["source"] == "headers" and timing["first_token_s"] is None
    assert timing["completion_tokens"] == 16 and timing["prompt_tokens"] == rec["prompt_tokens"]
    assert 0.0 <= timing["prefill_start_s"] < timing["last_token_s"] <= rec["e2e_s"]
    s = requests.post(
        facts.url + "/generate_stream",
        json={"inputs": "word " * 200, "parameters": {"max_new_tokens": 16}},
        headers={"x-qtrap-model": "qwen3-8b@int8"},
        timeout=60,
    )
    assert s.status_code == 200
    srec = _final(facts.url, s.headers["x-qtrap-request-id"])
    assert srec["facts"] == "proxy" and srec["facts_reason"] is None and srec["engine_timing"] is None


def test_spans_of_requests_this_proxy_never_sent_are_counted_and_left_out(facts: FactsSetup) -> None:
    """A span whose parent this proxy did not send (another replica's request) is not joined to anything."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    before = requests.get(facts.url + "/qtrap/v1/energy", timeout=5).json()["engine_facts"]["outcomes"]
    provider = TracerProvider()
    provider.add_span_processor(
        SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"http://127.0.0.1:{facts.otlp_port}/v1/traces"))
    )
    span = provider.get_tracer("test").start_span(
        "llm_request", attributes={"gen_ai.request.id": "chatcmpl-other"}
    )
    span.end()
    provider.shutdown()
    after = requests.get(facts.url + "/qtrap/v1/energy", timeout=5).json()["engine_facts"]["outcomes"]
    assert after["unmatched"] == before["unmatched"] + 1
    assert after["joined"] == before["joined"]
