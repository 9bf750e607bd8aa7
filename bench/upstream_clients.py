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
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx

from qtrap_common.localproc import child, free_port

ROOT = Path(__file__).resolve().parent.parent


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


def measure(requests: int, url: str) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    for kind, body, n in (("non-stream", BODY, requests), ("stream", SBODY, requests // 4)):
        for c in (64, 200):
            for name, fn in (("aiohttp", with_aiohttp), ("httpx", with_httpx)):
                asyncio.run(fn(url, body, c, min(n, 1000)))  # warm-up
                t0, c0 = time.perf_counter(), time.process_time()
                asyncio.run(fn(url, body, c, n))
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                print(
                    f"{kind:>10} c={c:>3} {name:>7}: {n / wall:8,.0f} req/s, "
                    f"client CPU {cpu / n * 1e6:6.0f} us/request",
                    flush=True,
                )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=6000)
    args = ap.parse_args()
    port = free_port()
    cmd = [sys.executable, str(ROOT / "bench/instant_backend.py"), "--port", str(port)]
    log = Path(tempfile.mkdtemp(prefix="qtrap-bench-")) / "backend.log"
    with child(cmd, f"http://127.0.0.1:{port}/health", log):
        measure(args.requests, f"http://127.0.0.1:{port}/v1/chat/completions")


if __name__ == "__main__":
    main()
