"""The upstream transport: how the proxy sends a request to a backend and reads the answer.

The relay and the health probes see only :class:`Transport` and :class:`UpstreamResponse`; the HTTP
client library that does the work is known to one class, :class:`AiohttpTransport`. Every failure of
that library is mapped here, once, to the proxy's upstream errors (``qtrap_proxy/errors.py``), worded
by :class:`UpstreamFaults` so that every transport (the in-process mock of the tests included) says
the same:

=====================================  ===================================  ===========
where                                  what failed                          error
=====================================  ===================================  ===========
``send`` (before the answer's head)    no connection, reset, refused, ...   UpstreamConnectError (502)
``send``                               connect or read timeout              UpstreamTimeout (504)
body (``read``, ``aiter_bytes``)       silent past the read timeout         UpstreamTimeout (504)
body                                   connection lost, bad framing, ...    UpstreamBroken (502)
=====================================  ===================================  ===========

Nothing else escapes a transport but cancellation. A transport owns one backend's connection pool
(``max_connections``, idle connections kept 60 s); ``aclose`` closes it.

The per-chunk path is kept as short as the library allows: :meth:`UpstreamResponse.aiter_bytes`
yields the library's own buffers as they arrive (no copy, no task), and the relay splits SSE itself.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import aiohttp

from qtrap_proxy.config import BackendConfig, Timeouts
from qtrap_proxy.errors import (
    ConfigError,
    UpstreamBroken,
    UpstreamConnectError,
    UpstreamError,
    UpstreamTimeout,
)
from qtrap_proxy.redact import redact_urls_in, scrub_addresses

KEEPALIVE_S = 60.0  # how long an idle pooled connection is kept


class UpstreamResponse(ABC):
    """A backend's answer whose head has arrived; its body is read once, whole or in chunks.

    Body reads raise only :class:`UpstreamTimeout` and :class:`UpstreamBroken`.
    """

    __slots__ = ("headers", "raw_headers", "status")

    status: int
    raw_headers: Sequence[tuple[bytes, bytes]]  # as received, in order
    headers: Mapping[str, str]  # the same, looked up by lower-case name

    @abstractmethod
    def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (no empty chunks); ends with the body."""

    @abstractmethod
    async def read(self) -> bytes:
        """The whole body."""

    @abstractmethod
    def close(self) -> None:
        """Abort: drop the connection at once (the backend sees the client go and stops generating)."""

    @abstractmethod
    def release(self) -> None:
        """Done: the connection goes back to the pool if the body was read to its end, else it is dropped."""


class Transport(ABC):
    """Sends requests to one backend over its connection pool."""

    @abstractmethod
    async def send(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes | None = None,
        *,
        timeouts: Timeouts | None = None,
    ) -> UpstreamResponse:
        """Send a request (``path`` is appended to the backend's URL) and wait for the answer's head.

        ``timeouts`` replaces the backend's (``connect_s``: connecting; ``read_s``: the longest silence,
        for the head or between body chunks). Raises :class:`UpstreamConnectError` or
        :class:`UpstreamTimeout`. The caller must ``close`` or ``release`` the answer.
        """

    @abstractmethod
    async def aclose(self) -> None:
        """Close the connection pool."""

    @asynccontextmanager
    async def request(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes | None = None,
        *,
        timeouts: Timeouts | None = None,
    ) -> AsyncIterator[UpstreamResponse]:
        """:meth:`send`, the answer released when the block ends and closed (aborted) if it raises or is
        cancelled."""
        resp = await self.send(method, path, headers, body, timeouts=timeouts)
        try:
            yield resp
        except BaseException:
            resp.close()
            raise
        else:
            resp.release()


