"""The server's own limits (issue 13, item 7): 431 for oversized heads, 413 on every route, 503 with
Retry-After past the in-flight cap, 408 for a stalled body, a connection cap, cached /health and
paginated chain reads. Against a real proxy on loopback, under both of uvicorn's HTTP parsers."""

from __future__ import annotations

import http.client
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests

from qtrap_proxy.upstream import Health
from tests import helpers
from tests.helpers import backend, free_port
from tests.integration import fake_backend
from tests.integration.inproc import InProc, running_proxy

CHAT = orjson.dumps({"model": "echo", "messages": [{"role": "user", "content": "hi"}]})
LIMITS = {
    "max_body_bytes": 4_000,
    "max_headers": 20,
    "max_header_bytes": 2_000,
    "max_inflight_requests": 2,
    "shed_retry_after_s": 3,
    "body_timeout_s": 0.5,
    "health_cache_s": 60.0,
}


@pytest.fixture(scope="module", params=["h11", "httptools"])
def guarded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProc]:
    tmp: Path = tmp_path_factory.mktemp("guard")
    port = free_port()
    with fake_backend.running(port):
        cfg = {
            "server": LIMITS,
            "backends": [
                backend("fake-echo", port, pool="echo", model="echo", kind="openai", health_path="/health")
            ],
        }
        with running_proxy(tmp, cfg, http=request.param) as p:
            yield p


def _hostport(p: InProc) -> tuple[str, int]:
    host, port = p.url.removeprefix("http://").split(":")
    return host, int(port)


