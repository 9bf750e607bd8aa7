"""OpenTelemetry out (otel_export): a real proxy process in front of a simulated vLLM backend exports one
span per request over OTLP/HTTP to a local receiver (an aiohttp server decoding ExportTraceServiceRequest),
in the client's trace, with the gen_ai and qtrap attributes and the final energy; the simulator's own
llm_request span, sent to the same receiver, is the proxy span's child."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.helpers import backend, free_port, proxy, sim, wait_meter

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


@dataclass
class Received:
    spans: list[tuple[dict[str, Any], Any]] = field(default_factory=list)  # (resource attributes, span)
    headers: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def find(self, cond: Any, what: str, timeout_s: float = 20.0) -> tuple[dict[str, Any], Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            with self.lock:
                hits = [(r, s) for r, s in self.spans if cond(s)]
            if hits:
                assert len(hits) == 1, f"{what}: {len(hits)} spans"
                return hits[0]
            assert time.monotonic() < deadline, f"no span: {what}"
            time.sleep(0.05)


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


def attrs(span: Any) -> dict[str, Any]:
    return {a.key: _value(a.value) for a in span.attributes}


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[int, Received]]:
    got = Received()

    async def traces(request: web.Request) -> web.Response:
        msg = ExportTraceServiceRequest.FromString(await request.read())
        with got.lock:
            got.headers.append({k.lower(): v for k, v in request.headers.items()})
            for rs in msg.resource_spans:
                resource = {a.key: _value(a.value) for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    got.spans.extend((resource, s) for s in ss.spans)
        body = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=body, content_type="application/x-protobuf")

    port = free_port()
    loop = asyncio.new_event_loop()
    runner: list[web.AppRunner] = []
    ready = threading.Event()

    async def serve() -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", traces)
        r = web.AppRunner(app)
        await r.setup()
        await web.TCPSite(r, "127.0.0.1", port).start()
        runner.append(r)
        ready.set()

    t = threading.Thread(target=lambda: (loop.run_until_complete(serve()), loop.run_forever()), daemon=True)
    t.start()
    assert ready.wait(10)
    yield port, got
    asyncio.run_coroutine_threadsafe(runner[0].cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    t.join(10)
    loop.close()


@pytest.fixture(scope="module")
def proxy_url(tmp_path_factory: pytest.TempPathFactory, receiver: tuple[int, Received]) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("otel")
    rport, _ = receiver
    endpoint = f"http://127.0.0.1:{rport}/v1/traces"
    port = free_port()
    args = ["--model", "qwen3-8b", "--step-ms", "2", "--precision", "int4"]
    with sim(port, *args, "--otlp-traces-endpoint", endpoint, "--otlp-batch-delay-ms", "50"):
        cfg: dict[str, Any] = {
            "backends": [backend("sim-int4", port, "int4", devices=[{"host": "qtrap-sim", "index": 0}])],
            "meter": {"kind": "dcgm", "urls": [f"http://127.0.0.1:{port}/dcgm/metrics"], "settle_s": 0.3},
            "carbon": {"intensity_g_per_kwh": 300},
            "otel_export": {
                "enabled": True,
                "endpoint": endpoint,
                "headers": {"x-collector-key": "sekrit"},
                "service_name": "qtrap-test",
                "batch_delay_ms": 50,
            },
        }
        with proxy(tmp, cfg):
            url = f"http://127.0.0.1:{cfg['server']['port']}"
            wait_meter(url)
            yield url


def _chat(url: str, **headers: str) -> str:
    r = requests.post(
        url + "/v1/chat/completions",
        json={"model": "qwen3-8b", "messages": [{"role": "user", "content": "one two"}], "max_tokens": 7},
        headers=headers,
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return r.headers["x-qtrap-request-id"]


def _final(url: str, rid: str) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while True:
        rec: dict[str, Any] = requests.get(f"{url}/qtrap/v1/requests/{rid}", timeout=5).json()
        if rec["final"]:
            return rec
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_request_span_continues_the_clients_trace_with_its_final_energy(
    proxy_url: str, receiver: tuple[int, Received]
) -> None:
    _, got = receiver
    rid = _chat(
        proxy_url,
        traceparent=f"00-{TRACE_ID}-{CLIENT_SPAN}-01",
        **{"x-qtrap-chain-id": "otel-chain", "x-qtrap-hop": "2"},
    )
    rec = _final(proxy_url, rid)
    resource, span = got.find(lambda s: attrs(s).get("qtrap.request_id") == rid, "the proxy's span")
    assert resource["service.name"] == "qtrap-test"
    assert span.trace_id.hex() == TRACE_ID and span.parent_span_id.hex() == CLIENT_SPAN
    assert span.span_id.hex() == rid[:16]  # the parent the proxy sent upstream
    assert span.name == "chat qwen3-8b" and span.kind == span.SPAN_KIND_SERVER
    a = attrs(span)
    assert a["gen_ai.system"] == "vllm" and a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == "qwen3-8b" and a["gen_ai.response.model"] == "qwen3-8b"
    assert a["gen_ai.usage.input_tokens"] == rec["prompt_tokens"] and a["gen_ai.usage.output_tokens"] == 7
    assert a["qtrap.final"] is True and a["qtrap.energy_j"] == rec["energy_j"] > 0
    assert a["qtrap.co2e_g"] == pytest.approx(rec["energy_j"] / 3.6e6 * 300)
    assert a["qtrap.precision"] == "int4" and a["qtrap.backend"] == "sim-int4"
    assert a["qtrap.chain_id"] == "otel-chain" and a["qtrap.hop"] == 2 and a["qtrap.status"] == "ok"
    assert a["http.response.status_code"] == 200 and span.status.code != span.status.STATUS_CODE_ERROR
    # the span lasts as long as the request did at the proxy
    duration_s = (span.end_time_unix_nano - span.start_time_unix_nano) / 1e9
    assert duration_s == pytest.approx(rec["e2e_s"], abs=1e-3)
    assert span.start_time_unix_nano / 1e9 == pytest.approx(rec["start_unix_s"], abs=1e-3)
    # the engine's own span is the proxy span's child, in the same trace
    _, engine = got.find(
        lambda s: s.name == "llm_request" and s.parent_span_id.hex() == rid[:16], "the engine's span"
    )
    assert engine.trace_id.hex() == TRACE_ID
    assert any(h.get("x-collector-key") == "sekrit" for h in got.headers)


def test_without_a_traceparent_the_span_roots_the_trace_the_proxy_sent_upstream(
    proxy_url: str, receiver: tuple[int, Received]
) -> None:
    _, got = receiver
    rid = _chat(proxy_url)
    _final(proxy_url, rid)
    _, span = got.find(lambda s: attrs(s).get("qtrap.request_id") == rid, "the proxy's span")
    assert span.trace_id.hex() == rid and span.parent_span_id == b"" and span.span_id.hex() == rid[:16]
    _, engine = got.find(lambda s: s.name == "llm_request" and s.trace_id.hex() == rid, "the engine's span")
    assert engine.parent_span_id.hex() == rid[:16]


def test_a_refused_request_has_an_error_span_with_energy_unknown(
    proxy_url: str, receiver: tuple[int, Received]
) -> None:
    _, got = receiver
    r = requests.post(
        proxy_url + "/v1/chat/completions",
        json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
        headers={"traceparent": f"00-{'ab' * 16}-{CLIENT_SPAN}-01"},
        timeout=10,
    )
    assert r.status_code == 404
    rid = r.headers["x-qtrap-request-id"]
    _, span = got.find(lambda s: attrs(s).get("qtrap.request_id") == rid, "the refused request's span")
    a = attrs(span)
    assert span.status.code == span.status.STATUS_CODE_ERROR and a["qtrap.status"] == "not_found"
    assert (
        "qtrap.energy_j" not in a and a["qtrap.energy_null_reason"] and a["http.response.status_code"] == 404
    )
    assert span.trace_id.hex() == "ab" * 16


def test_spans_still_batched_at_shutdown_are_flushed_before_the_proxy_exits(
    tmp_path: Path, receiver: tuple[int, Received]
) -> None:
    """A batch delay of a minute and a request not yet final: on SIGTERM the proxy finalises the request
    (energy settled or unknown with its reason), exports its span and exits 0 well before the batch was due."""
    rport, got = receiver
    port = free_port()
    with sim(port, "--model", "qwen3-8b", "--step-ms", "2", "--precision", "int4"):
        cfg: dict[str, Any] = {
            "backends": [backend("sim-int4", port, "int4", devices=[{"host": "qtrap-sim", "index": 0}])],
            "meter": {"kind": "dcgm", "urls": [f"http://127.0.0.1:{port}/dcgm/metrics"], "settle_s": 30},
            "otel_export": {
                "enabled": True,
                "endpoint": f"http://127.0.0.1:{rport}/v1/traces",
                "service_name": "qtrap-shutdown",
                "batch_delay_ms": 60_000,
            },
        }
        with proxy(tmp_path, cfg) as proc:
            url = f"http://127.0.0.1:{cfg['server']['port']}"
            wait_meter(url)
            rid = _chat(url)
            time.sleep(1.0)  # the exporter's first batch (if any) is long gone; this span is queued
            with got.lock:
                assert not [s for _, s in got.spans if attrs(s).get("qtrap.request_id") == rid]
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
            stopped_s = time.monotonic() - t0
    resource, span = got.find(
        lambda s: attrs(s).get("qtrap.request_id") == rid, "the span flushed at exit", 1.0
    )
    assert resource["service.name"] == "qtrap-shutdown"
    assert stopped_s < 30  # not the batch's minute
    a = attrs(span)
    assert a["qtrap.final"] is True and a["qtrap.status"] == "ok"
    assert ("qtrap.energy_j" in a) != ("qtrap.energy_null_reason" in a)
