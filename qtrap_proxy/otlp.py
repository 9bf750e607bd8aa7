"""The OTLP/HTTP trace receiver: vLLM's ``llm_request`` spans in, :class:`EngineFacts` out.

vLLM started with ``--otlp-traces-endpoint http://PROXY_HOST:4318/v1/traces`` (and
``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf``) exports one span per request through the
OpenTelemetry SDK's OTLP/HTTP exporter; its parent is the span id the proxy sent upstream in
``traceparent``. :class:`OtlpReceiver` listens on its own address (``otlp_receiver.host``/``port``,
the engines' side), answers ``POST /v1/traces`` as the OTLP/HTTP specification says and hands each
export request's ``llm_request`` spans, converted, to its sink in one call.

The wire:

* ``Content-Type: application/x-protobuf`` (an ``ExportTraceServiceRequest``) or ``application/json``
  (OTLP/JSON: lowerCamelCase keys, trace and span ids as hex strings, enums as integers); anything
  else is 415. ``Content-Encoding: gzip`` is accepted (the exporter's ``compression``); another
  encoding is 415.
* The body is read bounded: a ``Content-Length`` beyond ``max_body_bytes`` is 413 before any of it is
  read, a chunked body is 413 as soon as it passes the limit, and a gzip body is 413 when it inflates
  beyond it. A body not received within ``READ_TIMEOUT_S`` is 408.
* 200 carries an ``ExportTraceServiceResponse`` in the request's encoding, with ``partial_success``
  when spans were rejected; 400 (undecodable) a ``google.rpc.Status`` in the request's encoding.
  Nothing the receiver meets is answered 500 or escapes into the proxy: an unexpected failure is
  logged and answered 400 (the exporter does not retry a 400); a sink that raises is logged and the
  export is still answered 200 (retrying would not help it).

A span is converted field by field; whatever is missing, malformed or out of bounds becomes None
(ids of the wrong length or all zeros, timestamps of 0, durations that are negative, not finite or
beyond ``facts.MAX_SECONDS``, token counts beyond ``facts.MAX_TOKENS``, texts that are not 1 to 256
characters of printable ASCII). An ``llm_request`` span without a parent is passed on (the joiner
decides); one with neither a trace id, a parent span id nor a request id cannot be joined to
anything and is rejected (counted in ``partial_success.rejected_spans``). Spans of other names are
ignored (accepted, not passed on).

Decoding runs on the event loop for small bodies and in a worker thread beyond
``THREAD_DECODE_BYTES``, so a large export does not stall the proxy's relays; the sink is always
called on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final

import aiohttp
import orjson
from aiohttp import web
from google.protobuf import json_format
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from qtrap_common.background import STOP_TIMEOUT_S, stop_task
from qtrap_proxy.config import OtlpReceiverConfig
from qtrap_proxy.energy.facts import EngineFacts, finite_seconds, token_count
from qtrap_proxy.limits import MAX_ID_CHARS, bounded

log = logging.getLogger("qtrap.otlp")

TRACES_PATH: Final = "/v1/traces"  # OTLP/HTTP's default path for traces
SPAN_NAME: Final = "llm_request"  # vLLM's span, one per request
PROTOBUF: Final = "application/x-protobuf"
JSON: Final = "application/json"
READ_TIMEOUT_S: Final = 30.0  # longest an export request's body may take to arrive (408 beyond)
THREAD_DECODE_BYTES: Final = 64 * 1024  # bodies larger than this are decoded in a worker thread
LINGER_S: Final = 2.0  # after an early answer (413), the unread rest of a body is discarded this long at most
MAX_TEXT_CHARS: Final = MAX_ID_CHARS  # request ids and service names: 1 to this many printable ASCII chars
MAX_UNIX_S: Final = 1e11  # a span's timestamps beyond this (year 5138) are not believed
MAX_MESSAGE_CHARS: Final = 500  # error messages in answers

_INVALID_ARGUMENT = 3  # google.rpc.Code
_TRACE_ID_BYTES = 16
_SPAN_ID_BYTES = 8
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")

# the llm_request span's attributes (vLLM 0.26.0's SpanAttributes)
QUEUE: Final = "gen_ai.latency.time_in_queue"
TTFT: Final = "gen_ai.latency.time_to_first_token"
PREFILL: Final = "gen_ai.latency.time_in_model_prefill"
DECODE: Final = "gen_ai.latency.time_in_model_decode"
INFERENCE: Final = "gen_ai.latency.time_in_model_inference"
E2E: Final = "gen_ai.latency.e2e"
PROMPT_TOKENS: Final = "gen_ai.usage.prompt_tokens"
COMPLETION_TOKENS: Final = "gen_ai.usage.completion_tokens"
REQUEST_ID_ATTRIBUTE: Final = "gen_ai.request.id"
SERVICE_NAME_ATTRIBUTE: Final = "service.name"

FactsSink = Callable[[list[EngineFacts]], None]


class Undecodable(ValueError):
    """An export request's body that is not what its content type says (400)."""


