"""Odd bytes, huge numbers and deep JSON from clients get a clear 400 (never a 500); 405s carry Allow.

The proxy runs in this process under uvicorn's h11 parser, which hands control
bytes in header values to the application (httptools, the default, refuses most
of them itself); a second check goes through the default parser of a real proxy
process in test_faults.py.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from qtrap_proxy.limits import MAX_REWRITE_DEPTH
from qtrap_proxy.openai_route import OpenAIRoute
from tests.helpers import backend, free_port
from tests.integration import fake_backend
from tests.integration.inproc import InProc, running_proxy

CHAT = orjson.dumps({"model": "echo", "messages": [{"role": "user", "content": "hi"}]})
TGI = orjson.dumps({"inputs": "hi"})
QTRAP_HEADERS = ("x-qtrap-chain-id", "x-qtrap-hop", "x-qtrap-hop-split", "x-qtrap-precision", "x-qtrap-model")


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        return orjson.loads(self.body)


def call(
    p: InProc, method: str, path: str, body: bytes | None = None, headers: dict[str, bytes] | None = None
) -> Answer:
    """One request with header values sent as raw bytes (http.client passes bytes through)."""
    conn = http.client.HTTPConnection(p.url.removeprefix("http://"), timeout=30)
    try:
        hdrs: dict[str, str | bytes] = {"content-type": "application/json", **(headers or {})}
        try:
            conn.request(method, path, body=body, headers=hdrs)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered (an early 413) and closed before the whole body went out: read the answer
        resp = conn.getresponse()
        return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProc]:
    tmp: Path = tmp_path_factory.mktemp("edge")
    port = free_port()
    with fake_backend.running(port):
        cfg = {
            "server": {"max_body_bytes": 1_000_000},
            "backends": [backend("fake-echo", port, pool="echo", model="echo", kind="openai")],
        }
        with running_proxy(tmp, cfg) as p:
            yield p


def _openai_400(a: Answer, param: str | None = None) -> str:
    assert a.status == 400, a.body
    err = a.json()["error"]  # type: ignore[index]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param, err
    return str(err["message"])


@pytest.mark.parametrize("name", QTRAP_HEADERS)
@pytest.mark.parametrize("value", [b"caf\xc3\xa9", b"\xff\xfe", b"a\x01b", b"a\x7f", b"a\tb"])
def test_odd_bytes_in_every_qtrap_header_get_400(edge: InProc, name: str, value: bytes) -> None:
    for path in ("/v1/chat/completions", "/v1/completions"):
        a = call(edge, "POST", path, CHAT, {name: value})
        assert "printable ASCII" in _openai_400(a, name)
        assert a.headers["x-qtrap-request-id"]
    # TGI's routes answer in TGI's shape
    a = call(edge, "POST", "/generate", TGI, {name: value})
    err = a.json()
    assert a.status == 400 and isinstance(err, dict) and set(err) == {"error", "error_type"}
    assert err["error_type"] == "invalid_request_error" and name in err["error"]


@pytest.mark.parametrize(
    "hop", [str(10**30).encode(), b"-1", b"0", b"10001", b"\xb2", b"1" * 5000, b"NaN", b"1" * 100]
)
def test_out_of_range_or_malformed_hop_gets_400_and_never_reaches_a_record(edge: InProc, hop: bytes) -> None:
    a = call(edge, "POST", "/v1/chat/completions", CHAT, {"x-qtrap-hop": hop, "x-qtrap-chain-id": b"c-hop"})
    _openai_400(a, "x-qtrap-hop")
    rec = _final_record(edge, a.headers["x-qtrap-request-id"])
    assert rec["status"] == "bad_request" and rec["hop"] is None and rec["chain_id"] is None
    assert len(str(rec["error"])) < 300


def test_chain_id_longer_than_the_limit_gets_400(edge: InProc) -> None:
    a = call(edge, "POST", "/v1/chat/completions", CHAT, {"x-qtrap-chain-id": b"c" * 257})
    assert "256" in _openai_400(a, "x-qtrap-chain-id")
    ok = call(
        edge, "POST", "/v1/chat/completions", CHAT, {"x-qtrap-chain-id": b"c" * 256, "x-qtrap-hop": b"3"}
    )
    assert ok.status == 200
    rec = _final_record(edge, ok.headers["x-qtrap-request-id"])
    assert rec["chain_id"] == "c" * 256 and rec["hop"] == 3


def _final_record(p: InProc, rid: str) -> dict[str, object]:
    deadline = time.monotonic() + 10
    while True:
        a = call(p, "GET", f"/qtrap/v1/requests/{rid}")
        rec = a.json()
        assert isinstance(rec, dict)
        if rec.get("final"):
            return rec
        assert time.monotonic() < deadline, "the record did not become final"
        time.sleep(0.02)


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000,
        b'{"model": "echo", "messages": ' + b"[" * 100_000,
        b'{"model": "\xff\xfe"}',
        b"\xc3\x28",
    ],
    ids=["nested-array", "nested-field", "invalid-utf8-string", "invalid-utf8"],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/qtrap/v1/chains/c/score"])
def test_deep_json_and_invalid_utf8_bodies_get_400(edge: InProc, path: str, body: bytes) -> None:
    assert "not valid JSON" in _openai_400(call(edge, "POST", path, body))


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_json_too_deep_to_relay_gets_400_not_500(edge: InProc, path: str) -> None:
    """The fuzz test's find: 255 to 1024 levels parse, but orjson cannot write them back (a 500, no record)."""
    field = b'"messages"' if path.endswith("chat/completions") else b'"prompt"'

    def body(depth: int) -> bytes:  # the object around the field is one level
        return b'{"model": "echo", ' + field + b": " + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"

    assert (
        call(edge, "POST", path, body(MAX_REWRITE_DEPTH)).headers.get("x-qtrap-backend") == "fake-echo"
    )  # relayed
    a = call(edge, "POST", path, body(MAX_REWRITE_DEPTH + 1))
    assert f"deeper than {MAX_REWRITE_DEPTH} levels" in _openai_400(a)
    rec = _final_record(edge, a.headers["x-qtrap-request-id"])
    assert rec["status"] == "bad_request"
    assert "deeper than" in _openai_400(call(edge, "POST", path, body(1_000)))


