"""The relay shared by the OpenAI and TGI routes.

A route subclass parses and validates the client's request, picks a backend,
and supplies a stream filter; this module relays the upstream response, keeps
the token timeline, and turns every fault into the right answer for the client:

* before the response has started: an error body with the right HTTP status;
* after it has started (mid-stream): an error event, then the stream ends;
* a client that disconnects: the upstream request is cancelled at once.

The backend's answer comes through its transport (``qtrap_proxy/transport.py``), which
raises nothing but the proxy's upstream errors: the relay never sees an HTTP library.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

from qtrap_common import wire
from qtrap_common.asgi import Receive, Scope, Send, header, relay_headers, run_until_disconnect, send_full
from qtrap_proxy.asgi import read_body
from qtrap_proxy.auth import principal_of
from qtrap_proxy.errors import (
    BadRequest,
    InternalError,
    QtrapError,
    UpstreamBroken,
    UpstreamConnectError,
    UpstreamError,
)
from qtrap_proxy.limits import check_client_request_id, parse_trace_context
from qtrap_proxy.proxy import AnswerEnergy, Proxy
from qtrap_proxy.sse import SSESplitter
from qtrap_proxy.timeline import Timeline, new_request_id
from qtrap_proxy.upstream import Backend

log = logging.getLogger("qtrap.relay")

# the provisional energy figure of a non-streaming answer (the final one is at /qtrap/v1/requests/{id})
H_ENERGY = wire.B_RESP_ENERGY_PROVISIONAL

_JSON = b"application/json"


class StreamFilter(ABC):
    """Inspects relayed SSE events: records tokens on the timeline, may rewrite or drop events."""

    upstream_error: str | None = None  # set when the backend itself sent an error event

    @abstractmethod
    def process(self, events: list[bytes], now: float) -> bytes:
        """The bytes to forward for these complete events (may be empty)."""

    @abstractmethod
    def error_event(self, err: QtrapError) -> bytes:
        """The bytes that end a stream the backend broke off."""


@dataclass(slots=True)
class Prepared:
    """What a route decided: where to send what, and how to watch the answer."""

    backend: Backend
    path: str
    body: bytes
    stream: bool
    filter: StreamFilter | None
    hop_split: bool = False


class RelayRoute(ABC):
    """A raw ASGI endpoint relaying one kind of request."""

    route_name: str = ""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        # the client headers forwarded upstream (server.forward_headers, checked by the config)
        self.forward = frozenset(name.encode() for name in proxy.config.server.forward_headers)

    @abstractmethod
    def prepare(self, scope: Scope, body: bytes, tl: Timeline) -> Prepared:
        """Validate the request and choose a backend; raise QtrapError subclasses for bad input."""

    @abstractmethod
    def error_body(self, err: QtrapError) -> bytes: ...

    @abstractmethod
    def account_full_body(self, tl: Timeline, body: bytes, headers: Mapping[str, str]) -> None:
        """Fill token counts from a non-streaming response."""

    def answer_body(self, tl: Timeline, body: bytes, energy: AnswerEnergy) -> bytes:
        """The non-streaming answer as sent to the client (the OpenAI routes add the energy to ``usage``)."""
        return body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        proxy = self.proxy
        tl = Timeline(new_request_id(), route=self.route_name)
        client_rid = header(scope, wire.B_REQUEST_ID)
        if client_rid is not None:  # an invalid one is ignored, not refused (limits.check_client_request_id)
            tl.client_request_id = check_client_request_id(client_rid)
        who = principal_of(scope)
        if who is not None and who.key is not None:
            tl.key_id, tl.key_label = who.key.id, who.key.label
        try:
            body = await read_body(scope, receive, proxy.config.server.max_body_bytes)
            _read_chain_headers(scope, tl)
            prep = self.prepare(scope, body, tl)
        except Exception as exc:
            e = exc if isinstance(exc, QtrapError) else _internal(exc, tl)
            tl.finish(e.label, e.status, e.message)
            proxy.end(tl, was_inflight=False)
            await send_full(send, e.status, self.error_body(e), proxy.response_headers(tl), _JSON)
            return
        tl.stream = prep.stream
        proxy.begin(tl, prep.backend, prep.hop_split)
        try:
            disconnected = await run_until_disconnect(
                # with auth on the client's Authorization is a qtrap key: never sent upstream (the gate
                # has taken it out of the scope as well)
                self._relay(
                    prep,
                    tl,
                    None if who is not None else header(scope, b"authorization"),
                    send,
                    self.forwarded(scope),
                ),
                receive,
            )
            if disconnected and tl.end is None:
                tl.finish("client_disconnected", 499, "client disconnected")
        except OSError:  # the client went away while an error was being sent to it
            if tl.end is None:
                tl.finish("client_disconnected", 499, "client disconnected")
        except Exception as e:  # a bug: log it, keep serving
            log.exception("relay of request %s failed", tl.request_id)
            if tl.end is None:
                tl.finish("internal_error", 500, f"{type(e).__name__}: {e}")
        finally:
            if tl.end is None:  # cancelled from outside (server shutdown)
                tl.finish("client_disconnected", 499, "cancelled")
            proxy.end(tl, was_inflight=True)

    def forwarded(self, scope: Scope) -> list[tuple[str, str]] | None:
        """The client's headers named in ``server.forward_headers`` (None when it names none)."""
        if not self.forward:
            return None
        return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k in self.forward]

    async def _relay(
        self,
        prep: Prepared,
        tl: Timeline,
        client_auth: str | None,
        send: Send,
        forwarded: list[tuple[str, str]] | None = None,
    ) -> None:
        started = False
        own = self.proxy.response_headers(tl)
        try:
            async with prep.backend.post(
                prep.path, prep.body, tl.request_id, client_auth, tl.traceparent, tl.tracestate, forwarded
            ) as resp:
                tl.first_byte = time.monotonic()
                # the backend's x-request-id (the proxy's own id, echoed) gives way to the proxy's header
                hdrs = [h for h in relay_headers(resp.raw_headers) if h[0] != wire.B_REQUEST_ID] + own
                if resp.status != 200:
                    data = await resp.read()
                    await send_full(send, resp.status, data, hdrs, None)
                    tl.finish("upstream_error", resp.status, data[:300].decode("utf-8", "replace"))
                    return
                if not prep.stream or prep.filter is None:
                    data = await resp.read()
                    self.account_full_body(tl, data, resp.headers)
                    self.proxy.energy.on_answer_headers(tl, resp.headers)
                    energy = self.proxy.answer_energy(tl)
                    if energy.joules is not None:
                        hdrs.append((H_ENERGY, f"{energy.joules:.6g}".encode()))
                    data = self.answer_body(tl, data, energy)
                    await send_full(send, 200, data, hdrs, None)
                    tl.finish("ok", 200)
                    return
                filt = prep.filter
                await send({"type": "http.response.start", "status": 200, "headers": hdrs})
                started = True
                splitter = SSESplitter()
                async for data in resp.aiter_bytes():
                    events = splitter.feed(data)
                    if events:
                        out = filt.process(events, time.monotonic())
                        if out:
                            await send({"type": "http.response.body", "body": out, "more_body": True})
                if splitter.pending.strip():
                    raise UpstreamBroken(
                        f"backend {prep.backend.name} ended the stream inside an event",
                        backend=prep.backend.name,
                    )
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                if filt.upstream_error is not None:
                    tl.finish("upstream_error", 200, filt.upstream_error)
                else:
                    tl.finish("ok", 200)
        except UpstreamError as err:
            if isinstance(err, UpstreamConnectError):
                log.warning(
                    "backend %s (%s) is unreachable: %s",
                    err.backend,
                    prep.backend.cfg.display_url,
                    err.detail,
                )
            if started:
                assert prep.filter is not None
                await send(
                    {"type": "http.response.body", "body": prep.filter.error_event(err), "more_body": False}
                )
                tl.finish(err.label, 200, err.message)
            else:
                await send_full(send, err.status, self.error_body(err), own, _JSON)
                tl.finish(err.label, err.status, err.message)
        except OSError:
            # uvicorn raises OSError from send() once the client is gone: same as a disconnect.
            tl.finish("client_disconnected", 499, "client disconnected")


def _internal(e: Exception, tl: Timeline) -> InternalError:
    log.error("validating request %s failed", tl.request_id, exc_info=e)
    return InternalError(
        f"internal error while validating the request ({type(e).__name__}); request {tl.request_id}"
    )


def _read_chain_headers(scope: Scope, tl: Timeline) -> None:
    tl.trace_id, tl.client_span_id, tl.tracestate = parse_trace_context(
        header(scope, wire.B_TRACEPARENT), header(scope, wire.B_TRACESTATE)
    )
    tl.chain_id = header(scope, wire.B_CHAIN_ID)
    hop = header(scope, wire.B_HOP)
    if hop is not None:
        if not hop.strip().isdigit() or int(hop) < 1:
            raise BadRequest(
                f"x-qtrap-hop must be a positive integer (1-based), got {hop!r}", param="x-qtrap-hop"
            )
        tl.hop = int(hop)
