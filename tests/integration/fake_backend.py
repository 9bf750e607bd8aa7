"""A scriptable OpenAI-compatible backend for fault tests, run in a thread on loopback.

The request's ``model`` picks the behaviour, so one server covers every case.
It records what it received, so tests can check what the proxy sent upstream.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

CANNED = orjson.dumps(
    {
        "id": "cmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "echo",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    },
    option=orjson.OPT_INDENT_2,
)  # indented on purpose: the proxy must relay bytes unchanged


def _chunk(i: int) -> bytes:
    return (
        b"data: "
        + orjson.dumps(
            {
                "id": "c",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "m",
                "choices": [{"index": 0, "delta": {"content": f" t{i}"}}],
            }
        )
        + b"\n\n"
    )


class FakeBackend:
    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/health", self.health, methods=["GET"]),
            ]
        )

    async def health(self, _: Request) -> Response:
        return Response(b"")

    async def chat(self, request: Request) -> Response:
        body = orjson.loads(await request.body())
        self.received.append(body)
        self.headers.append(dict(request.headers))
        mode = body["model"]
        if mode.startswith("status:"):
            code = int(mode.split(":")[1])
            return Response(
                orjson.dumps({"error": {"message": f"backend says {code}", "code": code}}),
                status_code=code,
                media_type="application/json",
            )
        if mode == "slow-headers":
            await asyncio.sleep(5)
        if mode in ("stream-die", "stream-stall", "stream-cut-event"):
            return StreamingResponse(self._broken(mode), media_type="text/event-stream")
        return Response(CANNED, media_type="application/json")

    async def _broken(self, mode: str) -> AsyncIterator[bytes]:
        yield _chunk(1)
        yield _chunk(2)
        if mode == "stream-stall":
            await asyncio.sleep(5)
        elif mode == "stream-cut-event":
            yield b'data: {"id": "c", "choi'
            await asyncio.sleep(0.05)
            raise RuntimeError("fake backend cuts the stream inside an event")
        raise RuntimeError("fake backend dies mid-stream")


@contextmanager
def running(port: int) -> Iterator[FakeBackend]:
    fb = FakeBackend()
    server = uvicorn.Server(uvicorn.Config(fb.app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise TimeoutError("fake backend did not start")
        time.sleep(0.02)
    try:
        yield fb
    finally:
        server.should_exit = True
        thread.join(10)