class UpstreamFaults:
    """The proxy's upstream errors for one backend, worded the same by every transport.

    What clients and ``/health`` see names the backend, not its address (unless ``expose_address``) and
    never its credentials (``qtrap_proxy/redact.py``); the error's ``detail``, for the proxy's log, keeps
    the address.
    """

    __slots__ = ("expose_address", "name")

    def __init__(self, name: str, expose_address: bool = False) -> None:
        self.name = name
        self.expose_address = expose_address

    def public(self, reason: str) -> str:
        return redact_urls_in(reason) if self.expose_address else scrub_addresses(reason)

    def before_head(self, e: BaseException, desc: str | None = None) -> UpstreamError:
        """A failure before the answer's head: the backend is unreachable, or did not answer in time
        (``desc``: how to describe ``e``, if not by its class and text)."""
        desc = describe(e) if desc is None else desc
        if isinstance(e, TimeoutError):
            return UpstreamTimeout(
                f"backend {self.name} did not answer in time",
                backend=self.name,
                reason=self.public(desc),
                detail=redact_urls_in(desc),
            )
        reason = self.public(desc)
        return UpstreamConnectError(
            f"backend {self.name} is unreachable: {reason}",
            backend=self.name,
            reason=reason,
            detail=redact_urls_in(desc),
        )

    def in_body(self, e: BaseException, *, streaming: bool, desc: str | None = None) -> UpstreamError:
        """A failure while reading the body (``streaming``: in chunks, to a client whose stream has
        started; else the whole body, before the proxy answers)."""
        desc = describe(e) if desc is None else desc
        if isinstance(e, TimeoutError):
            return UpstreamTimeout(
                f"backend {self.name} went silent for longer than its read timeout",
                backend=self.name,
                reason=self.public(desc),
                detail=redact_urls_in(desc),
            )
        what = "mid-stream" if streaming else "before answering"
        reason = self.public(desc)
        return UpstreamBroken(
            f"backend {self.name} failed {what}: {reason}",
            backend=self.name,
            reason=reason,
            detail=redact_urls_in(desc),
        )


def describe(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# -- aiohttp -----------------------------------------------------------------------------------------------

# What aiohttp raises for a failed request or body read (its own errors, and the OSError family, timeouts
# included, that it lets through in places); everything else is a bug and propagates.
_AIOHTTP_FAILURES = (aiohttp.ClientError, OSError)


class AiohttpTransport(Transport):
    """One pooled ``aiohttp.ClientSession`` per backend (created on first use, inside the event loop)."""

    def __init__(self, cfg: BackendConfig) -> None:
        self.faults = UpstreamFaults(cfg.name, cfg.expose_address)
        self._base = cfg.url
        self._max_connections = cfg.max_connections
        self._timeout = _client_timeout(cfg.timeouts)
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections,
                limit_per_host=0,
                ttl_dns_cache=300,
                keepalive_timeout=KEEPALIVE_S,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
                cookie_jar=aiohttp.DummyCookieJar(),  # no backend cookie carried from one client to another
            )
        return self._session

    async def send(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes | None = None,
        *,
        timeouts: Timeouts | None = None,
    ) -> UpstreamResponse:
        kw: dict[str, Any] = {} if timeouts is None else {"timeout": _client_timeout(timeouts)}
        try:
            resp = await self.session.request(method, self._base + path, data=body, headers=headers, **kw)
        except _AIOHTTP_FAILURES as e:
            raise self.faults.before_head(e) from e
        return _AiohttpResponse(resp, self.faults)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _client_timeout(t: Timeouts) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=None, sock_connect=t.connect_s, sock_read=t.read_s)


class _AiohttpResponse(UpstreamResponse):
    __slots__ = ("_faults", "_resp")

    def __init__(self, resp: aiohttp.ClientResponse, faults: UpstreamFaults) -> None:
        self.status = resp.status
        self.raw_headers = resp.raw_headers
        self.headers = resp.headers
        self._resp = resp
        self._faults = faults

    def aiter_bytes(self) -> AsyncIterator[bytes]:
        return _AiohttpChunks(self._resp.content, self._faults)

    async def read(self) -> bytes:
        try:
            return await self._resp.read()
        except _AIOHTTP_FAILURES as e:
            raise self._faults.in_body(e, streaming=False) from e

    def close(self) -> None:
        self._resp.close()

    def release(self) -> None:
        self._resp.release()


class _AiohttpChunks:
    """``StreamReader.iter_any`` with aiohttp's errors mapped: one await of ``readany`` per chunk."""

    __slots__ = ("_content", "_faults")

    def __init__(self, content: aiohttp.StreamReader, faults: UpstreamFaults) -> None:
        self._content = content
        self._faults = faults

    def __aiter__(self) -> _AiohttpChunks:
        return self

    async def __anext__(self) -> bytes:
        try:
            data = await self._content.readany()
        except _AIOHTTP_FAILURES as e:
            raise self._faults.in_body(e, streaming=True) from e
        if not data:
            raise StopAsyncIteration
        return data


# -- pyreqwest (optional: pip install pyreqwest) --------------------------------------------------------------


