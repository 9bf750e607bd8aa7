"""The relay's fault handling, in process: the routes called as ASGI apps, the backend a mock transport.

Each fault the transport seam can report (qtrap_proxy/transport.py) gets the client the answer the
proxy documents (README, "Errors"), the request's record the matching status, and the upstream answer
the right ending: released when done with, closed (aborted) when the client went away or it failed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from qtrap_common.asgi import Scope
from qtrap_proxy.app import Shutdown, close_proxy
from qtrap_proxy.config import load_config
from qtrap_proxy.openai_route import OpenAIRoute
from qtrap_proxy.proxy import Proxy
from qtrap_proxy.relay import RelayRoute
from qtrap_proxy.tgi_route import TGIRoute
from tests.unit.proxy.mock_transport import MockTransport, Script

CHAT = {"model": "p", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {**CHAT, "stream": True}


def _chunk(text: str) -> bytes:
    d = {"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": text}}]}
    return b"data: " + orjson.dumps(d) + b"\n\n"


def _tgi_chunk(text: str) -> bytes:
    return b"data:" + orjson.dumps({"token": {"id": 1, "text": text}, "generated_text": None}) + b"\n\n"


@dataclass
class Reply:
    status: int = 0
    headers: dict[bytes, bytes] = field(default_factory=dict)
    body: bytes = b""
    chunks: int = 0  # body messages with content

    @property
    def events(self) -> list[bytes]:
        return [e for e in self.body.split(b"\n\n") if e]

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Outcome:
    reply: Reply
    record: dict[str, Any]
    mock: MockTransport


def _proxy(tmp_path: Path) -> Proxy:
    backends = [
        {"name": "b", "pool": "p", "precision": "bf16", "url": "http://10.0.3.7:8000", "model": "m"},
        {"name": "t", "pool": "tp", "precision": "bf16", "url": "http://10.0.3.8:8000", "model": "m", "kind": "tgi"},
    ]  # fmt: skip
    ledger = {"path": str(tmp_path / "ledger.sqlite"), "batch_s": 0.01}
    return Proxy(load_config(data={"backends": backends, "ledger": ledger}))


async def _call(
    route: RelayRoute,
    body: dict[str, Any],
    *,
    path: str = "/v1/chat/completions",
    disconnect_when: Callable[[Reply], bool] | None = None,
    disconnect_soon: Callable[[], Awaitable[None]] | None = None,
) -> Reply:
    """Call ``route`` as uvicorn would; the client disconnects once ``disconnect_when`` holds for what
    it has received, or once ``disconnect_soon`` returns."""
    reply = Reply()
    gone = asyncio.Event()
    raw = orjson.dumps(body)
    sent_body = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(msg: dict[str, Any]) -> None:
        assert not gone.is_set(), "sent to a client that has gone"
        if msg["type"] == "http.response.start":
            reply.status = msg["status"]
            reply.headers = dict(msg["headers"])
        else:
            reply.body += msg.get("body", b"")
            reply.chunks += bool(msg.get("body"))
        if disconnect_when is not None and disconnect_when(reply):
            gone.set()

    scope: Scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())],
    }
    trigger = None
    if disconnect_soon is not None:

        async def later() -> None:
            await disconnect_soon()
            gone.set()

        trigger = asyncio.ensure_future(later())
    await asyncio.ensure_future(route(scope, receive, send))  # its own task, as under uvicorn
    if trigger is not None:
        trigger.cancel()
    return reply


def _run(
    tmp_path: Path,
    script: Script,
    body: dict[str, Any],
    *,
    tgi: str | None = None,
    disconnect_when: Callable[[Reply], bool] | None = None,
    disconnect_soon: Callable[[MockTransport], Awaitable[None]] | None = None,
) -> Outcome:
    proxy = _proxy(tmp_path)
    backend = proxy.backends[1 if tgi else 0]
    mock = MockTransport(backend.name, script, expose_address=False)
    backend.transport = mock

    async def run() -> Outcome:
        await proxy.start()
        try:
            route: RelayRoute = TGIRoute(proxy, tgi) if tgi else OpenAIRoute(proxy, chat=True)
            soon = None if disconnect_soon is None else (lambda: disconnect_soon(mock))
            path = tgi or "/v1/chat/completions"
            reply = await _call(route, body, path=path, disconnect_when=disconnect_when, disconnect_soon=soon)
            rid = mock.sent[0].headers["x-request-id"]
            record = await proxy.records.record(rid)
            assert record is not None
            return Outcome(reply, record, mock)
        finally:
            await close_proxy(proxy, Shutdown(5.0))

    return asyncio.run(run())


def _openai_error(reply: Reply, status: int) -> dict[str, Any]:
    assert reply.status == status, reply.body
    err = reply.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert reply.headers[b"x-qtrap-request-id"] and reply.headers[b"x-qtrap-backend"] == b"b"
    return err  # type: ignore[no-any-return]


def test_a_stream_relayed_to_its_end_releases_the_upstream_answer(tmp_path: Path) -> None:
    out = _run(tmp_path, Script(chunks=[_chunk("a"), _chunk("b"), b"data: [DONE]\n\n"]), STREAM)
    assert out.reply.status == 200 and out.reply.events[-1] == b"data: [DONE]"
    assert len(out.reply.events) == 3
    assert out.record["status"] == "ok" and out.record["http_status"] == 200
    resp = out.mock.responses[0]
    assert resp.released and not resp.closed
    sent = out.mock.sent[0]
    assert (sent.method, sent.path) == ("POST", "/v1/chat/completions")
    assert sent.headers["x-request-id"] == out.record["id"]
    assert orjson.loads(sent.body or b"")["stream_options"]["include_usage"] is True


def test_upstream_failing_after_two_chunks_ends_the_stream_with_the_error_event(tmp_path: Path) -> None:
    reset = ConnectionResetError(104, "Connection reset by peer")
    out = _run(tmp_path, Script(chunks=[_chunk("a"), _chunk("b"), reset]), STREAM)
    assert out.reply.status == 200
    events = out.reply.events
    assert len(events) == 4 and b'"a"' in events[0] and b'"b"' in events[1]
    assert events[-1] == b"data: [DONE]"  # the documented ending: an error event, then [DONE]
    err = orjson.loads(events[-2].removeprefix(b"data: "))["error"]
    assert err["type"] == "upstream_error" and err["code"] == 502
    assert (
        err["message"]
        == "backend b failed mid-stream: ConnectionResetError: [Errno 104] Connection reset by peer"
    )
    assert out.record["status"] == "stream_broken" and "mid-stream" in out.record["error"]
    resp = out.mock.responses[0]
    assert resp.closed and not resp.released and resp.chunks_read == 2


def test_upstream_silent_mid_stream_is_a_timeout(tmp_path: Path) -> None:
    out = _run(tmp_path, Script(chunks=[_chunk("a"), TimeoutError()]), STREAM)
    assert out.reply.status == 200 and out.reply.events[-1] == b"data: [DONE]"
    err = orjson.loads(out.reply.events[-2].removeprefix(b"data: "))["error"]
    assert err["code"] == 504 and "went silent for longer than its read timeout" in err["message"]
    assert out.record["status"] == "upstream_timeout"


def test_a_stream_cut_inside_an_event_is_broken(tmp_path: Path) -> None:
    out = _run(tmp_path, Script(chunks=[_chunk("a"), b'data: {"id": "x", "cho']), STREAM)
    assert out.reply.events[-1] == b"data: [DONE]"
    assert out.record["status"] == "stream_broken" and "inside an event" in out.record["error"]


def test_tgi_stream_failing_mid_stream_ends_with_tgis_incomplete_generation_event(tmp_path: Path) -> None:
    script = Script(chunks=[_tgi_chunk("a"), _tgi_chunk("b"), ConnectionResetError()])
    body = {"inputs": "hi", "parameters": {"max_new_tokens": 8}}
    out = _run(tmp_path, script, body, tgi="/generate_stream")
    assert out.reply.status == 200
    last = orjson.loads(out.reply.events[-1].removeprefix(b"data:"))
    assert last["error_type"] == "incomplete_generation" and "mid-stream" in last["error"]
    assert out.record["status"] == "stream_broken" and out.record["completion_tokens"] == 2


def test_upstream_timeout_before_the_head_is_a_504_in_openais_shape(tmp_path: Path) -> None:
    out = _run(tmp_path, Script(head=TimeoutError()), CHAT)
    err = _openai_error(out.reply, 504)
    assert err == {
        "message": "backend b did not answer in time",
        "type": "upstream_error",
        "param": None,
        "code": "upstream_timeout",
    }
    assert out.record["status"] == "upstream_timeout" and out.record["http_status"] == 504
    assert not out.mock.responses


def test_connect_failure_is_a_502_naming_the_backend_not_its_address(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    refused = ConnectionRefusedError(111, "Connect call failed ('10.0.3.7', 8000)")
    with caplog.at_level(logging.WARNING):
        out = _run(tmp_path, Script(head=refused), STREAM)
    err = _openai_error(out.reply, 502)
    assert err["code"] == "upstream_unreachable" and err["type"] == "upstream_error"
    assert err["message"] == (
        "backend b is unreachable: ConnectionRefusedError: [Errno 111] Connect call failed <address>"
    )
    assert out.record["status"] == "upstream_unreachable" and out.record["http_status"] == 502
    # the operator's log keeps the address
    assert (
        "backend b (http://10.0.3.7:8000) is unreachable" in caplog.text and "'10.0.3.7', 8000" in caplog.text
    )


def test_client_disconnect_mid_stream_closes_the_upstream_answer(tmp_path: Path) -> None:
    script = Script(chunks=[_chunk("a"), _chunk("b")], hang=True)
    out = _run(tmp_path, script, STREAM, disconnect_when=lambda r: r.chunks >= 2)
    assert out.reply.status == 200 and out.reply.chunks == 2
    resp = out.mock.responses[0]
    assert resp.closed and not resp.released  # the backend sees the abort and stops generating
    assert out.record["status"] == "client_disconnected" and out.record["http_status"] == 499


def test_client_disconnect_while_waiting_for_a_whole_answer_closes_it(tmp_path: Path) -> None:
    async def once_answering(mock: MockTransport) -> None:
        await mock.answered.wait()

    out = _run(tmp_path, Script(chunks=[b'{"id": '], hang=True), CHAT, disconnect_soon=once_answering)
    assert out.reply.status == 0  # nothing was sent: the client had gone
    assert out.mock.responses[0].closed and not out.mock.responses[0].released
    assert out.record["status"] == "client_disconnected"


@pytest.mark.parametrize("status", [400, 404, 429])
def test_upstream_4xx_passed_through_with_its_body_and_headers(tmp_path: Path, status: int) -> None:
    headers = [(b"Content-Type", b"application/json"), (b"X-Backend-Says", b"no"), (b"Server", b"vllm")]
    body = [b'{"error": {"message": "backend ', b'says no", "code": %d}}' % status]
    out = _run(tmp_path, Script(status=status, headers=headers, chunks=body), STREAM)
    assert out.reply.status == status
    assert out.reply.json() == {"error": {"message": "backend says no", "code": status}}
    h = out.reply.headers
    assert h[b"content-type"] == b"application/json" and h[b"x-backend-says"] == b"no"
    assert b"server" not in h and h[b"x-qtrap-backend"] == b"b"
    assert out.record["status"] == "upstream_error" and out.record["http_status"] == status
    assert out.mock.responses[0].released and not out.mock.responses[0].closed


def test_whole_answer_failing_before_the_proxy_answers_is_a_502(tmp_path: Path) -> None:
    script = Script(
        headers=[(b"content-type", b"application/json")], chunks=[b'{"id": ', ConnectionResetError()]
    )
    out = _run(tmp_path, script, CHAT)
    err = _openai_error(out.reply, 502)
    assert err["code"] == "upstream_stream_broken"
    assert err["message"] == "backend b failed before answering: ConnectionResetError"
    assert out.record["status"] == "stream_broken"
    assert out.mock.responses[0].closed
