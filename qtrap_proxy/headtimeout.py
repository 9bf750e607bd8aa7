"""A bound on the time a client may take to send a request's head (nginx's ``client_header_timeout``).

uvicorn times out idle keep-alive connections only: a client that connects and sends nothing, or
sends half a request line and stalls (slowloris), holds its connection, and a file descriptor,
forever. :func:`protocol` returns uvicorn's HTTP protocol (httptools when installed, else h11) with a
timer that answers 408 and closes the connection when a head is not complete
``server.header_timeout_s`` after the connection opened or after the first byte of a next request
(an idle keep-alive connection is closed by uvicorn's ``timeout_keep_alive``, as before).
The body's own bound is :mod:`qtrap_proxy.guard`'s ``server.body_timeout_s``.

It also bounds the connections the process holds: uvicorn's ``limit_concurrency``
(``server.max_connections``) answers requests 503 while too many connections are open, but it accepts
every connection, so a flood of connections used up the open-file limit (2 x max_connections + 256;
bench/soak.py sat at it). With ``max_open``, a connection accepted while more than ``max_open`` are
open is answered uvicorn's 503 at once and closed, before it is read.
"""

from __future__ import annotations

import asyncio
from typing import Any

from qtrap_proxy.errors import openai_error_body

_BODY = openai_error_body(
    "the request head was not complete in time (server.header_timeout_s); the connection is closed",
    "invalid_request_error",
    None,
    "request_timeout",
)
RESPONSE_503 = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 19\r\nconnection: close\r\n\r\nService Unavailable"
)
RESPONSE_408 = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_BODY), _BODY)
)


def _base() -> type[asyncio.Protocol]:
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools absent: uvicorn's "auto" picks h11 too
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol
    return HttpToolsProtocol


def protocol(
    timeout_s: float, base: type[asyncio.Protocol] | None = None, max_open: int | None = None
) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class (``base``, default as uvicorn's ``http="auto"``) with the head bound,
    and, with ``max_open``, at most that many connections kept open (those beyond get 503 and are closed)."""
    parent: Any = base or _base()

    class HeadTimeoutProtocol(parent):  # type: ignore[misc]
        _head_timer: asyncio.TimerHandle | None = None
        _head_cycle: object = None  # the request cycle when the timer was armed: a new one means a head came

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            if max_open is not None and len(self.connections) > max_open:
                transport.write(RESPONSE_503)
                transport.close()
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            # the first bytes of a next head (uvicorn's keep-alive timer stops here): the clock starts
            if self._waiting_for_head() and (self._head_timer is None or self._head_cycle is not self.cycle):
                if self._head_timer is not None:
                    self._head_timer.cancel()
                self._arm()
            super().data_received(data)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            super().connection_lost(exc)

        def _waiting_for_head(self) -> bool:
            cycle = self.cycle
            return cycle is None or bool(cycle.response_complete)

        def _arm(self) -> None:
            self._head_cycle = self.cycle
            self._head_timer = self.loop.call_later(timeout_s, self._head_expired)

        def _head_expired(self) -> None:
            self._head_timer = None
            transport = self.transport
            if transport.is_closing() or self.cycle is not self._head_cycle or not self._waiting_for_head():
                return  # a head arrived in time (its request is the body timeout's business now)
            transport.write(RESPONSE_408)
            transport.close()

    return HeadTimeoutProtocol
