"""The OTLP/HTTP trace receiver: real exporters and hand-written bodies in, exact EngineFacts out."""

from __future__ import annotations

import asyncio
import gzip
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import aiohttp
import orjson
import pytest
from google.rpc import status_pb2
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as ProtoResource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry

from qtrap_proxy import otlp
from qtrap_proxy.config import OtlpReceiverConfig
from qtrap_proxy.energy.facts import EngineFacts
from qtrap_proxy.metrics import Metrics
from qtrap_proxy.otlp import OtlpReceiver

T = TypeVar("T")

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
START_NS = 1_767_225_600_123_456_789
END_NS = START_NS + 1_502_000_000

# what vLLM 0.26.0 sets on an llm_request span
VLLM_ATTRIBUTES: dict[str, Any] = {
    "gen_ai.response.model": "Qwen/Qwen3-8B",
    "gen_ai.request.id": "chatcmpl-3f2a9c1e",
    "gen_ai.request.top_p": 0.9,
    "gen_ai.request.max_tokens": 64,
    "gen_ai.request.temperature": 0.7,
    "gen_ai.request.n": 1,
    "gen_ai.usage.prompt_tokens": 12,
    "gen_ai.usage.completion_tokens": 34,
    "gen_ai.latency.time_in_queue": 0.0125,
    "gen_ai.latency.time_to_first_token": 0.125,
    "gen_ai.latency.e2e": 1.5,
    "gen_ai.latency.time_in_model_prefill": 0.1,
    "gen_ai.latency.time_in_model_decode": 1.25,
    "gen_ai.latency.time_in_model_inference": 1.35,
}

EXPECTED = EngineFacts(
    source="otlp",
    trace_id=TRACE,
    parent_span_id=PARENT,
    request_id="chatcmpl-3f2a9c1e",
    service="vllm",
    arrival_unix_s=START_NS / 1e9,
    end_unix_s=END_NS / 1e9,
    queue_s=0.0125,
    ttft_s=0.125,
    prefill_s=0.1,
    decode_s=1.25,
    inference_s=1.35,
    e2e_s=1.5,
    prompt_tokens=12,
    completion_tokens=34,
)


class Sink:
    """Collects what the receiver passes on, batch by batch."""

    def __init__(self) -> None:
        self.batches: list[list[EngineFacts]] = []

    def __call__(self, facts: list[EngineFacts]) -> None:
        self.batches.append(facts)

    @property
    def facts(self) -> list[EngineFacts]:
        return [f for b in self.batches for f in b]


def serve(
    body: Callable[[OtlpReceiver, Sink], Awaitable[T]],
    sink: Callable[[list[EngineFacts]], None] | None = None,
    **cfg: Any,
) -> tuple[T, OtlpReceiver, Sink]:
    """Run ``body`` against a receiver on 127.0.0.1 (a free port); the receiver is stopped after."""
    collected = Sink()

    async def main() -> tuple[T, OtlpReceiver]:
        config = OtlpReceiverConfig(enabled=True, host="127.0.0.1", port=0, **cfg)
        async with OtlpReceiver(config, sink if sink is not None else collected) as rx:
            assert rx.port is not None and rx.port > 0
            return await body(rx, collected), rx

    result, rx = asyncio.run(main())
    assert rx.port is None  # stopped
    return result, rx, collected


async def post(
    rx: OtlpReceiver, data: bytes, content_type: str, headers: dict[str, str] | None = None
) -> tuple[int, bytes, str]:
    """POST to the receiver's endpoint: status, body and Content-Type of its answer."""
    assert rx.endpoint is not None
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            rx.endpoint, data=data, headers={"Content-Type": content_type, **(headers or {})}
        ) as resp,
    ):
        return resp.status, await resp.read(), resp.headers.get("Content-Type", "")