class PyreqwestTransport(Transport):
    """reqwest (Rust, hyper's pool) through pyreqwest: the requests run on pyreqwest's own tokio threads.

    Experimental (``backends[].transport: pyreqwest``): measured in docs/benchmarks.md, "Upstream clients
    behind the transport seam (issue 14)"."""

    def __init__(self, cfg: BackendConfig) -> None:
        try:
            import pyreqwest.exceptions
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ConfigError(
                f"backends[{cfg.name}].transport: pyreqwest is not installed (pip install pyreqwest)"
            ) from e
        self._errors: tuple[type[BaseException], ...] = (pyreqwest.exceptions.PyreqwestError, OSError)
        self.faults = UpstreamFaults(cfg.name, cfg.expose_address)
        self._base = cfg.url
        self._cfg = cfg
        self._client: Any = None

    def _build(self) -> Any:
        from pyreqwest.client import ClientBuilder

        t = self._cfg.timeouts
        return (
            ClientBuilder()
            .max_connections(self._cfg.max_connections)
            .connect_timeout(timedelta(seconds=t.connect_s))
            .read_timeout(timedelta(seconds=t.read_s))
            .pool_idle_timeout(timedelta(seconds=KEEPALIVE_S))
            .http1_only()
            .build()
        )

    async def send(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes | None = None,
        *,
        timeouts: Timeouts | None = None,
    ) -> UpstreamResponse:
        if self._client is None:
            self._client = self._build()
        builder = self._client.request(method, self._base + path).headers(headers)
        if body is not None:
            builder = builder.body_bytes(body)
        if timeouts is not None:
            raise NotImplementedError("pyreqwest: per-request timeouts (reqwest has a total deadline only)")
        req = builder.streamed_read_buffer_limit(0).build_streamed()  # 0: the head alone, no body read ahead
        try:
            resp = await req.__aenter__()
        except self._errors as e:
            raise self.faults.before_head(e, _reqwest_describe(e)) from e
        return _ReqwestResponse(req, resp, self.faults, self._errors)

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()


def _reqwest_describe(e: BaseException) -> str:
    """A pyreqwest error in short: its class, message and innermost cause (its details name the URL)."""
    details = e.args[1] if len(e.args) > 1 and isinstance(e.args[1], dict) else {}
    causes = details.get("causes") or []
    last = causes[-1].get("message") if causes and isinstance(causes[-1], dict) else None
    text = str(e.args[0]) if e.args else ""
    return f"{type(e).__name__}: {text}" + (f" ({last})" if last else "")


class _ReqwestResponse(UpstreamResponse):
    __slots__ = ("_errors", "_faults", "_open", "_req", "_resp")

    def __init__(
        self, req: Any, resp: Any, faults: UpstreamFaults, errors: tuple[type[BaseException], ...]
    ) -> None:
        self.status = int(resp.status)
        items = list(resp.headers.items())
        self.raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in items]
        self.headers = dict(items)  # the http crate's names are lower-case
        self._req = req
        self._resp = resp
        self._faults = faults
        self._errors = errors
        self._open = True

    def aiter_bytes(self) -> AsyncIterator[bytes]:
        return _ReqwestChunks(self._resp.body_reader, self._faults, self._errors)

    async def read(self) -> bytes:
        try:
            data = await self._resp.body_reader.bytes()
        except self._errors as e:
            raise self._faults.in_body(e, streaming=False, desc=_reqwest_describe(e)) from e
        return bytes(data.to_bytes())

    def _finish(self) -> None:
        if self._open:
            self._open = False
            task = asyncio.get_running_loop().create_task(self._req.__aexit__(None, None, None))
            _PENDING.add(task)
            task.add_done_callback(_PENDING.discard)

    def close(self) -> None:
        self._finish()  # an unfinished body is dropped with its connection

    def release(self) -> None:
        self._finish()


_PENDING: set[asyncio.Task[Any]] = set()  # responses being closed (a task holds no reference to itself)


class _ReqwestChunks:
    __slots__ = ("_errors", "_faults", "_reader")

    def __init__(self, reader: Any, faults: UpstreamFaults, errors: tuple[type[BaseException], ...]) -> None:
        self._reader = reader
        self._faults = faults
        self._errors = errors

    def __aiter__(self) -> _ReqwestChunks:
        return self

    async def __anext__(self) -> bytes:
        try:
            data = await self._reader.read_chunk()
        except self._errors as e:
            raise self._faults.in_body(e, streaming=True, desc=_reqwest_describe(e)) from e
        if data is None:
            raise StopAsyncIteration
        return bytes(data.to_bytes())


TRANSPORTS: dict[str, Callable[[BackendConfig], Transport]] = {
    "aiohttp": AiohttpTransport,
    "pyreqwest": PyreqwestTransport,
}


def make_transport(cfg: BackendConfig) -> Transport:
    """The transport a backend's configuration asks for (``backends[].transport``)."""
    return TRANSPORTS[cfg.transport](cfg)
