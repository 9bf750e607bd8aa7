"""The engine's own per-request facts, as real engines report them.

* vLLM's ``llm_request`` span (vLLM 0.26.0, ``vllm/v1/engine/output_processor.py``
  ``OutputProcessor.do_tracing``): one span per request that finishes (length, EOS, stop string),
  none for one its client aborted (vLLM's ``abort_requests`` drops the request's state without
  tracing it). Kind SERVER, named ``llm_request``, started at the request's arrival on the engine's
  wall clock and ended when recorded; its parent is the caller's ``traceparent`` (a new root trace
  without one); attributes are durations in seconds measured on the engine's clock, token counts and
  the request's sampling parameters. Exported with the OpenTelemetry SDK through a
  ``BatchSpanProcessor`` and the OTLP/HTTP exporter, a ``TracerProvider`` per simulated backend.
* TGI's timing headers on a non-streaming answer (TGI's router, ``router/src/server.rs``
  ``generate``): ``x-total-time``, ``x-validation-time``, ``x-queue-time``, ``x-inference-time``,
  ``x-time-per-token`` in whole milliseconds (Rust's ``Duration::as_millis``, truncated),
  ``x-compute-time`` in seconds (``as_secs_f64``), ``x-compute-characters``, ``x-prompt-tokens``,
  ``x-generated-tokens``.

The engine keeps ``time.monotonic()`` timestamps; :class:`EngineClock` turns them into unix time
through one anchor taken at start, plus a configured skew (the engine's clock as a proxy on another
host would see it). The ground truth (``GET /sim/v1/requests/{id}``) reports the unskewed times.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Final

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from qtrap_sim.engine import SimRequest

log = logging.getLogger("qtrap.sim.tracing")

SPAN_NAME: Final = "llm_request"
SCOPE: Final = "vllm.llm_engine"  # vLLM's init_tracer("vllm.llm_engine", ...)
TRACE_HEADERS: Final = ("traceparent", "tracestate")  # what vLLM passes from the request to the engine
EXPORT_TIMEOUT_S: Final = 5.0  # one OTLP/HTTP export, retries included
SHUTDOWN_TIMEOUT_S: Final = 3.0  # flushing the spans still queued when the server stops

# vLLM's SpanAttributes (vllm/tracing.py)
TTFT: Final = "gen_ai.latency.time_to_first_token"
E2E: Final = "gen_ai.latency.e2e"
QUEUE: Final = "gen_ai.latency.time_in_queue"
PROMPT_TOKENS: Final = "gen_ai.usage.prompt_tokens"
COMPLETION_TOKENS: Final = "gen_ai.usage.completion_tokens"
PREFILL: Final = "gen_ai.latency.time_in_model_prefill"
DECODE: Final = "gen_ai.latency.time_in_model_decode"
INFERENCE: Final = "gen_ai.latency.time_in_model_inference"
REQUEST_ID: Final = "gen_ai.request.id"
TOP_P: Final = "gen_ai.request.top_p"
MAX_TOKENS: Final = "gen_ai.request.max_tokens"
TEMPERATURE: Final = "gen_ai.request.temperature"
N: Final = "gen_ai.request.n"


class EngineClock:
    """Monotonic engine times as unix time: one anchor taken at start, the skew added on top.

    Times are integer nanoseconds, so that the skew shifts every timestamp by exactly its value.
    """

    def __init__(self, skew_s: float = 0.0, anchor: tuple[float, int] | None = None) -> None:
        """``anchor``: (``time.monotonic()``, ``time.time_ns()``) read together (default: now)."""
        self.skew_s = skew_s
        self._skew_ns = round(skew_s * 1e9)
        self._mono0, self._wall0_ns = anchor if anchor is not None else (time.monotonic(), time.time_ns())

    def true_ns(self, mono: float) -> int:
        """The real unix time of a monotonic instant, in ns."""
        return self._wall0_ns + round((mono - self._mono0) * 1e9)

    def engine_ns(self, mono: float) -> int:
        """The same instant on the engine's (skewed) wall clock, in ns: what its spans say."""
        return self.true_ns(mono) + self._skew_ns

    def true_unix_s(self, mono: float | None) -> float | None:
        return None if mono is None else self.true_ns(mono) / 1e9