async def raw(rx: OtlpReceiver, head: bytes, *parts: bytes) -> bytes:
    """Send a request head and some of a body on a plain socket; the answer's first line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", rx.port)
    try:
        writer.write(head)
        for part in parts:
            writer.write(part)
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()
        await writer.wait_closed()


def export_with_sdk(endpoint: str, compression: Compression, attributes: dict[str, Any]) -> None:
    """What vLLM does: one llm_request span, child of the proxy's traceparent, through the OTLP/HTTP
    exporter of a TracerProvider of its own (SimpleSpanProcessor: exported as the span ends)."""
    exporter = OTLPSpanExporter(endpoint=endpoint, compression=compression, timeout=5)
    provider = TracerProvider(resource=Resource.create({"service.name": "vllm"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        tracer = provider.get_tracer("vllm.tracing")
        ctx = TraceContextTextMapPropagator().extract({"traceparent": f"00-{TRACE}-{PARENT}-01"})
        span = tracer.start_span(
            "llm_request", context=ctx, kind=SpanKind.SERVER, start_time=START_NS, attributes=attributes
        )
        span.end(end_time=END_NS)
    finally:
        provider.shutdown()


def kv(key: str, value: Any) -> KeyValue:
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    if isinstance(value, float):
        return KeyValue(key=key, value=AnyValue(double_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=value))


def span(
    name: str = "llm_request",
    *,
    trace: bytes = bytes.fromhex(TRACE),
    parent: bytes = bytes.fromhex(PARENT),
    attributes: dict[str, Any] | None = None,
    start_ns: int = START_NS,
    end_ns: int = END_NS,
) -> Span:
    return Span(
        trace_id=trace,
        span_id=bytes.fromhex("b7ad6b7169203331"),
        parent_span_id=parent,
        name=name,
        kind=Span.SPAN_KIND_SERVER,
        start_time_unix_nano=start_ns,
        end_time_unix_nano=end_ns,
        attributes=[kv(k, v) for k, v in (VLLM_ATTRIBUTES if attributes is None else attributes).items()],
    )


def export_request(*spans: Span, service: str = "vllm") -> ExportTraceServiceRequest:
    resource = ProtoResource(attributes=[kv("service.name", service)])
    return ExportTraceServiceRequest(
        resource_spans=[ResourceSpans(resource=resource, scope_spans=[ScopeSpans(spans=list(spans))])]
    )


@pytest.fixture
def gunzip_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The sizes of the gzip bodies the receiver inflated."""
    calls: list[int] = []
    real = otlp.gunzip

    def spy(data: bytes, limit: int) -> bytes:
        calls.append(len(data))
        return real(data, limit)

    monkeypatch.setattr(otlp, "gunzip", spy)
    yield calls


# -- the OpenTelemetry SDK's exporter ------------------------------------------------------------------


def test_sdk_exporter_protobuf_span_becomes_exact_facts(gunzip_calls: list[int]) -> None:
    async def go(rx: OtlpReceiver, sink: Sink) -> None:
        assert rx.endpoint is not None
        await asyncio.to_thread(export_with_sdk, rx.endpoint, Compression.NoCompression, VLLM_ATTRIBUTES)

    _, rx, sink = serve(go)
    assert sink.batches == [[EXPECTED]]
    assert gunzip_calls == []
    assert (rx.requests, rx.accepted, rx.spans, rx.llm_spans, rx.ignored_spans, rx.rejected_spans) == (
        1,
        1,
        1,
        1,
        0,
        0,
    )


def test_sdk_exporter_gzip(gunzip_calls: list[int]) -> None:
    async def go(rx: OtlpReceiver, sink: Sink) -> None:
        assert rx.endpoint is not None
        await asyncio.to_thread(export_with_sdk, rx.endpoint, Compression.Gzip, VLLM_ATTRIBUTES)

    _, rx, sink = serve(go)
    assert sink.facts == [EXPECTED]
    assert len(gunzip_calls) == 1 and gunzip_calls[0] > 0
    assert rx.accepted == 1


def test_sdk_exporter_span_without_parent_is_passed_on() -> None:
    def export_root(endpoint: str) -> None:
        provider = TracerProvider(resource=Resource.create({"service.name": "vllm"}))
        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint, timeout=5)))
        try:
            s = provider.get_tracer("t").start_span(
                "llm_request", start_time=START_NS, attributes=VLLM_ATTRIBUTES
            )
            s.end(end_time=END_NS)
        finally:
            provider.shutdown()

    async def go(rx: OtlpReceiver, sink: Sink) -> None:
        assert rx.endpoint is not None
        await asyncio.to_thread(export_root, rx.endpoint)

    _, _, sink = serve(go)
    [facts] = sink.facts
    assert facts.parent_span_id is None
    assert facts.trace_id is not None and len(facts.trace_id) == 32 and facts.trace_id != TRACE
    assert facts.request_id == "chatcmpl-3f2a9c1e" and facts.e2e_s == 1.5


