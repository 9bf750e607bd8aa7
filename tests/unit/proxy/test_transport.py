"""The transport contract (qtrap_proxy/transport.py) against a raw HTTP/1.1 server on loopback, in process.

Every failure of the HTTP library must come out as the proxy's upstream error, worded once; a body is
relayed as it arrives; an aborted answer drops its connection (the backend sees its client go); a
connection the backend closed while idle in the pool is not reused for the next request.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from qtrap_proxy.config import BackendConfig, Timeouts
from qtrap_proxy.errors import UpstreamBroken, UpstreamConnectError, UpstreamTimeout
from qtrap_proxy.transport import Transport, make_transport
from tests.helpers import free_port

Handler = Callable[["Server", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
HEAD_OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nX-Prompt-Tokens: 5\r\n"


async def _request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))
    return head


class Server:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.client_went = asyncio.Event()  # a connection reached EOF from the proxy's side

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[tuple[Server, int]]:
    srv = Server(handler)
    server = await asyncio.start_server(srv._serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield srv, port
    finally:
        server.close()


@pytest.fixture(params=["aiohttp", "pyreqwest"])
def kind(request: pytest.FixtureRequest) -> str:
    """Every transport keeps the contract (pyreqwest, an optional package, when installed)."""
    if request.param == "pyreqwest":
        pytest.importorskip("pyreqwest")
    return str(request.param)


def _transport(kind: str, port: int, read_s: float = 2.0, host: str = "127.0.0.1", **kw: Any) -> Transport:
    cfg = BackendConfig(
        transport=kind,
        name="b",
        pool="p",
        precision="bf16",
        url=f"http://{host}:{port}",
        model="m",
        timeouts=Timeouts(connect_s=2.0, read_s=read_s),
        **kw,
    )
    return make_transport(cfg)


HDRS = {"Content-Type": "application/json"}


def test_answer_head_body_and_pooled_connection(kind: str) -> None:
    async def handler(srv: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            srv.requests.append(await _request(reader))
            writer.write(HEAD_OK + b"Content-Length: 5\r\n\r\nhello")
            await writer.drain()

    async def run() -> None:
        async with serving(handler) as (s, port):
            t = _transport(kind, port)
            try:
                for _ in range(3):
                    async with t.request("POST", "/v1/x", HDRS, b"{}") as resp:
                        assert resp.status == 200
                        assert (b"x-prompt-tokens", b"5") in [(k.lower(), v) for k, v in resp.raw_headers]
                        assert resp.headers.get("x-prompt-tokens") == "5"
                        assert await resp.read() == b"hello"
                async with t.request("POST", "/v1/x", HDRS, b"{}") as resp:
                    assert b"".join([c async for c in resp.aiter_bytes()]) == b"hello"
            finally:
                await t.aclose()
            assert s.connections == 1 and len(s.requests) == 4  # one pooled connection
            assert s.requests[0].startswith(b"POST /v1/x HTTP/1.1\r\n")

    asyncio.run(run())


def test_refused_connection_is_unreachable_without_the_address(kind: str) -> None:
    async def run() -> None:
        t = _transport(kind, free_port())
        try:
            with pytest.raises(UpstreamConnectError) as ei:
                await t.send("POST", "/v1/x", HDRS, b"{}")
        finally:
            await t.aclose()
        e = ei.value
        assert e.status == 502 and e.backend == "b"
        assert e.message.startswith("backend b is unreachable: ")
        assert "127.0.0.1" not in e.message and "127.0.0.1" not in e.reason
        if kind == "aiohttp":  # its error names the address: scrubbed for clients, kept for the log
            assert "<address>" in e.message and "127.0.0.1" in e.detail

    asyncio.run(run())


def test_no_head_within_the_read_timeout_is_a_timeout(kind: str) -> None:
    async def handler(srv: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        await asyncio.sleep(5)

    async def run() -> None:
        async with serving(handler) as (_, port):
            t = _transport(kind, port, read_s=0.2)
            try:
                with pytest.raises(UpstreamTimeout, match="backend b did not answer in time"):
                    await t.send("POST", "/v1/x", HDRS, b"{}")
            finally:
                await t.aclose()

    asyncio.run(run())


@pytest.mark.parametrize("streaming", [True, False])
def test_body_cut_short_is_broken(kind: str, streaming: bool) -> None:
    async def handler(srv: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(HEAD_OK + b"Content-Length: 100\r\n\r\ndata: {}\n\n")
        await writer.drain()
        await asyncio.sleep(0.05)

    async def run() -> None:
        async with serving(handler) as (_, port):
            t = _transport(kind, port)
            try:
                async with t.request("POST", "/v1/x", HDRS, b"{}") as resp:
                    got = []
                    with pytest.raises(UpstreamBroken) as ei:
                        if streaming:
                            async for c in resp.aiter_bytes():
                                got.append(c)
                        else:
                            await resp.read()
            finally:
                await t.aclose()
            e = ei.value
            assert e.status == 502 and e.label == "stream_broken"
            what = "mid-stream" if streaming else "before answering"
            assert e.message.startswith(f"backend b failed {what}: ")
            assert got == ([b"data: {}\n\n"] if streaming else [])

    asyncio.run(run())


def test_silence_mid_body_is_a_timeout(kind: str) -> None:
    async def handler(srv: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(HEAD_OK + b"Transfer-Encoding: chunked\r\n\r\n" + b"a\r\ndata: {}\n\n\r\n")
        await writer.drain()
        await asyncio.sleep(5)

    async def run() -> None:
        async with serving(handler) as (_, port):
            t = _transport(kind, port, read_s=0.2)
            try:
                async with t.request("POST", "/v1/x", HDRS, b"{}") as resp:
                    chunks = resp.aiter_bytes()
                    assert await anext(chunks) == b"data: {}\n\n"
                    with pytest.raises(UpstreamTimeout, match="went silent for longer than its read timeout"):
                        await anext(chunks)
            finally:
                await t.aclose()

    asyncio.run(run())


def test_an_aborted_answer_drops_its_connection(kind: str) -> None:
    async def handler(srv: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(HEAD_OK + b"Transfer-Encoding: chunked\r\n\r\n" + b"a\r\ndata: {}\n\n\r\n")
        await writer.drain()
        if await reader.read(1) == b"":
            srv.client_went.set()

    async def run() -> None:
        async with serving(handler) as (s, port):
            t = _transport(kind, port)
            try:
                with pytest.raises(RuntimeError):
                    async with t.request("POST", "/v1/x", HDRS, b"{}") as resp:
                        await anext(resp.aiter_bytes())
                        raise RuntimeError("the client went away")
                await asyncio.wait_for(s.client_went.wait(), 2.0)  # the backend sees the abort
            finally:
                await t.aclose()

    asyncio.run(run())


def test_a_pooled_connection_the_backend_closed_is_not_reused(kind: str) -> None:
    async def handler(srv: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _request(reader)
        writer.write(HEAD_OK + b"Content-Length: 2\r\n\r\nok")
        await writer.drain()  # keep-alive, then the backend closes the idle connection

    async def run() -> None:
        async with serving(handler) as (s, port):
            t = _transport(kind, port)
            try:
                for _ in range(3):
                    async with t.request("POST", "/v1/x", HDRS, b"{}") as resp:
                        assert await resp.read() == b"ok"
                    await asyncio.sleep(0.05)
            finally:
                await t.aclose()
            assert s.connections == 3

    asyncio.run(run())


def test_no_cookie_carried_from_one_request_to_the_next(kind: str) -> None:
    """A proxy must not send one client's backend cookies with another client's request."""

    async def handler(srv: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            srv.requests.append(await _request(reader))
            writer.write(HEAD_OK + b"Set-Cookie: session=client-a; Path=/\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async def run() -> None:
        async with serving(handler) as (s, port):
            t = _transport(kind, port, host="localhost")  # a host name: cookie jars ignore IP addresses
            try:
                for _ in range(2):
                    async with t.request("POST", "/v1/x", HDRS, b"{}") as resp:
                        assert await resp.read() == b"ok"
            finally:
                await t.aclose()
            assert len(s.requests) == 2 and b"cookie:" not in s.requests[1].lower()

    asyncio.run(run())