class TooLarge(ValueError):
    """An export request's body, read or inflated, beyond ``max_body_bytes`` (413)."""


@dataclass(slots=True)
class Batch:
    """One export request, converted: the facts to pass on and what became of its spans."""

    facts: list[EngineFacts] = field(default_factory=list)
    spans: int = 0  # every span in the request
    ignored: int = 0  # spans of another name
    rejected: int = 0  # llm_request spans with nothing to join them by


# -- conversion --------------------------------------------------------------------------------------


def hex_id(raw: bytes, size: int) -> str | None:
    """A trace (16 bytes) or span (8 bytes) id as lowercase hex; None if of another length or all zeros."""
    return raw.hex() if len(raw) == size and any(raw) else None


def printable_text(v: object) -> str | None:
    """A string of 1 to MAX_TEXT_CHARS printable ASCII characters, else None."""
    if isinstance(v, str) and 0 < len(v) <= MAX_TEXT_CHARS and v.isascii() and v.isprintable():
        return v
    return None


def unix_s(ns: int) -> float | None:
    """A span's timestamp (Unix nanoseconds) in seconds; None for 0 (unset) or beyond MAX_UNIX_S."""
    s = ns / 1e9
    return s if 0 < s < MAX_UNIX_S else None


def any_value(v: Any) -> str | bool | int | float | None:
    """An OTLP ``AnyValue`` of a scalar kind as its Python value; None for arrays, maps, bytes and unset."""
    kind = v.WhichOneof("value")
    if kind == "string_value":
        return str(v.string_value)
    if kind == "int_value":
        return int(v.int_value)
    if kind == "double_value":
        return float(v.double_value)
    if kind == "bool_value":
        return bool(v.bool_value)
    return None


def attributes(kvs: Iterable[Any]) -> dict[str, str | bool | int | float | None]:
    """A repeated ``KeyValue`` field as a dict (the first of repeated keys wins)."""
    out: dict[str, str | bool | int | float | None] = {}
    for kv in kvs:
        out.setdefault(str(kv.key), any_value(kv.value))
    return out


def span_facts(span: Any, service: str | None) -> EngineFacts:
    """One ``llm_request`` span (``opentelemetry.proto.trace.v1.Span``) as engine facts."""
    attrs = attributes(span.attributes)
    return EngineFacts(
        source="otlp",
        trace_id=hex_id(bytes(span.trace_id), _TRACE_ID_BYTES),
        parent_span_id=hex_id(bytes(span.parent_span_id), _SPAN_ID_BYTES),
        request_id=printable_text(attrs.get(REQUEST_ID_ATTRIBUTE)),
        service=service,
        arrival_unix_s=unix_s(int(span.start_time_unix_nano)),
        end_unix_s=unix_s(int(span.end_time_unix_nano)),
        queue_s=finite_seconds(attrs.get(QUEUE)),
        ttft_s=finite_seconds(attrs.get(TTFT)),
        prefill_s=finite_seconds(attrs.get(PREFILL)),
        decode_s=finite_seconds(attrs.get(DECODE)),
        inference_s=finite_seconds(attrs.get(INFERENCE)),
        e2e_s=finite_seconds(attrs.get(E2E)),
        prompt_tokens=token_count(attrs.get(PROMPT_TOKENS)),
        completion_tokens=token_count(attrs.get(COMPLETION_TOKENS)),
    )


