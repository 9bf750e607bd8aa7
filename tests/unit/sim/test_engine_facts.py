"""The engine's own per-request facts: vLLM's llm_request spans, TGI's timing headers, the true timestamps.

The app runs in process (an httpx ASGI transport, the backend's own lifespan) with an in-memory span
exporter injected, except in the one test that checks the real OTLP/HTTP exporter's protobuf against a
tiny aiohttp receiver on loopback.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from qtrap_sim.backend import SimBackend, SimBackendConfig
from qtrap_sim.engine import SimRequest
from qtrap_sim.server import create_app
from qtrap_sim.textgen import TextStream
from qtrap_sim.tracing import EngineClock, RequestTracer, SpanRequest, TGITimings

MODEL = "qwen3-8b"
STEP_S = 0.005
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT}-01"
TIMING = ("x-total-time", "x-validation-time", "x-queue-time", "x-inference-time", "x-time-per-token")
TOL = 1e-9  # float rounding of the differences of the same monotonic readings


def _cfg(**kw: Any) -> SimBackendConfig:
    base: dict[str, Any] = {"model": MODEL, "step_ms": STEP_S * 1e3, "per_seq_us": 0, "port": 0}
    return SimBackendConfig(**{**base, **kw})


@asynccontextmanager
async def _client(backend: SimBackend) -> AsyncIterator[httpx.AsyncClient]:
    """The backend's app with its lifespan (engine started, spans flushed at the end)."""
    app = create_app(backend)
    async with backend.lifespan(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sim") as client:
            yield client


def _spans(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    out = {}
    for s in exporter.get_finished_spans():
        assert s.attributes is not None
        out[str(s.attributes["gen_ai.request.id"])] = s
    return out


def _num(attrs: Any, key: str) -> float:
    v = attrs[key]
    assert isinstance(v, int | float) and not isinstance(v, bool), (key, v)
    return float(v)


def _check_span(span: ReadableSpan, req: SimRequest, clock: EngineClock, usage: dict[str, int]) -> None:
    """One llm_request span against the engine's own timestamps of its request."""
    assert span.name == "llm_request" and span.kind is SpanKind.SERVER
    assert span.instrumentation_scope is not None and span.instrumentation_scope.name == "vllm.llm_engine"
    a = span.attributes
    assert a is not None
    assert req.admitted_at is not None and req.first_token_at is not None and req.last_token_at is not None
    assert a["gen_ai.usage.prompt_tokens"] == req.prompt_tokens == usage["prompt_tokens"]
    assert a["gen_ai.usage.completion_tokens"] == req.generated == usage["completion_tokens"]
    queue, prefill = (
        _num(a, "gen_ai.latency.time_in_queue"),
        _num(a, "gen_ai.latency.time_in_model_prefill"),
    )
    decode, inference = (
        _num(a, "gen_ai.latency.time_in_model_decode"),
        _num(a, "gen_ai.latency.time_in_model_inference"),
    )
    ttft, e2e = _num(a, "gen_ai.latency.time_to_first_token"), _num(a, "gen_ai.latency.e2e")
    assert queue == pytest.approx(req.admitted_at - req.arrival, abs=TOL)
    assert prefill == pytest.approx(req.first_token_at - req.admitted_at, abs=TOL)
    assert decode == pytest.approx(req.last_token_at - req.first_token_at, abs=TOL)
    assert inference == pytest.approx(prefill + decode, abs=TOL)
    # the engine's phases fill the request's life but for the front end's own overheads
    assert 0 <= e2e - (queue + prefill + decode) < 0.05
    assert queue + prefill <= ttft + TOL and ttft <= e2e
    # prefill is one engine step, decode one per further token (a late step's successor is shorter)
    assert prefill > 0 and decode > 0 and req.generated > 1
    assert inference == pytest.approx(req.steps * STEP_S, rel=0.5)
    # start = arrival on the engine's wall clock; end - start = e2e (both read when recorded)
    assert span.start_time == clock.engine_ns(req.arrival)
    assert span.end_time is not None
    assert (span.end_time - span.start_time) / 1e9 == pytest.approx(e2e, abs=2e-9)
    assert span.resource.attributes["service.name"] == "qtrap-sim"


def test_vllm_spans_streamed_and_not_carry_the_callers_trace_and_the_engines_times() -> None:
    exporter = InMemorySpanExporter()
    backend = SimBackend(_cfg(), span_exporter=exporter)

    async def go() -> dict[str, dict[str, int]]:
        usage: dict[str, dict[str, int]] = {}
        async with _client(backend) as c:
            r = await c.post(
                "/v1/chat/completions",
                headers={"x-request-id": "plain", "traceparent": TRACEPARENT, "tracestate": "qtrap=1"},
                json={"model": MODEL, "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 6,
                      "temperature": 0.5, "top_p": 0.9},
            )  # fmt: skip
            assert r.status_code == 200
            usage["chatcmpl-plain"] = r.json()["usage"]
            body = {"model": MODEL, "prompt": "one two three four", "max_tokens": 5, "stream": True,
                    "temperature": 0, "stream_options": {"include_usage": True}}  # fmt: skip
            other_parent = "b7ad6b7169203331"
            headers = {"x-request-id": "streamed", "traceparent": f"00-{TRACE_ID}-{other_parent}-01"}
            async with c.stream("POST", "/v1/completions", headers=headers, json=body) as resp:
                lines = [ln async for ln in resp.aiter_lines() if ln.startswith("data: {")]
            usage["cmpl-streamed"] = json.loads(lines[-1].removeprefix("data: "))["usage"]
            r = await c.post(
                "/v1/completions",
                headers={"x-request-id": "rootless"},
                json={"model": MODEL, "prompt": "x", "max_tokens": 3},
            )
            usage["cmpl-rootless"] = r.json()["usage"]
            assert backend.tracer is not None and backend.tracer.force_flush()
        return usage

    usage = asyncio.run(go())
    spans = _spans(exporter)
    assert sorted(spans) == ["chatcmpl-plain", "cmpl-rootless", "cmpl-streamed"]
    for rid, span in spans.items():
        _check_span(span, backend.truth[rid.split("-", 1)[1]], backend.clock, usage[rid])

    plain, streamed, rootless = spans["chatcmpl-plain"], spans["cmpl-streamed"], spans["cmpl-rootless"]
    assert plain.parent is not None and plain.parent.is_remote
    assert f"{plain.context.trace_id:032x}" == TRACE_ID and f"{plain.parent.span_id:016x}" == PARENT
    assert plain.context.trace_state.get("qtrap") == "1"
    assert streamed.parent is not None and f"{streamed.parent.span_id:016x}" == "b7ad6b7169203331"
    assert f"{streamed.context.trace_id:032x}" == TRACE_ID
    assert rootless.parent is None and f"{rootless.context.trace_id:032x}" != TRACE_ID  # a new root trace
    # the request's parameters, as vLLM sets them (only when truthy: a temperature of 0 is left out)
    a = plain.attributes
    assert a is not None
    assert (a["gen_ai.request.max_tokens"], a["gen_ai.request.temperature"]) == (6, 0.5)
    assert (a["gen_ai.request.top_p"], a["gen_ai.request.n"]) == (0.9, 1)
    b = streamed.attributes
    assert b is not None and "gen_ai.request.temperature" not in b
    assert (b["gen_ai.request.max_tokens"], b["gen_ai.request.top_p"]) == (5, 1.0)


def test_queue_time_is_the_wait_for_a_free_slot() -> None:
    """One slot: the second request waits while the first runs; its span says so."""
    exporter = InMemorySpanExporter()
    backend = SimBackend(_cfg(max_num_seqs=1), span_exporter=exporter)

    async def one(c: httpx.AsyncClient, rid: str) -> dict[str, int]:
        r = await c.post(
            "/v1/completions",
            headers={"x-request-id": rid},
            json={"model": MODEL, "prompt": "a b c", "max_tokens": 8},
        )
        usage: dict[str, int] = r.json()["usage"]
        return usage

    async def go() -> list[dict[str, int]]:
        async with _client(backend) as c:
            return list(await asyncio.gather(one(c, "first"), one(c, "second")))

    first_usage, second_usage = asyncio.run(go())
    spans = _spans(exporter)  # the lifespan's end flushed them
    _check_span(spans["cmpl-first"], backend.truth["first"], backend.clock, first_usage)
    _check_span(spans["cmpl-second"], backend.truth["second"], backend.clock, second_usage)
    first, second = (spans[k].attributes for k in ("cmpl-first", "cmpl-second"))
    assert first is not None and second is not None
    waited = _num(second, "gen_ai.latency.time_in_queue")
    assert waited == pytest.approx(_num(first, "gen_ai.latency.time_in_model_inference"), abs=0.02)
    assert waited >= 7 * STEP_S


def test_aborted_request_has_no_span_and_a_stop_string_one_does() -> None:
    exporter = InMemorySpanExporter()
    backend = SimBackend(_cfg(), span_exporter=exporter)

    stopped = SimRequest("stopped", 4, 50)

    async def go() -> None:
        backend.engine.start()
        try:
            gone = SimRequest("gone", 4, 50)
            gen = backend.generate(gone, TextStream("p", 1, 0.0), [], SpanRequest("cmpl-gone", max_tokens=50))
            await gen.__anext__()
            await gen.aclose()  # the client went away: vLLM aborts without tracing
            assert gone.finish_reason == "abort"
            stop_word = TextStream("p", 1, 0.0).next_words(3).split()[-1]
            span = SpanRequest("cmpl-stopped", max_tokens=50)
            async for _ in backend.generate(stopped, TextStream("p", 1, 0.0), [stop_word], span):
                pass
        finally:
            await backend.engine.stop()

    asyncio.run(go())
    assert stopped.finish_reason == "stop" and stopped.generated < 50
    assert backend.tracer is not None and backend.tracer.force_flush()
    spans = _spans(exporter)
    assert list(spans) == ["cmpl-stopped"]
    a = spans["cmpl-stopped"].attributes
    assert a is not None and a["gen_ai.usage.completion_tokens"] == stopped.generated
    assert stopped.last_token_at is not None and stopped.first_token_at is not None
    assert a["gen_ai.latency.time_in_model_decode"] == pytest.approx(
        stopped.last_token_at - stopped.first_token_at, abs=TOL
    )


def test_clock_skew_shifts_the_span_by_exactly_x_and_the_truth_not_at_all() -> None:
    skew = 3.25
    anchor = (time.monotonic(), time.time_ns())
    req = SimRequest("r", 10, 3)
    req.admitted_at = req.arrival + 0.001
    req.first_token_at = req.last_token_at = req.finished_at = req.arrival + 0.01
    req.generated, req.finish_reason = 3, "length"
    spans = []
    for s in (0.0, skew):
        exporter = InMemorySpanExporter()
        tracer = RequestTracer(exporter, EngineClock(s, anchor))
        tracer.record(req, SpanRequest("cmpl-r"), req.first_token_at, req.arrival + 0.02)
        assert tracer.force_flush()
        (span,) = exporter.get_finished_spans()
        spans.append(span)
    plain, skewed = spans
    assert plain.start_time is not None and skewed.start_time is not None
    assert skewed.start_time - plain.start_time == 3_250_000_000
    assert plain.end_time is not None and skewed.end_time is not None
    assert skewed.end_time - plain.end_time == 3_250_000_000
    assert skewed.attributes == plain.attributes  # durations do not move

    # through a backend configured with the skew: spans ahead of true time, the ground truth on it
    exporter = InMemorySpanExporter()
    backend = SimBackend(_cfg(clock_skew_s=-skew), span_exporter=exporter)

    async def go() -> dict[str, Any]:
        async with _client(backend) as c:
            before = time.time()
            r = await c.post(
                "/v1/completions",
                headers={"x-request-id": "skewed"},
                json={"model": MODEL, "prompt": "x y", "max_tokens": 2},
            )
            assert r.status_code == 200
            after = time.time()
            truth: dict[str, Any] = (await c.get("/sim/v1/requests/skewed")).json()
            truth["_window"] = (before, after)
            return truth

    truth = asyncio.run(go())
    (span,) = exporter.get_finished_spans()
    engine_arrival = backend.truth["skewed"].arrival
    assert span.start_time == backend.clock.true_ns(engine_arrival) - 3_250_000_000
    before, after = truth["_window"]
    assert truth["clock_skew_s"] == -skew
    assert truth["arrival_unix_s"] == backend.clock.true_ns(engine_arrival) / 1e9
    times = [truth[k] for k in ("arrival_unix_s", "admitted_unix_s", "first_token_unix_s")]
    times += [truth[k] for k in ("last_token_unix_s", "finished_unix_s")]
    assert before - 0.01 <= times[0] <= times[1] <= times[2] <= times[3] <= times[4] <= after + 0.01
    assert truth["last_token_unix_s"] == truth["finished_unix_s"]  # it ran to max_tokens


def test_otlp_http_exporter_posts_protobuf_a_receiver_decodes() -> None:
    received: list[tuple[str, ExportTraceServiceRequest]] = []
    arrived = asyncio.Event()

    async def traces(request: web.Request) -> web.Response:
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(await request.read())
        received.append((request.content_type, msg))
        arrived.set()
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def go() -> float:
        app = web.Application()
        app.router.add_post("/v1/traces", traces)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            cfg = _cfg(otlp_traces_endpoint=f"http://127.0.0.1:{port}/v1/traces", otlp_batch_delay_ms=20)
            backend = SimBackend(cfg)
            async with _client(backend) as c:
                r = await c.post(
                    "/v1/completions",
                    headers={"x-request-id": "wire", "traceparent": TRACEPARENT},
                    json={"model": MODEL, "prompt": "a b c d", "max_tokens": 4},
                )
                assert r.status_code == 200
                t0 = time.monotonic()
                await asyncio.wait_for(arrived.wait(), 5)  # after the batch delay, not at shutdown
                waited = time.monotonic() - t0
        finally:
            await runner.cleanup()
        return waited

    waited = asyncio.run(go())
    assert waited < 2
    assert len(received) == 1
    content_type, msg = received[0]
    assert content_type == "application/x-protobuf"
    (rs,) = msg.resource_spans
    resource = {kv.key: kv.value.string_value for kv in rs.resource.attributes}
    assert resource["service.name"] == "qtrap-sim"
    (ss,) = rs.scope_spans
    assert ss.scope.name == "vllm.llm_engine"
    (span,) = ss.spans
    assert span.name == "llm_request" and span.kind == span.SPAN_KIND_SERVER
    assert span.trace_id.hex() == TRACE_ID and span.parent_span_id.hex() == PARENT
    attrs = {kv.key: kv.value for kv in span.attributes}
    assert attrs["gen_ai.request.id"].string_value == "cmpl-wire"
    assert attrs["gen_ai.usage.prompt_tokens"].int_value == 4
    assert attrs["gen_ai.usage.completion_tokens"].int_value == 4
    e2e = attrs["gen_ai.latency.e2e"].double_value
    assert (span.end_time_unix_nano - span.start_time_unix_nano) / 1e9 == pytest.approx(e2e, abs=2e-9)
    assert abs(span.start_time_unix_nano / 1e9 - time.time()) < 30


def test_spans_queued_at_shutdown_are_flushed() -> None:
    exporter = InMemorySpanExporter()
    backend = SimBackend(_cfg(otlp_batch_delay_ms=60_000), span_exporter=exporter)

    async def go() -> int:
        async with _client(backend) as c:
            r = await c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
            assert r.status_code == 200
            queued = len(exporter.get_finished_spans())
        return queued

    assert asyncio.run(go()) == 0  # still in the batch when the server stopped
    assert len(exporter.get_finished_spans()) == 1


def test_tgi_timing_headers_on_non_streaming_answers_only() -> None:
    backend = SimBackend(_cfg(api="tgi"))
    inputs = "What is the capital of France?"

    async def go() -> list[tuple[str, httpx.Headers, Any]]:
        out: list[tuple[str, httpx.Headers, Any]] = []
        async with _client(backend) as c:
            for path, extra in (("/generate", {}), ("/", {"stream": False})):
                rid = f"tgi{len(out)}"
                r = await c.post(
                    path,
                    headers={"x-request-id": rid},
                    json={"inputs": inputs, "parameters": {"max_new_tokens": 7, "details": True}, **extra},
                )
                assert r.status_code == 200
                out.append((rid, r.headers, r.json()))
            for path, extra in (("/generate_stream", {}), ("/", {"stream": True})):
                async with c.stream(
                    "POST", path, json={"inputs": inputs, "parameters": {"max_new_tokens": 3}, **extra}
                ) as resp:
                    assert resp.status_code == 200
                    await resp.aread()
                    out.append(("", resp.headers, {}))
        return out

    results = asyncio.run(go())
    for rid, h, body in results[:2]:
        req = backend.truth[rid]
        assert req.admitted_at is not None and req.finished_at is not None
        details = (body[0] if isinstance(body, list) else body)["details"]
        assert h["x-generated-tokens"] == str(details["generated_tokens"]) == "7"
        assert h["x-prompt-tokens"] == str(req.prompt_tokens)
        assert h["x-compute-characters"] == str(len(inputs)) and h["x-compute-type"] == "sim-h100"
        ms = {k: int(h[k]) for k in TIMING}  # integer milliseconds
        queue_ns = round((req.admitted_at - req.arrival) * 1e9)
        inference_ns = round((req.finished_at - req.admitted_at) * 1e9)
        assert ms["x-queue-time"] == queue_ns // 1_000_000
        assert ms["x-inference-time"] == inference_ns // 1_000_000 >= 7 * STEP_S * 1e3 * 0.9
        assert ms["x-time-per-token"] == inference_ns // 7 // 1_000_000
        assert ms["x-total-time"] >= ms["x-validation-time"] + ms["x-queue-time"] + ms["x-inference-time"]
        assert ms["x-total-time"] < ms["x-inference-time"] + 50
        assert float(h["x-compute-time"]) * 1e3 == pytest.approx(ms["x-total-time"], abs=1)
    for _, h, _ in results[2:]:
        assert not any(k in h for k in (*TIMING, "x-compute-time", "x-prompt-tokens", "x-generated-tokens"))
        assert h["x-compute-type"] == "sim-h100" and h["x-accel-buffering"] == "no"


def test_tgi_header_arithmetic_follows_rust() -> None:
    """Durations truncated to whole ms (Duration::as_millis); x-compute-time is as_secs_f64's Display."""
    t = TGITimings(total_ns=2_000_000_000, validation_ns=999_999, queue_ns=1_500_000, inference_ns=70_000_001,
                   generated_tokens=3)  # fmt: skip
    assert t.headers() == {
        "x-compute-time": "2",
        "x-total-time": "2000",
        "x-validation-time": "0",
        "x-queue-time": "1",
        "x-inference-time": "70",
        "x-time-per-token": "23",
    }
    assert TGITimings(12_345, 0, 0, 0, 0).headers()["x-compute-time"] == "0.000012345"


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"api": "tgi", "otlp_traces_endpoint": "http://127.0.0.1:4318/v1/traces"}, "vLLM's API only"),
        ({"otlp_traces_endpoint": "127.0.0.1:4318"}, "http:// or https://"),
        ({"otlp_batch_delay_ms": 0}, "greater than 0"),
        ({"clock_skew_s": float("nan")}, "finite"),
    ],
)
def test_bad_tracing_options(kw: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        _cfg(**kw)


def test_no_endpoint_no_tracer() -> None:
    assert SimBackend(_cfg()).tracer is None
    assert SimBackend(_cfg(api="tgi"), span_exporter=InMemorySpanExporter()).tracer is None


def test_prompt_tokens_details_report_prefix_cache_hits_when_enabled() -> None:
    """As vLLM with --enable-prompt-tokens-details: the second identical prompt finds all but its last token
    in the prefix cache, and usage says so, streamed or not; without the flag usage has no such member."""
    prompt = "the same long prompt " * 40

    async def go(enabled: bool) -> list[dict[str, Any]]:
        backend = SimBackend(_cfg(enable_prompt_tokens_details=enabled))
        usages: list[dict[str, Any]] = []
        async with _client(backend) as client:
            for stream in (False, True):
                body: dict[str, Any] = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "stream": stream}
                if stream:
                    body["stream_options"] = {"include_usage": True}
                r = await client.post("/v1/completions", json=body)
                assert r.status_code == 200
                if stream:
                    events = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
                    usages.append(next(e["usage"] for e in events if e.get("usage")))
                else:
                    usages.append(r.json()["usage"])
        return usages

    for enabled in (False, True):
        usages = asyncio.run(go(enabled))
        if not enabled:
            assert all("prompt_tokens_details" not in u for u in usages)
            continue
        first, second = usages
        assert first["prompt_tokens_details"]["cached_tokens"] == 0
        assert second["prompt_tokens_details"]["cached_tokens"] == second["prompt_tokens"] - 1