def call(
    p: InProc, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(p.url.removeprefix("http://"), timeout=20)
    try:
        conn.request(method, path, body=body, headers={"content-type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _error(body: bytes) -> dict[str, Any]:
    err = orjson.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return dict(err)


def _raw(p: InProc, head: bytes) -> socket.socket:
    s = socket.create_connection(_hostport(p), timeout=20)
    s.sendall(head)
    return s


def _read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/qtrap/v1/energy", "/health"])
def test_too_many_headers_get_431(guarded: InProc, path: str) -> None:
    method = "POST" if path.startswith("/v1") else "GET"
    status, _, body = call(guarded, method, path, CHAT, {f"x-h{i}": "v" for i in range(25)})
    assert status == 431
    assert "header lines" in _error(body)["message"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/qtrap/v1/chains/c"])
def test_oversized_headers_get_431(guarded: InProc, path: str) -> None:
    method = "POST" if path.startswith("/v1") else "GET"
    status, _, body = call(guarded, method, path, CHAT, {"x-big": "a" * 2_500})
    assert status == 431
    assert "2000" in _error(body)["message"]
    assert call(guarded, method, path, CHAT, {"x-big": "a" * 1_000})[0] != 431


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/qtrap/v1/energy"), ("GET", "/health"), ("POST", "/qtrap/v1/chains/c/score")],
)
def test_every_route_caps_the_body_with_413(guarded: InProc, method: str, path: str) -> None:
    status, headers, body = call(guarded, method, path, b"x" * 5_000)
    assert status == 413, body
    assert _error(body)["code"] == "request_too_large"
    assert headers.get("connection") == "close"


def test_a_chunked_admin_body_past_the_limit_gets_413(guarded: InProc) -> None:
    chunk = b"x" * 1_500
    head = b"POST /qtrap/v1/chains/c/score HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
    s = _raw(guarded, head + (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 3 + b"0\r\n\r\n")
    with s:
        answer = _read_all(s)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/qtrap/v1/chains/c/score"])
def test_a_stalled_body_gets_408_and_the_connection_closed(guarded: InProc, path: str) -> None:
    head = f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n"
    s = _raw(guarded, head.encode() + b'{"model": ')
    with s:
        t0 = time.monotonic()
        answer = _read_all(s)  # returns once the server closes the connection
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b"connection: close" in answer.lower()
    assert _error(answer.split(b"\r\n\r\n", 1)[1])["code"] == "request_timeout"
    assert time.monotonic() - t0 < 15


def test_past_the_inflight_cap_serving_routes_are_shed_with_503(guarded: InProc) -> None:
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 50\r\n\r\n"
    held = [_raw(guarded, head), _raw(guarded, head)]  # in flight until their bodies time out
    try:
        time.sleep(0.1)
        status, headers, body = call(guarded, "POST", "/v1/chat/completions", CHAT)
        assert status == 503, body
        assert headers["retry-after"] == "3"
        err = _error(body)
        assert err["code"] == "overloaded" and "2 requests in flight" in err["message"]
        assert call(guarded, "GET", "/v1/models")[0] == 200  # admin and listing routes are not shed
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 10
    while call(guarded, "POST", "/v1/chat/completions", CHAT)[0] == 503:
        assert time.monotonic() < deadline, "the in-flight count did not come down"
        time.sleep(0.05)
    assert call(guarded, "POST", "/v1/chat/completions", CHAT)[0] == 200


def test_health_probes_are_cached(guarded: InProc) -> None:
    b = guarded.proxy.backends[0]
    probes = 0
    real = b.probe

    async def counting(timeout_s: float) -> Health:
        nonlocal probes
        probes += 1
        return await real(timeout_s)

    b.probe = counting  # type: ignore[method-assign]
    guarded.proxy.probes.expire()
    try:
        for _ in range(5):
            status, _, body = call(guarded, "GET", "/health")
            assert status == 200 and orjson.loads(body)["backends"][0]["ok"] is True
        assert probes == 1
        guarded.proxy.probes.expire()  # the cache expired
        call(guarded, "GET", "/health")
        assert probes == 2
    finally:
        b.probe = real  # type: ignore[method-assign]


def test_chain_reads_are_paginated(guarded: InProc) -> None:
    for hop in (1, 2, 3):
        headers = {"x-qtrap-chain-id": "paged", "x-qtrap-hop": str(hop)}
        assert call(guarded, "POST", "/v1/chat/completions", CHAT, headers)[0] == 200
    status, _, body = call(guarded, "GET", "/qtrap/v1/chains/paged")
    whole = orjson.loads(body)
    assert status == 200 and len(whole["records"]) == 3 and whole["next_offset"] is None
    first = orjson.loads(call(guarded, "GET", "/qtrap/v1/chains/paged?limit=2")[2])
    assert [h["index"] for h in first["hops"]] == [1, 2] and len(first["records"]) == 2
    assert first["next_offset"] == 2 and first["requests"] == 3  # totals stay the chain's
    rest = orjson.loads(call(guarded, "GET", "/qtrap/v1/chains/paged?offset=2&limit=2")[2])
    assert [h["index"] for h in rest["hops"]] == [3] and rest["next_offset"] is None
    for query in ("limit=0", "limit=1001", "limit=x", "offset=-1"):
        status, _, body = call(guarded, "GET", f"/qtrap/v1/chains/paged?{query}")
        assert status == 400, query
        assert _error(body)["param"] in ("limit", "offset")


def test_the_served_proxy_caps_connections(tmp_path: Path) -> None:
    port, proxy_port = free_port(), free_port()
    with fake_backend.running(port):
        cfg: dict[str, Any] = {
            "server": {"max_connections": 2, "port": proxy_port},
            "backends": [backend("fake-echo", port, pool="echo", model="echo", kind="openai")],
        }
        with helpers.proxy(tmp_path, cfg):
            url = f"http://127.0.0.1:{proxy_port}/v1/models"
            assert requests.get(url, timeout=10).status_code == 200
            idle = [socket.create_connection(("127.0.0.1", proxy_port), timeout=10) for _ in range(2)]
            try:
                time.sleep(0.2)
                assert requests.get(url, timeout=10).status_code == 503
            finally:
                for s in idle:
                    s.close()
            deadline = time.monotonic() + 10
            while requests.get(url, timeout=10).status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.05)


def _refused(p: InProc) -> dict[str, float]:
    text = call(p, "GET", "/metrics")[2].decode()
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r'^qtrap_refused_requests_total\{reason="(\w+)"\} (\S+)$', text, re.M)
    }


def test_refusals_are_counted_by_reason(guarded: InProc) -> None:
    before = _refused(guarded)
    assert set(before) == {"shed", "headers", "too_large", "timeout"}
    assert (
        call(guarded, "GET", "/health", headers={f"x-h{i}": "1" for i in range(LIMITS["max_headers"] + 5)})[0]
        == 431
    )
    big = b"{" + b" " * (LIMITS["max_body_bytes"] + 10) + b"}"
    assert call(guarded, "POST", "/qtrap/v1/chains/c1/score", big)[0] == 413
    after = _refused(guarded)
    assert after["headers"] == before["headers"] + 1
    assert after["too_large"] == before["too_large"] + 1
    assert after["shed"] >= before["shed"] and after["timeout"] >= before["timeout"]
