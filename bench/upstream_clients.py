"""Upstream HTTP client choice: aiohttp vs httpx against the instant backend, in one run.

The proxy's upstream leg is an HTTP client with a connection pool. This measures,
for each library, the requests/s one process sustains and the CPU it spends per
request, non-streaming and streaming (64 chunks), at concurrency 64 and 200.

Usage:  .venv/bin/python bench/upstream_clients.py [--requests 6000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import aiohttp
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proxy_overhead import ROOT, free_port, start

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
SBODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
HDRS = {"content-type": "application/json"}


async def with_aiohttp(url: str, body: bytes, concurrency: int, total: int) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        per = total // concurrency

        async def worker() -> None:
            for _ in range(per):
                async with s.post(url, data=body, headers=HDRS) as r:
                    async for _chunk in r.content.iter_any():
                        pass

        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def with_httpx(url: str, body: bytes, concurrency: int, total: int) -> None:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=1000)
    async with httpx.AsyncClient(limits=limits, timeout=60) as c:
        per = total // concurrency

        async def worker() -> None:
            for _ in range(per):
                async with c.stream("POST", url, content=body, headers=HDRS) as r:
                    async for _chunk in r.aiter_raw():
                        pass

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=6000)
    args = ap.parse_args()
    port = free_port()
    backend = start(
        [sys.executable, str(ROOT / "bench/instant_backend.py"), "--port", str(port)],
        f"http://127.0.0.1:{port}/health",
    )
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        for kind, body, n in (("non-stream", BODY, args.requests), ("stream", SBODY, args.requests // 4)):
            for c in (64, 200):
                for name, fn in (("aiohttp", with_aiohttp), ("httpx", with_httpx)):
                    asyncio.run(fn(url, body, c, min(n, 1000)))  # warm-up
                    t0, c0 = time.perf_counter(), time.process_time()
                    asyncio.run(fn(url, body, c, n))
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                    print(
                        f"{kind:>10} c={c:>3} {name:>7}: {n / wall:8,.0f} req/s, client CPU {cpu / n * 1e6:6.0f} us/request",
                        flush=True,
                    )
    finally:
        os.killpg(backend.pid, signal.SIGTERM)
        backend.wait(10)


if __name__ == "__main__":
    main()