def convert(request: ExportTraceServiceRequest) -> Batch:
    """An export request's ``llm_request`` spans as engine facts, and the count of the others."""
    batch = Batch()
    for resource_spans in request.resource_spans:
        service = printable_text(attributes(resource_spans.resource.attributes).get(SERVICE_NAME_ATTRIBUTE))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                batch.spans += 1
                if span.name != SPAN_NAME:
                    batch.ignored += 1
                    continue
                facts = span_facts(span, service)
                if facts.trace_id is None and facts.parent_span_id is None and facts.request_id is None:
                    batch.rejected += 1
                    continue
                batch.facts.append(facts)
    return batch


# -- decoding ----------------------------------------------------------------------------------------


def gunzip(data: bytes, limit: int) -> bytes:
    """A gzip body inflated (concatenated members too); TooLarge past ``limit`` bytes, Undecodable if bad."""
    out = bytearray()
    rest = data
    try:
        while True:
            inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            out += inflater.decompress(rest, limit + 1 - len(out))
            if len(out) > limit:
                raise TooLarge(f"the body inflates beyond {limit} bytes")
            if not inflater.eof:
                raise Undecodable("the gzip body is truncated")
            rest = inflater.unused_data
            if not rest:
                return bytes(out)
    except zlib.error as e:
        raise Undecodable(f"the body is not valid gzip: {e}") from e


def _hex_to_base64(value: object) -> object:
    """An OTLP/JSON id (hex) as protobuf's JSON mapping spells bytes (base64); a bad one as empty bytes."""
    if isinstance(value, str):
        if len(value) <= 2 * _TRACE_ID_BYTES and _HEX.fullmatch(value):
            return base64.b64encode(bytes.fromhex(value)).decode("ascii")
        return ""  # not an id: converted to None, like an id of the wrong length
    return value  # not a string: json_format refuses it (400)


def _fix_ids(obj: object, keys: tuple[str, ...]) -> None:
    if isinstance(obj, dict):
        for key in keys:
            if key in obj:
                obj[key] = _hex_to_base64(obj[key])


def _items(obj: object, *keys: str) -> list[Any]:
    """The list under the first of ``keys`` that ``obj`` (a dict) holds; [] for anything else."""
    if isinstance(obj, dict):
        for key in keys:
            if key in obj:
                value = obj[key]
                return value if isinstance(value, list) else []
    return []


_SPAN_ID_KEYS = ("traceId", "trace_id", "spanId", "span_id", "parentSpanId", "parent_span_id")
_LINK_ID_KEYS = ("traceId", "trace_id", "spanId", "span_id")


def parse_json(body: bytes) -> ExportTraceServiceRequest:
    """An OTLP/JSON export request (hex ids, lowerCamelCase or field names, enums as integers or names)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise Undecodable(f"the body is not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise Undecodable("the body is not a JSON object")
    for resource_spans in _items(doc, "resourceSpans", "resource_spans"):
        for scope_spans in _items(resource_spans, "scopeSpans", "scope_spans"):
            for span in _items(scope_spans, "spans"):
                _fix_ids(span, _SPAN_ID_KEYS)
                for link in _items(span, "links"):
                    _fix_ids(link, _LINK_ID_KEYS)
    request = ExportTraceServiceRequest()
    try:
        json_format.ParseDict(doc, request, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, TypeError, RecursionError) as e:
        raise Undecodable(f"the body is not an OTLP/JSON ExportTraceServiceRequest: {e}") from e
    return request


def parse_protobuf(body: bytes) -> ExportTraceServiceRequest:
    """A protobuf export request."""
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(body)
    except Exception as e:  # google.protobuf.message.DecodeError, and RecursionError for deep nesting
        raise Undecodable(f"the body is not a protobuf ExportTraceServiceRequest: {e}") from e
    return request


def decode(body: bytes, *, json: bool, gzipped: bool, limit: int) -> Batch:
    """An export request's body (as received) converted; Undecodable or TooLarge when it cannot be."""
    if gzipped:
        body = gunzip(body, limit)
    return convert(parse_json(body) if json else parse_protobuf(body))


