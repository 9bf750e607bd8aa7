"""An OpenAI-compatible backend that answers instantly (for measuring proxy overhead).

Non-streaming requests get a canned chat completion; streams get ``--chunks``
content chunks (``--interval-ms`` apart, 0 = as fast as possible; a request's own
``bench_interval_ms`` field overrides it), the usage
chunk when ``stream_options.include_usage`` asks for it, then ``[DONE]``.
Raw ASGI so the backend itself costs as little as possible.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import orjson
import uvicorn

CANNED = orjson.dumps(
    {
        "id": "cmpl-0",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }
)


def make_app(chunks: int, interval_s: float) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["path"] == "/health":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        body = b""
        more = True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        req = orjson.loads(body)
        if not req.get("stream"):
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(CANNED)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": CANNED})
            return
        so = req.get("stream_options") or {}
        gap = req.get("bench_interval_ms")
        gap_s = interval_s if gap is None else float(gap) / 1e3
        cont = bool(so.get("continuous_usage_stats"))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for i in range(chunks):
            d: dict[str, Any] = {
                "id": "c",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": "m",
                "choices": [{"index": 0, "delta": {"content": " tok"}, "finish_reason": None}],
            }
            if cont:
                d["usage"] = {"prompt_tokens": 5, "completion_tokens": i + 1, "total_tokens": 6 + i}
            await send(
                {
                    "type": "http.response.body",
                    "body": b"data: " + orjson.dumps(d) + b"\n\n",
                    "more_body": True,
                }
            )
            if gap_s:
                await asyncio.sleep(gap_s)
        tail = b""
        if so.get("include_usage"):
            u = {"prompt_tokens": 5, "completion_tokens": chunks, "total_tokens": 5 + chunks}
            tail = (
                b"data: "
                + orjson.dumps({"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": u})
                + b"\n\n"
            )
        await send({"type": "http.response.body", "body": tail + b"data: [DONE]\n\n", "more_body": False})

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--chunks", type=int, default=64)
    p.add_argument("--interval-ms", type=float, default=0.0)
    a = p.parse_args()
    uvicorn.run(
        make_app(a.chunks, a.interval_ms / 1e3),
        host="127.0.0.1",
        port=a.port,
        log_level="warning",
        access_log=False,
        backlog=4096,
    )


if __name__ == "__main__":
    main()