def test_a_bug_in_validation_is_answered_in_the_error_shape_and_recorded(
    edge: InProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever escapes a route's checks is a 500 in the route's error shape with its request id and record
    (a bare 500, without a record, before)."""

    def broken(*_: object) -> None:
        raise ZeroDivisionError("planted")

    monkeypatch.setattr(OpenAIRoute, "prepare_checked", broken)
    a = call(edge, "POST", "/v1/chat/completions", CHAT)
    assert a.status == 500, a.body
    err = a.json()["error"]  # type: ignore[index]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == "internal_error"
    assert "ZeroDivisionError" in err["message"] and "planted" not in err["message"]
    monkeypatch.undo()
    rec = _final_record(edge, a.headers["x-qtrap-request-id"])
    assert rec["status"] == "internal_error" and rec["http_status"] == 500


def test_tgi_deep_json_gets_400_in_tgi_shape(edge: InProc) -> None:
    a = call(edge, "POST", "/generate", b"[" * 100_000)
    assert a.status == 400 and "not valid JSON" in str(a.json()["error"])  # type: ignore[index]


def test_score_body_and_path_limits(edge: InProc) -> None:
    ok = call(
        edge, "POST", "/v1/chat/completions", CHAT, {"x-qtrap-chain-id": b"scored", "x-qtrap-hop": b"1"}
    )
    assert ok.status == 200
    path = "/qtrap/v1/chains/scored/score"
    for hops in (10**30, -1, 0, 10_001, True, "2"):
        assert "'hops'" in _openai_400(call(edge, "POST", path, _score(hops)), "hops")
    _openai_400(call(edge, "POST", path, b'{"correct": "yes"}'), "correct")
    big = call(edge, "POST", path, b'{"correct": true, "pad": "' + b"x" * 1_100_000 + b'"}')
    assert big.status == 413 and big.json()["error"]["code"] == "request_too_large"  # type: ignore[index]
    a = call(edge, "POST", path, _score(1))
    assert a.status == 200 and a.json()["counted"] is True  # type: ignore[index]
    for bad_path in ("/qtrap/v1/chains/" + "c" * 257, "/qtrap/v1/requests/" + "r" * 257):
        _openai_400(call(edge, "GET", bad_path))
    _openai_400(call(edge, "POST", "/qtrap/v1/chains/" + "c" * 257 + "/score", _score(1)))
    _openai_400(call(edge, "GET", "/qtrap/v1/chains/a%01b"))


def _score(hops: object) -> bytes:
    return json.dumps({"correct": True, "hops": hops}).encode()  # the stdlib writes any int


@pytest.mark.parametrize(
    ("path", "wrong", "allow"),
    [
        ("/v1/chat/completions", "GET", "POST"),
        ("/v1/completions", "PUT", "POST"),
        ("/generate", "GET", "POST"),
        ("/generate_stream", "DELETE", "POST"),
        ("/", "GET", "POST"),
        ("/v1/models", "POST", "GET, HEAD"),
        ("/health", "POST", "GET, HEAD"),
        ("/metrics", "DELETE", "GET, HEAD"),
        ("/qtrap/v1/requests/x", "POST", "GET, HEAD"),
        ("/qtrap/v1/chains/x", "PUT", "GET, HEAD"),
        ("/qtrap/v1/chains/x/score", "GET", "POST"),
        ("/qtrap/v1/energy", "POST", "GET, HEAD"),
    ],
)
def test_wrong_method_gets_405_with_allow(edge: InProc, path: str, wrong: str, allow: str) -> None:
    a = call(edge, wrong, path, b"{}" if wrong != "GET" else None)
    assert a.status == 405, (path, a.status, a.body)
    assert {m.strip() for m in a.headers["allow"].split(",")} == {m.strip() for m in allow.split(",")}
    err = a.json()["error"]  # type: ignore[index]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_bad_requests_are_counted_as_bad_request(edge: InProc) -> None:
    def count() -> float:
        text = call(edge, "GET", "/metrics").body.decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("qtrap_requests_total{") and 'status="bad_request"' in line
        )

    before = count()
    call(edge, "POST", "/v1/chat/completions", CHAT, {"x-qtrap-hop": b"\xff"})
    assert count() == before + 1