# -- OTLP/JSON ---------------------------------------------------------------------------------------


def otlp_json(**span_overrides: Any) -> dict[str, Any]:
    attrs: list[dict[str, Any]] = []
    for k, v in VLLM_ATTRIBUTES.items():
        if isinstance(v, int):
            attrs.append({"key": k, "value": {"intValue": str(v)}})  # int64: a string in OTLP/JSON
        elif isinstance(v, float):
            attrs.append({"key": k, "value": {"doubleValue": v}})
        else:
            attrs.append({"key": k, "value": {"stringValue": v}})
    span_doc: dict[str, Any] = {
        "traceId": TRACE.upper(),  # hex, either case
        "spanId": "b7ad6b7169203331",
        "parentSpanId": PARENT,
        "name": "llm_request",
        "kind": 2,  # SPAN_KIND_SERVER, as an integer
        "startTimeUnixNano": str(START_NS),
        "endTimeUnixNano": str(END_NS),
        "attributes": attrs,
        "links": [{"traceId": TRACE, "spanId": PARENT}],
        "status": {"code": 0},
        "someFutureField": True,  # unknown fields are ignored
    }
    span_doc.update(span_overrides)
    return {
        "resourceSpans": [
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "vllm"}}]},
                "scopeSpans": [{"scope": {"name": "vllm.tracing"}, "spans": [span_doc]}],
            }
        ]
    }


def test_json_body_gives_the_same_facts() -> None:
    async def go(rx: OtlpReceiver, sink: Sink) -> tuple[int, bytes, str]:
        return await post(rx, orjson.dumps(otlp_json()), "application/json")

    (status, body, ctype), rx, sink = serve(go)
    assert status == 200 and ctype == "application/json"
    assert orjson.loads(body) == {}
    assert sink.facts == [EXPECTED]
    assert rx.accepted == 1


def test_json_gzip_and_charset_parameter() -> None:
    async def go(rx: OtlpReceiver, sink: Sink) -> int:
        status, _, _ = await post(
            rx,
            gzip.compress(orjson.dumps(otlp_json())),
            "application/json; charset=utf-8",
            {"Content-Encoding": "gzip"},
        )
        return status

    status, _, sink = serve(go)
    assert status == 200
    assert sink.facts == [EXPECTED]


def test_json_bad_hex_ids_become_none() -> None:
    async def go(rx: OtlpReceiver, sink: Sink) -> int:
        doc = otlp_json(traceId="not-hex-at-all", parentSpanId="00f067aa0ba902")  # bad; 7 bytes
        status, _, _ = await post(rx, orjson.dumps(doc), "application/json")
        return status

    status, _, sink = serve(go)
    assert status == 200
    [facts] = sink.facts
    assert facts.trace_id is None and facts.parent_span_id is None
    assert facts.request_id == "chatcmpl-3f2a9c1e"


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[1, 2]", orjson.dumps({"resourceSpans": "nope"}), orjson.dumps(otlp_json(traceId=7))],
)
def test_bad_json_is_400_with_a_status(body: bytes) -> None:
    async def go(rx: OtlpReceiver, sink: Sink) -> tuple[int, bytes, str]:
        return await post(rx, body, "application/json")

    (status, answer, ctype), rx, sink = serve(go)
    assert status == 400 and ctype == "application/json"
    doc = orjson.loads(answer)
    assert doc["code"] == 3 and doc["message"]
    assert sink.batches == [] and rx.bad_requests == 1 and rx.accepted == 0


# -- refusals ----------------------------------------------------------------------------------------


def test_bad_protobuf_is_400_with_a_status() -> None:
    async def go(rx: OtlpReceiver, sink: Sink) -> tuple[int, bytes, str]:
        return await post(rx, b"\x0a\xff\xff\xff\xff\x0fgarbage", "application/x-protobuf")

    (status, answer, ctype), rx, sink = serve(go)
    assert status == 400 and ctype == "application/x-protobuf"
    rpc = status_pb2.Status.FromString(answer)
    assert rpc.code == 3 and "protobuf" in rpc.message
    assert sink.batches == [] and rx.bad_requests == 1


def test_bad_gzip_is_400() -> None:
    async def go(rx: OtlpReceiver, sink: Sink) -> int:
        body = gzip.compress(export_request(span()).SerializeToString())
        status, _, _ = await post(rx, body[:-6], "application/x-protobuf", {"Content-Encoding": "gzip"})
        return status

    status, rx, sink = serve(go)
    assert status == 400 and rx.bad_requests == 1 and sink.batches == []