@dataclass(slots=True, frozen=True)
class SpanRequest:
    """What the API layer knows of a request that the span reports besides the engine's timestamps."""

    request_id: str  # vLLM's external request id: "chatcmpl-" / "cmpl-" + the client's X-Request-Id
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = 1
    carrier: Mapping[str, str] = field(default_factory=dict)  # traceparent / tracestate, as received

    @staticmethod
    def trace_headers(headers: Mapping[str, str]) -> dict[str, str]:
        """The W3C trace-context headers of a request (vLLM's ``extract_trace_headers``)."""
        return {h: v for h in TRACE_HEADERS if (v := headers.get(h)) is not None}


def span_attributes(
    req: SimRequest, spec: SpanRequest, first_seen: float | None, now: float
) -> dict[str, AttributeValue]:
    """vLLM's ``llm_request`` attributes for a finished request.

    ``first_seen``: when the front end got the request's first token (vLLM's ``first_token_latency`` is
    measured there); ``now``: when the front end saw it finish (vLLM's ``iteration_timestamp``). A phase
    the request never reached counts 0, as vLLM's zero-initialised stats make it.
    """
    arrival = req.arrival  # vLLM's arrival_time and queued_ts: the sim's front end and engine are one
    scheduled = req.admitted_at if req.admitted_at is not None else arrival
    first = req.first_token_at if req.first_token_at is not None else scheduled
    last = req.last_token_at if req.last_token_at is not None else first
    attrs: dict[str, AttributeValue] = {
        TTFT: (first_seen - arrival) if first_seen is not None else 0.0,
        E2E: now - arrival,
        QUEUE: scheduled - arrival,
        PROMPT_TOKENS: req.prompt_tokens,
        COMPLETION_TOKENS: req.generated,
        PREFILL: first - scheduled,
        DECODE: last - first,
        INFERENCE: last - scheduled,
        REQUEST_ID: spec.request_id,
    }
    # vLLM sets these when truthy (a temperature of 0 is left out)
    if spec.top_p:
        attrs[TOP_P] = spec.top_p
    if spec.max_tokens:
        attrs[MAX_TOKENS] = spec.max_tokens
    if spec.temperature:
        attrs[TEMPERATURE] = spec.temperature
    if spec.n:
        attrs[N] = spec.n
    return attrs