# -- answers -----------------------------------------------------------------------------------------


def _message(text: str) -> str:
    return bounded(text, MAX_MESSAGE_CHARS)


def success(*, json: bool, rejected: int = 0, message: str = "") -> web.Response:
    """200 with an ``ExportTraceServiceResponse`` (``partial_success`` when spans were rejected)."""
    response = ExportTraceServiceResponse()
    if rejected:
        response.partial_success.rejected_spans = rejected
        response.partial_success.error_message = _message(message)
    if json:
        return web.Response(
            status=200, body=json_format.MessageToJson(response, indent=None), content_type=JSON
        )
    return web.Response(status=200, body=response.SerializeToString(), content_type=PROTOBUF)


def failure(status: int, message: str, *, json: bool, close: bool = False) -> web.Response:
    """An error answer with a ``google.rpc.Status`` body in the request's encoding."""
    rpc = status_pb2.Status(code=_INVALID_ARGUMENT, message=_message(message))
    if json:
        answer = web.Response(
            status=status, body=json_format.MessageToJson(rpc, indent=None), content_type=JSON
        )
    else:
        answer = web.Response(status=status, body=rpc.SerializeToString(), content_type=PROTOBUF)
    if close:
        answer.force_close()
    return answer


# -- the server --------------------------------------------------------------------------------------


