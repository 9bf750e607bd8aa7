"""The server's own limits, checked before any route runs (Envoy's and nginx's defences, for one process).

:class:`Guard` wraps the whole ASGI app. For every HTTP request, in this order:

* more than ``server.max_headers`` header lines, or more than ``server.max_header_bytes`` bytes
  of header names and values together: 431;
* a declared ``content-length`` over ``server.max_body_bytes``: 413 on the admin routes (the
  serving routes answer and record their own, with a request id); a body sent without a length is
  counted as it arrives and stopped at the limit (413) on every route;
* on the serving routes (the relay's POST paths), more than ``server.max_inflight_requests``
  requests in flight: 503 with ``Retry-After: server.shed_retry_after_s`` (load shedding: the
  request is refused before its body is read, so overload costs a few microseconds a request);
* while a body is being read, a client silent for ``server.body_timeout_s`` gets 408 and its
  connection is closed (nginx's ``client_body_timeout``).

Every refusal is in OpenAI's error shape. The 413 and 408 of a body read are raised from the
``receive`` the app is handed, so a route that reads its body (the relay, admin POSTs) answers and
accounts them itself; what escapes a route before it answered is answered here.
Connections are bounded by uvicorn (``server.max_connections``, server.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection

from starlette.types import ASGIApp

from qtrap_common.asgi import Message, Receive, Scope, Send, header
from qtrap_proxy.config import ServerConfig
from qtrap_proxy.errors import PayloadTooLarge, RequestTimeout, openai_error_body

_JSON = (b"content-type", b"application/json")
_CLOSE = (b"connection", b"close")


class Guard:
    """ASGI middleware enforcing ``server.max_headers``, ``max_header_bytes``, ``max_body_bytes``,
    ``max_inflight_requests`` (on ``serving`` paths) and ``body_timeout_s``."""

    def __init__(
        self,
        app: ASGIApp,
        server: ServerConfig,
        serving: Collection[str],
        on_refuse: Callable[[str], None] | None = None,
    ) -> None:
        self.app = app
        self.on_refuse = on_refuse  # called with the reason of each refusal (qtrap_refused_requests_total)
        self.max_headers = server.max_headers
        self.max_header_bytes = server.max_header_bytes
        self.max_body_bytes = server.max_body_bytes
        self.max_inflight = server.max_inflight_requests
        self.retry_after = str(server.shed_retry_after_s).encode()
        self.body_timeout_s = server.body_timeout_s
        self.serving = frozenset(serving)
        self.inflight = 0  # requests on the serving routes now
        self.shed = 0  # requests refused with 503 since the start

    def refused(self, reason: str) -> None:
        if self.on_refuse is not None:
            self.on_refuse(reason)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        if len(headers) > self.max_headers:
            self.refused("headers")
            await _refuse(
                send,
                431,
                f"request has {len(headers)} header lines; the limit is {self.max_headers}",
                "headers",
            )
            return
        size = 0
        for name, value in headers:
            size += len(name) + len(value)
        if size > self.max_header_bytes:
            self.refused("headers")
            await _refuse(
                send,
                431,
                f"request headers total {size} bytes; the limit is {self.max_header_bytes}",
                "headers",
            )
            return
        counted = scope["method"] == "POST" and scope["path"] in self.serving
        # the relay answers (and records) its own 413 for a declared length, with its request id
        declared = None if counted else header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            self.refused("too_large")
            await _refuse(
                send,
                413,
                f"request body of {declared} bytes exceeds the limit of {self.max_body_bytes} bytes",
                "request_too_large",
                close=True,
            )
            return
        if counted:
            if self.inflight >= self.max_inflight:
                self.shed += 1
                self.refused("shed")
                await _refuse(
                    send,
                    503,
                    f"the proxy is at its limit of {self.max_inflight} requests in flight; retry later",
                    "overloaded",
                    extra=[(b"retry-after", self.retry_after)],
                    kind="server_error",
                    close=False,
                )
                return
            self.inflight += 1
        try:
            await _Request(self, receive, send).run(scope)
        finally:
            if counted:
                self.inflight -= 1


class _Request:
    """One request's receive (body limit and timeout) and send (closes the connection after a refusal)."""

    __slots__ = ("_receive", "_send", "body_done", "close", "guard", "received", "started")

    def __init__(self, guard: Guard, receive: Receive, send: Send) -> None:
        self.guard = guard
        self._receive = receive
        self._send = send
        self.body_done = False
        self.received = 0
        self.close = False  # the body was refused: close the connection after the answer
        self.started = False

    async def run(self, scope: Scope) -> None:
        try:
            await self.guard.app(scope, self.receive, self.send)
        except (PayloadTooLarge, RequestTimeout) as e:
            if self.started:
                raise
            self.close = True
            self.guard.refused("timeout" if isinstance(e, RequestTimeout) else "too_large")
            await _refuse(self._send, e.status, e.message, e.code)

    async def receive(self) -> Message:
        if self.body_done:
            return await self._receive()  # type: ignore[no-any-return]
        try:
            async with asyncio.timeout(self.guard.body_timeout_s):
                msg: Message = await self._receive()
        except TimeoutError:
            self.close = True
            raise RequestTimeout(
                f"no part of the request body arrived for {self.guard.body_timeout_s:g} s "
                "(server.body_timeout_s); the connection is closed"
            ) from None
        if msg["type"] != "http.request":
            self.body_done = True
            return msg
        self.received += len(msg.get("body", b""))
        if self.received > self.guard.max_body_bytes:
            self.close = True
            raise PayloadTooLarge(f"request body exceeds the limit of {self.guard.max_body_bytes} bytes")
        if not msg.get("more_body", False):
            self.body_done = True
        return msg

    async def send(self, msg: Message) -> None:
        if msg["type"] == "http.response.start":
            self.started = True
            if self.close:
                msg = {**msg, "headers": [*msg.get("headers", ()), _CLOSE]}
        await self._send(msg)


async def _refuse(
    send: Send,
    status: int,
    message: str,
    code: str | None,
    *,
    close: bool = True,
    extra: list[tuple[bytes, bytes]] | None = None,
    kind: str = "invalid_request_error",
) -> None:
    body = openai_error_body(message, kind, None, code)
    headers = [_JSON, (b"content-length", str(len(body)).encode()), *(extra or ())]
    if close:
        headers.append(_CLOSE)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
