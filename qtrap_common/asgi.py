"""Small raw-ASGI helpers shared by the proxy's relay routes and the simulator's streaming routes
(raw ASGI keeps the per-chunk path lean)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Any  # Callable[[], Awaitable[Message]]
Send = Any  # Callable[[Message], Awaitable[None]]

# Headers never relayed from an upstream response (hop-by-hop, or recomputed here).
_DROP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"date", b"server"})


def header(scope: Scope, name: bytes) -> str | None:
    """First value of a request header (``name`` lower-case)."""
    for k, v in scope["headers"]:
        if k == name:
            return str(v.decode("latin-1"))
    return None


def relay_headers(upstream: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(k.lower(), v) for k, v in upstream if k.lower() not in _DROP]


async def send_full(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]], content_type: bytes | None
) -> None:
    hdrs = list(headers)
    if content_type is not None:
        hdrs.append((b"content-type", content_type))
    hdrs.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def run_until_disconnect(work: Coroutine[Any, Any, None], receive: Receive) -> bool:
    """Run ``work`` until it finishes or the client disconnects, whichever is first.

    On disconnect ``work`` is cancelled at once (so upstream connections it holds
    are closed and the backend stops generating) and True is returned. ``work``
    runs in the calling task; only the disconnect watcher is a task of its own.
    """
    me = asyncio.current_task()
    assert me is not None
    disconnected = False

    async def watch() -> None:
        nonlocal disconnected
        while (await receive())["type"] != "http.disconnect":
            pass
        disconnected = True
        me.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        await work
    except asyncio.CancelledError:
        if not disconnected:
            raise
        me.uncancel()
        return True
    finally:
        watcher.cancel()
    return False