@pytest.mark.parametrize(
    ("content_type", "headers"),
    [
        ("text/plain", {}),
        ("application/grpc", {}),
        ("application/x-protobuf", {"Content-Encoding": "br"}),
    ],
)
def test_other_content_types_and_encodings_are_415(content_type: str, headers: dict[str, str]) -> None:
    async def go(rx: OtlpReceiver, sink: Sink) -> int:
        status, _, _ = await post(rx, export_request(span()).SerializeToString(), content_type, headers)
        return status

    status, rx, sink = serve(go)
    assert status == 415 and rx.unsupported == 1 and sink.batches == []


def test_other_paths_404_other_methods_405() -> None:
    async def go(rx: OtlpReceiver, sink: Sink) -> list[tuple[int, str | None]]:
        base = f"http://127.0.0.1:{rx.port}"
        out: list[tuple[int, str | None]] = []
        async with aiohttp.ClientSession() as session:
            for method, path in (("GET", "/v1/traces"), ("PUT", "/v1/traces"), ("POST", "/v1/metrics")):
                async with session.request(method, base + path) as resp:
                    out.append((resp.status, resp.headers.get("Allow")))
        return out

    answers, rx, _ = serve(go)
    assert answers == [(405, "POST"), (405, "POST"), (404, None)]
    assert rx.requests == 0


def test_declared_length_beyond_the_limit_is_413_without_the_body() -> None:
    async def go(rx: OtlpReceiver, sink: Sink) -> tuple[bytes, float]:
        head = (
            b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
            b"Content-Length: 100000000\r\n\r\n"
        )
        t0 = time.monotonic()
        line = await raw(rx, head, b"\x00" * 100)  # 100 of the announced 100 MB
        return line, time.monotonic() - t0

    (line, took), rx, sink = serve(go, max_body_bytes=1024)
    assert line.startswith(b"HTTP/1.1 413 ")
    assert took < 2.0
    assert rx.too_large == 1 and sink.batches == []


