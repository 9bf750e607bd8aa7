"""An OpenAI-compatible backend that answers instantly (for measuring proxy overhead).

Non-streaming requests get a canned chat completion; streams get ``--chunks``
content chunks (``--interval-ms`` apart, 0 = as fast as possible; a request's own
``bench_interval_ms`` field overrides it), the usage
chunk when ``stream_options.include_usage`` asks for it, then ``[DONE]``.
With ``--stamp`` each content chunk's text is the ``time.monotonic()`` at which the
backend sent it (`` 1234.567890``), and the last content chunk goes out together
with the end of the stream, so a client on the same machine can tell how late it
saw a token and how long it took to send its next request (bench/loadgen_capacity.py).
``--phase`` sets when a paced stream's chunks go out: ``arrival`` (default) every
interval from the request's arrival; ``random`` the same after a first wait drawn
uniformly from one interval, so that streams started together do not stay in step;
``step`` on the boundaries of a shared clock ticking every interval, as a batching
engine emits one token for every running request per decode step. With
``--vary-length`` a stream's length is drawn uniformly from 1 to 2 x ``--chunks`` - 1
(mean ``--chunks``), so that the requests of a closed loop do not all end together.
Raw ASGI so the backend itself costs as little as possible.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
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


def make_app(
    chunks: int, interval_s: float, stamp: bool = False, phase: str = "arrival", vary_length: bool = False
) -> Any:
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
        tail = b""
        n = random.randint(1, max(1, 2 * chunks - 1)) if vary_length else chunks
        if so.get("include_usage"):
            u = {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}
            tail = (
                b"data: "
                + orjson.dumps({"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": u})
                + b"\n\n"
            )
        tail += b"data: [DONE]\n\n"
        if gap_s and phase == "random":
            await asyncio.sleep(random.random() * gap_s)
        for i in range(n):
            if gap_s and phase == "step":
                await asyncio.sleep(gap_s - time.monotonic() % gap_s)
            last = stamp and i == n - 1  # stamped streams end with no gap after the last token
            content = f" {time.monotonic():.6f}" if stamp else " tok"
            d: dict[str, Any] = {
                "id": "c",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": "m",
                "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
            }
            if cont:
                d["usage"] = {"prompt_tokens": 5, "completion_tokens": i + 1, "total_tokens": 6 + i}
            body = b"data: " + orjson.dumps(d) + b"\n\n"
            if last:
                await send({"type": "http.response.body", "body": body + tail, "more_body": False})
                return
            await send({"type": "http.response.body", "body": body, "more_body": True})
            if gap_s and phase != "step":
                await asyncio.sleep(gap_s)
        await send({"type": "http.response.body", "body": tail, "more_body": False})

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--chunks", type=int, default=64)
    p.add_argument("--interval-ms", type=float, default=0.0)
    p.add_argument("--stamp", action="store_true", help="content chunks carry their send time")
    p.add_argument("--phase", choices=("arrival", "random", "step"), default="arrival")
    p.add_argument("--vary-length", action="store_true", help="stream lengths uniform in 1 .. 2 x chunks - 1")
    p.add_argument(
        "--loop", choices=("auto", "asyncio", "uvloop"), default="auto", help="uvicorn's event loop"
    )
    a = p.parse_args()
    uvicorn.run(
        make_app(a.chunks, a.interval_ms / 1e3, a.stamp, a.phase, a.vary_length),
        host="127.0.0.1",
        port=a.port,
        loop=a.loop,
        log_level="warning",
        access_log=False,
        backlog=4096,
        timeout_keep_alive=300,  # a closed loop of thousands of connections leaves some idle for seconds
    )


if __name__ == "__main__":
    main()
