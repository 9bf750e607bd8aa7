"""A logging tap between LiteLLM and qtrap-proxy: writes each request's headers (one JSON line) to
upstream-headers.jsonl and relays the request and its answer unchanged. Only to see what LiteLLM sends.

usage: header_tap.py UPSTREAM_URL PORT
"""

import asyncio
import json
import sys
from pathlib import Path

import aiohttp
from aiohttp import web

UPSTREAM = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:18080"
PORT = int(sys.argv[2]) if len(sys.argv) > 2 else 18090
HOP = {"host", "content-length", "transfer-encoding", "connection"}
LOG = Path("upstream-headers.jsonl")


def log(line: str) -> None:
    with LOG.open("a") as f:
        f.write(line + "\n")


async def relay(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    await asyncio.to_thread(log, json.dumps({"path": request.path, "headers": dict(request.headers)}))
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
    async with (
        aiohttp.ClientSession(auto_decompress=False) as s,
        s.request(request.method, UPSTREAM + request.path_qs, data=body, headers=headers) as up,
    ):
        out = web.StreamResponse(
            status=up.status, headers={k: v for k, v in up.headers.items() if k.lower() not in HOP}
        )
        await out.prepare(request)
        async for data in up.content.iter_any():
            await out.write(data)
        await out.write_eof()
        return out


app = web.Application()
app.router.add_route("*", "/{tail:.*}", relay)
web.run_app(app, host="127.0.0.1", port=PORT, print=None)
