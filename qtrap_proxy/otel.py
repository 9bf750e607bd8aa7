"""OpenTelemetry out: one span per request, exported over OTLP/HTTP (``otel_export``, off by default).

The span is made when the request's record is final (``RecordStore.final_listeners``), so it carries the
settled energy (or null's reason), never a provisional figure; its start and end are the request's own
(``start_unix_s`` and its end at the proxy), so it sits where the request ran in the trace, and it reaches
the collector a meter update or so after the request's end (at most ``meter.settle_s`` later, plus the
batch's delay). Requests refused before a backend was chosen have spans too (final at once).

Its place in the trace: the client's (a valid ``traceparent``: its trace id, parented by its span id),
else a new trace whose id is the request id, the one the proxy sends upstream; and its own span id is
the request id's first 16 hex digits, the parent the proxy sends upstream in ``traceparent``, so an
engine's span (vLLM's ``llm_request``) is the proxy span's child.

Attributes: OpenTelemetry's gen_ai semantic conventions (``gen_ai.system``: the backend's kind,
``gen_ai.operation.name``: ``chat`` or ``text_completion``, ``gen_ai.request.model``: the pool,
``gen_ai.response.model``: the upstream's model id, ``gen_ai.usage.input_tokens``/``output_tokens``),
``http.response.status_code``, and ``qtrap.*``: ``request_id``, ``pool``, ``backend``, ``precision``,
``chain_id``, ``hop``, ``status``, ``energy_j``, ``idle_energy_j``, ``j_per_token``, ``error_bound_j``,
``energy_null_reason``, ``co2e_g``, ``cost``, ``cost_currency``, ``meter``; an attribute whose value is
null is left out. A status other than ``ok`` sets the span's status to ERROR.
"""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from qtrap_common.version import version
from qtrap_common.wire import RequestRecord
from qtrap_proxy.config import BackendConfig, OtelExportConfig
from qtrap_proxy.timeline import Timeline

log = logging.getLogger("qtrap.otel")

_OPERATIONS = {"chat": "chat", "completions": "text_completion"}  # TGI's routes: text_completion too
_RECORD_ATTRIBUTES = (
    "energy_j", "idle_energy_j", "j_per_token", "error_bound_j", "energy_null_reason", "co2e_g", "cost",
    "cost_currency", "meter", "status", "precision", "backend", "pool", "chain_id", "hop",
)  # fmt: skip


class _RequestIds(IdGenerator):
    """The ids of the span being made: the request's (set just before it starts), else random ones."""

    def __init__(self) -> None:
        self._random = RandomIdGenerator()
        self.span_id: int | None = None
        self.trace_id: int | None = None

    def generate_span_id(self) -> int:
        sid, self.span_id = self.span_id, None
        return sid if sid is not None else self._random.generate_span_id()

    def generate_trace_id(self) -> int:
        tid, self.trace_id = self.trace_id, None
        return tid if tid is not None else self._random.generate_trace_id()


class OtelExport:
    """The tracer provider, its batch processor and exporter; :meth:`on_final` makes a request's span."""

    def __init__(self, cfg: OtelExportConfig, backends: list[BackendConfig]) -> None:
        self.cfg = cfg
        self._backends = {b.name: b for b in backends}
        self._ids = _RequestIds()
        resource = Resource.create({SERVICE_NAME: cfg.service_name, "service.version": version()})
        self.provider = TracerProvider(resource=resource, id_generator=self._ids)
        exporter = OTLPSpanExporter(
            endpoint=cfg.endpoint,
            headers={k: v.get_secret_value() for k, v in cfg.headers.items()},
            timeout=cfg.timeout_s,
        )
        self.processor = BatchSpanProcessor(
            exporter, max_queue_size=cfg.max_queue, schedule_delay_millis=cfg.batch_delay_ms
        )
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("qtrap_proxy", version())
        self.spans = 0

    def on_final(self, tl: Timeline, rec: RequestRecord) -> None:
        """A final record's span (a final-record listener: on the event loop, once per request)."""
        start_ns = int(tl.start_unix_s * 1e9)
        e2e = tl.e2e_s
        end_ns = start_ns + int(max(0.0, e2e) * 1e9) if e2e is not None else start_ns
        parent = None
        if tl.trace_id is not None and tl.client_span_id is not None:
            remote = SpanContext(
                int(tl.trace_id, 16), int(tl.client_span_id, 16), is_remote=True,
                trace_flags=TraceFlags(TraceFlags.SAMPLED),
            )  # fmt: skip
            parent = trace.set_span_in_context(NonRecordingSpan(remote))
        else:
            self._ids.trace_id = int(tl.trace_id or tl.request_id, 16)
        self._ids.span_id = int(tl.span_id, 16)
        operation = _OPERATIONS.get(tl.route, "text_completion")
        model = tl.pool or ""
        span = self.tracer.start_span(
            f"{operation} {model}".strip(),
            context=parent,
            kind=SpanKind.SERVER,
            attributes=self._attributes(tl, rec, operation),
            start_time=start_ns,
        )
        self._ids.span_id = self._ids.trace_id = None
        if rec["status"] != "ok":
            span.set_status(Status(StatusCode.ERROR, rec.get("error") or rec["status"]))
        span.end(end_time=end_ns)
        self.spans += 1

    def _attributes(self, tl: Timeline, rec: RequestRecord, operation: str) -> dict[str, Any]:
        b = self._backends.get(tl.backend or "")
        attrs: dict[str, Any] = {
            "gen_ai.system": b.kind if b is not None else None,
            "gen_ai.operation.name": operation,
            "gen_ai.request.model": tl.pool,
            "gen_ai.response.model": b.model if b is not None else None,
            "gen_ai.usage.input_tokens": rec["prompt_tokens"],
            "gen_ai.usage.output_tokens": rec["completion_tokens"],
            "http.response.status_code": rec["http_status"],
            "qtrap.request_id": rec["id"],
            "qtrap.client_request_id": rec["client_request_id"],
            "qtrap.final": rec["final"],
        }
        doc: dict[str, Any] = dict(rec)
        for name in _RECORD_ATTRIBUTES:
            attrs[f"qtrap.{name}"] = doc.get(name)
        return {k: v for k, v in attrs.items() if v is not None}

    def shutdown(self) -> None:
        """Flush the spans still queued (bounded by the exporter's timeout) and stop (blocking: a thread)."""
        try:
            self.provider.shutdown()
        except Exception:
            log.exception("stopping the OpenTelemetry exporter failed")
