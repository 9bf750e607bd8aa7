"""A client slow to send its request head gets 408 and its connection closed (server.header_timeout_s),
under both of uvicorn's parsers and through ``qtrap-proxy serve``; a prompt client is not disturbed."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from qtrap_proxy.headtimeout import protocol
from tests import helpers
from tests.helpers import backend, free_port
from tests.integration import fake_backend

GET = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@contextmanager
def _served(
    base: type[asyncio.Protocol], timeout_s: float = 0.5, max_open: int | None = None
) -> Iterator[int]:
    port = free_port()
    http = protocol(timeout_s, base, max_open)
    cfg = uvicorn.Config(_ok, host="127.0.0.1", port=port, log_level="critical", http=http, lifespan="off")
    server = uvicorn.Server(cfg)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def _until_closed(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def _expect_408(port: int, *sends: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        for data in sends:
            s.sendall(data)
            if data.endswith(b"\r\n\r\n"):  # a whole request: its answer first
                assert s.recv(65536).startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        answer = _until_closed(s)
    assert b"HTTP/1.1 408" in answer, answer[:300]
    assert b'"code":"request_timeout"' in answer
    assert time.monotonic() - t0 < 8


@pytest.mark.parametrize("base", [HttpToolsProtocol, H11Protocol], ids=["httptools", "h11"])
def test_slow_heads_get_408(base: type[asyncio.Protocol]) -> None:
    with _served(base) as port:
        _expect_408(port)  # connects, sends nothing
        _expect_408(port, b"GET / HTTP/1.1\r\nhost")  # half a head
        _expect_408(
            port, GET, b"GET / HT"
        )  # a prompt request, then half of a next one on the same connection
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            for _ in range(3):  # prompt requests, with pauses longer than the bound between them
                s.sendall(GET)
                assert s.recv(65536).startswith(b"HTTP/1.1 200")
                time.sleep(0.7)


def test_the_served_proxy_bounds_heads(tmp_path: Path) -> None:
    port, proxy_port = free_port(), free_port()
    with fake_backend.running(port):
        cfg: dict[str, Any] = {
            "server": {"header_timeout_s": 0.5, "port": proxy_port},
            "backends": [backend("fake-echo", port, pool="echo", model="echo", kind="openai")],
        }
        with helpers.proxy(tmp_path, cfg):
            _expect_408(proxy_port, b"POST /v1/chat/completions HTTP/1.1\r\ncontent-le")


@pytest.mark.parametrize("base", [HttpToolsProtocol, H11Protocol], ids=["httptools", "h11"])
def test_connections_past_max_open_are_closed_at_once(base: type[asyncio.Protocol]) -> None:
    """A connection flood cannot hold more than max_open connections (and their descriptors)."""
    with _served(base, timeout_s=30, max_open=3) as port:
        kept = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
        try:
            time.sleep(0.2)
            for _ in range(3):  # beyond max_open: 503 and closed at once, not after the 30 s head timeout
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    t0 = time.monotonic()
                    answer = _until_closed(s)
                    assert answer.startswith(b"HTTP/1.1 503"), answer[:100]
                    assert time.monotonic() - t0 < 2
            for s in kept:  # the first three are still open and served
                s.settimeout(0.2)
                with pytest.raises(TimeoutError):
                    s.recv(1)
                s.settimeout(10)
                s.sendall(GET)
                assert s.recv(65536).startswith(b"HTTP/1.1 200")
        finally:
            for s in kept:
                s.close()
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # room again
            s.sendall(GET)
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