class OtlpReceiver:
    """``POST /v1/traces`` on ``cfg.host:cfg.port``: each export's ``llm_request`` spans to ``on_facts``.

    ``on_facts`` is called on the event loop, once per export request that holds at least one
    ``llm_request`` span, with that request's facts in order; it must not block. An exception it raises
    is logged and counted (``sink_errors``), never answered to the exporter as a failure.

    The counters (plain ints, read at scrape time by ``metrics.Metrics.register_otlp``): every export
    request is counted in ``requests`` and in exactly one of ``accepted`` (200), ``bad_requests`` (400,
    408), ``too_large`` (413) and ``unsupported`` (415); every span of an accepted request in ``spans``
    and in one of ``llm_spans`` (passed on), ``ignored_spans`` and ``rejected_spans``.
    """

    def __init__(self, cfg: OtlpReceiverConfig, on_facts: FactsSink) -> None:
        self.cfg = cfg
        self.on_facts = on_facts
        self.port: int | None = None  # the bound port, once started (cfg.port 0 picks a free one)
        self.requests = 0
        self.accepted = 0
        self.bad_requests = 0
        self.too_large = 0
        self.unsupported = 0
        self.spans = 0
        self.llm_spans = 0
        self.ignored_spans = 0
        self.rejected_spans = 0
        self.sink_errors = 0
        self._runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str | None:
        """The traces URL engines should export to (``--otlp-traces-endpoint``), once started."""
        if self.port is None:
            return None
        host = f"[{self.cfg.host}]" if ":" in self.cfg.host else self.cfg.host
        return f"http://{host}:{self.port}{TRACES_PATH}"

    async def start(self) -> None:
        """Listen; OSError if the address cannot be bound. Starting a started receiver does nothing."""
        if self._runner is not None:
            return
        app = web.Application()
        app.router.add_post(TRACES_PATH, self._traces)
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=STOP_TIMEOUT_S / 2,  # in-flight exports get half the stop's bound
            auto_decompress=False,  # the body is inflated here, bounded
            lingering_time=LINGER_S,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.cfg.host, self.cfg.port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        log.info("OTLP/HTTP trace receiver listening on %s", self.endpoint)

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> bool:
        """Stop listening and close the connections, within ``timeout_s``; True if it ended in time."""
        runner, self._runner = self._runner, None
        self.port = None
        if runner is None:
            return True
        task = asyncio.get_running_loop().create_task(runner.cleanup(), name="qtrap-otlp-stop")
        await asyncio.wait((task,), timeout=timeout_s)
        if task.done():
            if not task.cancelled() and (exc := task.exception()) is not None:
                log.error("OTLP receiver: stopping failed: %r", exc, exc_info=exc)
            return True
        log.error("OTLP receiver: did not stop within %.3g s; cancelling", timeout_s)
        await stop_task(task, timeout_s=0.5)
        return False

    async def __aenter__(self) -> OtlpReceiver:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # -- one export request --

    async def _traces(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        json = request.content_type == JSON
        try:
            return await self._export(request, json)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("OTLP receiver: unexpected failure on an export request; answered 400")
            self.bad_requests += 1
            return failure(400, "the export request could not be processed", json=json, close=True)

    async def _export(self, request: web.Request, json: bool) -> web.StreamResponse:
        limit = self.cfg.max_body_bytes
        if request.content_type not in (PROTOBUF, JSON):
            self.unsupported += 1
            return web.Response(
                status=415,
                text=f"Content-Type must be {PROTOBUF} or {JSON}",
                headers={"Accept-Post": f"{PROTOBUF}, {JSON}"},
            )
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("identity", "gzip"):
            self.unsupported += 1
            return web.Response(status=415, text="Content-Encoding must be gzip or identity")
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                body = await read_bounded(request, limit)
        except TooLarge as e:
            self.too_large += 1
            return failure(413, str(e), json=json, close=True)
        except TimeoutError:
            self.bad_requests += 1
            return failure(408, f"the body did not arrive within {READ_TIMEOUT_S:g} s", json=json, close=True)
        except (OSError, aiohttp.ClientError) as e:
            self.bad_requests += 1
            log.warning("OTLP receiver: reading an export request's body failed: %r", e)
            return failure(400, "the body could not be read", json=json, close=True)
        gzipped = encoding == "gzip"
        try:
            if len(body) > THREAD_DECODE_BYTES:
                batch = await asyncio.to_thread(decode, body, json=json, gzipped=gzipped, limit=limit)
            else:
                batch = decode(body, json=json, gzipped=gzipped, limit=limit)
        except TooLarge as e:
            self.too_large += 1
            return failure(413, str(e), json=json)
        except Undecodable as e:
            self.bad_requests += 1
            log.warning(
                "OTLP receiver: undecodable export request (%s): %s", request.content_type, _message(str(e))
            )
            return failure(400, str(e), json=json)
        self.accepted += 1
        self.spans += batch.spans
        self.llm_spans += len(batch.facts)
        self.ignored_spans += batch.ignored
        self.rejected_spans += batch.rejected
        if batch.facts:
            try:
                self.on_facts(batch.facts)
            except Exception:
                self.sink_errors += 1
                log.exception("OTLP receiver: the engine facts sink failed on %d span(s)", len(batch.facts))
        message = ""
        if batch.rejected:
            message = (
                f"{batch.rejected} {SPAN_NAME} span(s) had no valid trace id, parent span id or "
                f"{REQUEST_ID_ATTRIBUTE}"
            )
        return success(json=json, rejected=batch.rejected, message=message)


async def read_bounded(request: web.Request, limit: int) -> bytes:
    """A request's body, at most ``limit`` bytes: TooLarge as soon as it is known to be longer."""
    length = request.content_length
    if length is not None and length > limit:
        raise TooLarge(f"the body is {length} bytes; the limit is {limit}")
    body = bytearray()
    while chunk := await request.content.readany():
        if len(body) + len(chunk) > limit:
            raise TooLarge(f"the body is longer than the limit of {limit} bytes")
        body += chunk
    return bytes(body)