def test_chunked_body_past_the_limit_is_413_before_its_end() -> None:
    async def go(rx: OtlpReceiver, sink: Sink) -> bytes:
        head = (
            b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"200\r\n" + b"\x00" * 512 + b"\r\n"
        return await raw(rx, head, chunk, chunk, chunk)  # 1536 bytes and no last chunk: never ends

    line, rx, _ = serve(go, max_body_bytes=1024)
    assert line.startswith(b"HTTP/1.1 413 ")
    assert rx.too_large == 1


def test_gzip_inflating_past_the_limit_is_413() -> None:
    async def go(rx: OtlpReceiver, sink: Sink) -> tuple[int, bytes]:
        bomb = gzip.compress(b"\x00" * 1_000_000)
        assert len(bomb) < 4096
        status, answer, _ = await post(rx, bomb, "application/x-protobuf", {"Content-Encoding": "gzip"})
        return status, answer

    (status, answer), rx, _ = serve(go, max_body_bytes=4096)
    assert status == 413
    assert "inflates beyond 4096" in status_pb2.Status.FromString(answer).message
    assert rx.too_large == 1


def test_body_too_slow_is_408(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(otlp, "READ_TIMEOUT_S", 0.2)

    async def go(rx: OtlpReceiver, sink: Sink) -> bytes:
        head = (
            b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
            b"Content-Length: 100\r\n\r\n"
        )
        return await raw(rx, head, b"\x0a")

    line, rx, _ = serve(go)
    assert line.startswith(b"HTTP/1.1 408 ")
    assert rx.bad_requests == 1


# -- conversion --------------------------------------------------------------------------------------


def test_bad_attribute_values_are_dropped() -> None:
    bad = {
        "gen_ai.request.id": "chatcmpl-\n-injected",
        "gen_ai.latency.time_to_first_token": float("nan"),
        "gen_ai.latency.e2e": -1.0,
        "gen_ai.latency.time_in_queue": 1e9,  # beyond a day
        "gen_ai.latency.time_in_model_prefill": "0.1",  # a string
        "gen_ai.latency.time_in_model_decode": 2,  # an int_value: accepted
        "gen_ai.latency.time_in_model_inference": float("inf"),
        "gen_ai.usage.prompt_tokens": 2**40,  # beyond a billion
        "gen_ai.usage.completion_tokens": -3,
    }

    async def go(rx: OtlpReceiver, sink: Sink) -> int:
        req = export_request(span(attributes=bad), service="x" * 300)
        status, _, _ = await post(rx, req.SerializeToString(), "application/x-protobuf")
        return status

    status, _, sink = serve(go)
    assert status == 200
    assert sink.facts == [
        EngineFacts(
            source="otlp",
            trace_id=TRACE,
            parent_span_id=PARENT,
            arrival_unix_s=START_NS / 1e9,
            end_unix_s=END_NS / 1e9,
            decode_s=2.0,
        )
    ]


def test_double_token_counts_and_bad_ids() -> None:
    attrs = {
        "gen_ai.usage.prompt_tokens": 12.0,
        "gen_ai.usage.completion_tokens": 2.5,
        "gen_ai.request.id": "r1",
    }
    spans = [
        span(attributes=attrs, trace=b"\x01" * 8, parent=b"\x00" * 8),  # short trace id, all-zero parent
        span(attributes=attrs, trace=b"\x00" * 16, parent=b"", start_ns=0, end_ns=0),
    ]
    batch = otlp.convert(export_request(*spans))
    assert [(f.trace_id, f.parent_span_id, f.prompt_tokens, f.completion_tokens) for f in batch.facts] == [
        (None, None, 12, None),
        (None, None, 12, None),
    ]
    assert batch.facts[1].arrival_unix_s is None and batch.facts[1].end_unix_s is None
    assert batch.facts[0].request_id == "r1" and batch.rejected == 0


def test_other_spans_ignored_and_unjoinable_ones_rejected() -> None:
    async def go(rx: OtlpReceiver, sink: Sink) -> tuple[int, bytes]:
        req = export_request(
            span("http.request"),
            span(),
            span("execute_model"),
            span(trace=b"", parent=b"", attributes={"gen_ai.latency.e2e": 1.0}),  # nothing to join it by
        )
        status, body, _ = await post(rx, req.SerializeToString(), "application/x-protobuf")
        return status, body

    (status, body), rx, sink = serve(go)
    assert status == 200
    answer = ExportTraceServiceResponse.FromString(body)
    assert answer.partial_success.rejected_spans == 1
    assert "no valid trace id" in answer.partial_success.error_message
    assert sink.batches == [[EXPECTED]]
    assert (rx.spans, rx.llm_spans, rx.ignored_spans, rx.rejected_spans) == (4, 1, 2, 1)


def test_rejected_spans_in_json_answer() -> None:
    async def go(rx: OtlpReceiver, sink: Sink) -> bytes:
        doc = otlp_json(traceId="", parentSpanId="", attributes=[])
        status, body, _ = await post(rx, orjson.dumps(doc), "application/json")
        assert status == 200
        return body

    body, _, sink = serve(go)
    doc = orjson.loads(body)
    assert int(doc["partialSuccess"]["rejectedSpans"]) == 1
    assert doc["partialSuccess"]["errorMessage"]
    assert sink.batches == []


def test_no_llm_spans_no_sink_call() -> None:
    async def go(rx: OtlpReceiver, sink: Sink) -> int:
        status, _, _ = await post(
            rx, export_request(span("other")).SerializeToString(), "application/x-protobuf"
        )
        return status

    status, rx, sink = serve(go)
    assert status == 200 and sink.batches == [] and rx.ignored_spans == 1


def test_large_export_decoded_off_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    req = export_request(*(span() for _ in range(1000)))
    body = req.SerializeToString()
    assert len(body) > otlp.THREAD_DECODE_BYTES
    threads: list[str] = []
    real = otlp.decode

    def spy(data: bytes, *, json: bool, gzipped: bool, limit: int) -> otlp.Batch:
        threads.append(threading.current_thread().name)
        return real(data, json=json, gzipped=gzipped, limit=limit)

    monkeypatch.setattr(otlp, "decode", spy)

    async def go(rx: OtlpReceiver, sink: Sink) -> list[int]:
        statuses = []
        for data in (body, export_request(span()).SerializeToString()):
            status, _, _ = await post(rx, data, "application/x-protobuf")
            statuses.append(status)
        return statuses

    statuses, _, sink = serve(go)
    assert statuses == [200, 200]
    main = threading.main_thread().name
    assert threads[0] != main and threads[1] == main  # the small one on the loop
    assert [len(b) for b in sink.batches] == [1000, 1]
    assert set(sink.facts) == {EXPECTED}


# -- robustness --------------------------------------------------------------------------------------


def test_failing_sink_is_logged_and_answered_200(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def broken(facts: list[EngineFacts]) -> None:
        calls.append(len(facts))
        raise RuntimeError("sink is broken")

    async def go(rx: OtlpReceiver, sink: Sink) -> list[int]:
        body = export_request(span()).SerializeToString()
        statuses = []
        for _ in range(2):
            status, _, _ = await post(rx, body, "application/x-protobuf")
            statuses.append(status)
        return statuses

    with caplog.at_level(logging.ERROR, logger="qtrap.otlp"):
        statuses, rx, _ = serve(go, sink=broken)
    assert statuses == [200, 200]
    assert calls == [1, 1]
    assert rx.sink_errors == 2 and rx.accepted == 2
    assert sum("sink failed" in r.getMessage() for r in caplog.records) == 2
    assert any(r.exc_info and "sink is broken" in str(r.exc_info[1]) for r in caplog.records)


def test_unexpected_failure_is_400_not_500(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(request: ExportTraceServiceRequest) -> otlp.Batch:
        raise KeyError("bug")

    monkeypatch.setattr(otlp, "convert", boom)

    async def go(rx: OtlpReceiver, sink: Sink) -> list[int]:
        body = export_request(span()).SerializeToString()
        first, _, _ = await post(rx, body, "application/x-protobuf")
        monkeypatch.undo()
        second, _, _ = await post(rx, body, "application/x-protobuf")
        return [first, second]

    with caplog.at_level(logging.ERROR, logger="qtrap.otlp"):
        statuses, _rx, sink = serve(go)
    assert statuses == [400, 200]
    assert sink.facts == [EXPECTED]
    assert any("unexpected failure" in r.getMessage() for r in caplog.records)


def test_stop_is_bounded_with_a_request_hanging() -> None:
    async def go() -> tuple[bool, float]:
        rx = OtlpReceiver(OtlpReceiverConfig(enabled=True, host="127.0.0.1", port=0), Sink())
        await rx.start()
        _reader, writer = await asyncio.open_connection("127.0.0.1", rx.port)
        writer.write(
            b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
            b"Content-Length: 100\r\n\r\n\x0a"
        )
        await writer.drain()
        await asyncio.sleep(0.05)  # the handler is waiting for the rest of the body
        t0 = time.monotonic()
        ok = await rx.stop(timeout_s=2.0)
        took = time.monotonic() - t0
        writer.close()
        return ok, took

    ok, took = asyncio.run(go())
    assert ok and took < 2.5


def test_port_in_use_raises_and_leaves_nothing_running() -> None:
    async def go() -> None:
        first = OtlpReceiver(OtlpReceiverConfig(enabled=True, host="127.0.0.1", port=0), Sink())
        async with first:
            assert first.port is not None
            second = OtlpReceiver(OtlpReceiverConfig(enabled=True, host="127.0.0.1", port=first.port), Sink())
            with pytest.raises(OSError):
                await second.start()
            assert second.port is None and await second.stop()

    asyncio.run(go())


def test_metrics_read_the_counts() -> None:
    async def go(rx: OtlpReceiver, sink: Sink) -> None:
        await post(rx, export_request(span(), span("other")).SerializeToString(), "application/x-protobuf")
        await post(rx, b"\xff", "application/x-protobuf")
        await post(rx, b"", "text/plain")

    _, rx, _ = serve(go)
    registry = CollectorRegistry()
    Metrics(registry).register_otlp(rx)

    def value(name: str, outcome: str | None = None) -> float | None:
        return registry.get_sample_value(name, {} if outcome is None else {"outcome": outcome})

    assert value("qtrap_otlp_requests_total", "ok") == 1
    assert value("qtrap_otlp_requests_total", "bad_request") == 1
    assert value("qtrap_otlp_requests_total", "unsupported") == 1
    assert value("qtrap_otlp_requests_total", "too_large") == 0
    assert value("qtrap_otlp_spans_total", "llm_request") == 1
    assert value("qtrap_otlp_spans_total", "ignored") == 1
    assert value("qtrap_otlp_spans_total", "rejected") == 0
    assert value("qtrap_otlp_sink_errors_total") == 0