class RequestTracer:
    """One simulated backend's span pipeline: its own TracerProvider, never the global one."""

    def __init__(
        self,
        exporter: SpanExporter,
        clock: EngineClock,
        *,
        service_name: str = "qtrap-sim",
        instance: str | None = None,
        batch_delay_ms: float = 100.0,
    ) -> None:
        self.clock = clock
        attrs: dict[str, AttributeValue] = {"service.name": service_name}
        if instance:
            attrs["service.instance.id"] = instance
        self.provider = TracerProvider(resource=Resource.create(attrs), shutdown_on_exit=False)
        self.processor = BatchSpanProcessor(exporter, schedule_delay_millis=batch_delay_ms)
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer(SCOPE)
        self._propagator = TraceContextTextMapPropagator()
        self._closed = False

    @classmethod
    def otlp_http(
        cls, endpoint: str, clock: EngineClock, *, instance: str | None = None, batch_delay_ms: float = 100.0
    ) -> RequestTracer:
        """Export to an OTLP/HTTP receiver; ``endpoint`` is the full URL (``.../v1/traces``)."""
        exporter = OTLPSpanExporter(endpoint=endpoint, timeout=EXPORT_TIMEOUT_S)
        return cls(exporter, clock, instance=instance, batch_delay_ms=batch_delay_ms)

    def record(self, req: SimRequest, spec: SpanRequest, first_seen: float | None, now: float) -> None:
        """Record a finished request's span (cheap: the exporter's thread sends it later)."""
        if self._closed:
            return
        ctx = self._propagator.extract(dict(spec.carrier))
        span = self.tracer.start_span(
            SPAN_NAME,
            context=ctx,
            kind=SpanKind.SERVER,
            attributes=span_attributes(req, spec, first_seen, now),
            start_time=self.clock.engine_ns(req.arrival),
        )
        span.end(end_time=self.clock.engine_ns(now))

    def force_flush(self) -> bool:
        return self.processor.force_flush()

    async def shutdown(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> bool:
        """Export what is queued and stop, waiting at most about ``timeout_s``; True if it finished.

        The SDK's shutdown blocks (up to its own 30 s bound, an export up to ``EXPORT_TIMEOUT_S``), so it
        runs in a daemon thread; one still running at the bound is left behind (logged) rather than
        holding the server's exit up.
        """
        if self._closed:
            return True
        self._closed = True
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def run() -> None:
            try:
                self.provider.shutdown()  # its batch processor's final export, then the exporter's
            except Exception:  # the exporter's failures are the SDK's to log; this one is ours
                log.exception("shutting the span exporter down failed")
            finally:
                loop.call_soon_threadsafe(_set_done, done)

        threading.Thread(target=run, name="qtrap-sim-otlp-shutdown", daemon=True).start()
        try:
            await asyncio.wait_for(asyncio.shield(done), timeout_s + 1.0)
        except TimeoutError:
            log.warning("the span exporter did not finish within %.3g s; spans may be lost", timeout_s)
            return False
        return True


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


@dataclass(slots=True, frozen=True)
class TGITimings:
    """TGI's router's timing headers for one non-streaming answer (``router/src/server.rs``)."""

    total_ns: int
    validation_ns: int
    queue_ns: int
    inference_ns: int
    generated_tokens: int

    @classmethod
    def of(cls, req: SimRequest, started: float, now: float) -> TGITimings:
        """``started``: when the handler got the request (TGI's ``start_time``); ``now``: its answer.

        validation = queued - start; queue = batch start - queued; inference = answer - batch start (the
        engine's own end of the request here); time per token = inference / generated tokens.
        """
        arrival = req.arrival  # queued
        admitted = req.admitted_at if req.admitted_at is not None else arrival  # the batch's start
        end = req.finished_at if req.finished_at is not None else now
        return cls(
            total_ns=_ns(now - started),
            validation_ns=_ns(arrival - started),
            queue_ns=_ns(admitted - arrival),
            inference_ns=_ns(end - admitted),
            generated_tokens=req.generated,
        )

    def headers(self) -> dict[str, str]:
        # Rust's Duration / u32 is exact to the ns; a request that produced nothing is charged all of it
        per_token = (
            self.inference_ns // self.generated_tokens if self.generated_tokens > 0 else self.inference_ns
        )
        return {
            "x-compute-time": _rust_f64(self.total_ns / 1e9),  # seconds, as TGI's as_secs_f64()
            "x-total-time": str(self.total_ns // 1_000_000),
            "x-validation-time": str(self.validation_ns // 1_000_000),
            "x-queue-time": str(self.queue_ns // 1_000_000),
            "x-inference-time": str(self.inference_ns // 1_000_000),
            "x-time-per-token": str(per_token // 1_000_000),
        }


def _rust_f64(x: float) -> str:
    """A float as Rust's ``f64`` Display writes it: shortest round-trip digits, never an exponent,
    no ``.0`` on a whole number."""
    s = format(Decimal(repr(x)), "f")
    return s.removesuffix(".0") if "." in s and s.endswith(".0") else s


def _ns(seconds: float) -> int:
    return max(0, round(seconds * 1e9))
