"""Upstream HTTP client choice: aiohttp against the alternatives, CPU per request, in one run.

The proxy's upstream leg is an HTTP client with a connection pool (behind qtrap_proxy/transport.py).
This measures, for each library, the CPU one client process spends per request (process CPU time, all
threads, over the requests: not wall time) and the requests/s it sustains against the instant backend,
non-streaming and streaming (``--chunks`` chunks a stream, each read as it arrives), at the given
concurrencies. Each (workload, concurrency) cell is measured ``--repeat`` times; within a repetition the
clients run back to back in a rotating order and each one's CPU is also given as a ratio to aiohttp's of
that repetition, so drifts in machine load hit all alike.

Clients (each skipped, with a note, when its package is not installed):
  aiohttp    aiohttp.ClientSession (the proxy's)               pip: aiohttp
  httpx      httpx.AsyncClient                                  pip: httpx
  httpcore   httpcore.AsyncConnectionPool (httpx's transport)   pip: httpcore
  aiosonic   aiosonic.HTTPClient                                pip: aiosonic
  niquests   niquests.AsyncSession                              pip: niquests
  curl_cffi  curl_cffi.requests.AsyncSession (a curl multi handle on the event loop)  pip: curl-cffi
  pycurl     a pycurl multi handle driven by the event loop (socket_action; written here)  pip: pycurl
  pyreqwest  pyreqwest (Rust reqwest on its own tokio threads)  pip: pyreqwest

Usage:  .venv/bin/python bench/upstream_clients.py [--requests 3000] [--concurrency 16 64] [--repeat 3]
                                                   [--clients aiohttp aiosonic ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from qtrap_common.localproc import child, free_port

ROOT = Path(__file__).resolve().parent.parent


BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
SBODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
HDRS = {"content-type": "application/json", "accept-encoding": "identity"}

# (client, url, body, concurrency, total, stream) -> None; each worker does total // concurrency requests
Runner = Callable[[str, bytes, int, int, bool], Awaitable[None]]


async def _workers(concurrency: int, total: int, one: Callable[[], Awaitable[None]]) -> None:
    per = total // concurrency

    async def worker() -> None:
        for _ in range(per):
            await one()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def with_aiohttp(url: str, body: bytes, concurrency: int, total: int, stream: bool) -> None:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=60)
    conn = aiohttp.TCPConnector(limit=4096, limit_per_host=0, keepalive_timeout=60)
    async with aiohttp.ClientSession(
        connector=conn, timeout=timeout, auto_decompress=False, skip_auto_headers=("User-Agent",)
    ) as s:

        async def one() -> None:
            async with s.post(url, data=body, headers=HDRS) as r:
                if stream:
                    async for _chunk in r.content.iter_any():
                        pass
                else:
                    await r.read()

        await _workers(concurrency, total, one)


async def with_httpx(url: str, body: bytes, concurrency: int, total: int, stream: bool) -> None:
    import httpx

    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=4096)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60, connect=5)) as c:

        async def one() -> None:
            async with c.stream("POST", url, content=body, headers=HDRS) as r:
                async for _chunk in r.aiter_raw():
                    pass

        await _workers(concurrency, total, one)


async def with_httpcore(url: str, body: bytes, concurrency: int, total: int, stream: bool) -> None:
    import httpcore

    hdrs = list(HDRS.items())
    ext = {"timeout": {"connect": 5.0, "read": 60.0, "write": 60.0, "pool": 60.0}}
    async with httpcore.AsyncConnectionPool(max_connections=4096, keepalive_expiry=60) as pool:

        async def one() -> None:
            async with pool.stream("POST", url, headers=hdrs, content=body, extensions=ext) as r:
                async for _chunk in r.aiter_stream():
                    pass

        await _workers(concurrency, total, one)


async def with_aiosonic(url: str, body: bytes, concurrency: int, total: int, stream: bool) -> None:
    import aiosonic
    from aiosonic.pools import PoolConfig
    from aiosonic.timeout import Timeouts

    timeouts = Timeouts(sock_connect=5, sock_read=60, request_timeout=None)
    conn = aiosonic.TCPConnector(pool_configs={":default": PoolConfig(size=4096)}, timeouts=timeouts)
    client = aiosonic.HTTPClient(connector=conn)

    async def one() -> None:
        r = await client.post(url, data=body, headers=HDRS)
        if stream:
            async for _chunk in r.read_chunks():
                pass
        else:
            await r.content()

    try:
        await _workers(concurrency, total, one)
    finally:
        await client.connector.cleanup()


async def with_niquests(url: str, body: bytes, concurrency: int, total: int, stream: bool) -> None:
    import niquests

    async with niquests.AsyncSession(pool_maxsize=concurrency, timeout=60) as s:

        async def one() -> None:
            r = await s.post(url, data=body, headers=HDRS, stream=True)
            async for _chunk in await r.iter_raw():
                pass
            await r.close()

        await _workers(concurrency, total, one)


async def with_curl_cffi(url: str, body: bytes, concurrency: int, total: int, stream: bool) -> None:
    from curl_cffi.requests import AsyncSession

    async with AsyncSession(max_clients=concurrency, timeout=(5, 60)) as s:

        async def one() -> None:
            if stream:
                r = await s.post(url, data=body, headers=HDRS, stream=True)
                async for _chunk in r.aiter_content():
                    pass
                await r.aclose()
            else:
                r = await s.post(url, data=body, headers=HDRS)
                _ = r.content

        await _workers(concurrency, total, one)


class _CurlStream:
    """One transfer's body: chunks queued by curl's write callback, read as they arrive."""

    __slots__ = ("chunks", "curl", "error", "finished", "waiter")

    def __init__(self, curl: Any) -> None:
        self.curl = curl
        self.chunks: list[bytes] = []
        self.waiter: asyncio.Future[None] | None = None
        self.finished = False
        self.error: BaseException | None = None

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def write(self, data: bytes) -> None:
        self.chunks.append(data)
        self._wake()

    def finish(self, error: BaseException | None) -> None:
        self.finished, self.error = True, error
        self._wake()

    async def next_chunk(self) -> bytes | None:
        while not self.chunks:
            if self.finished:
                if self.error is not None:
                    raise self.error
                return None
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return self.chunks.pop(0)


class _CurlLoop:
    """A pycurl multi handle driven by the asyncio loop (CURLMOPT_SOCKETFUNCTION/TIMERFUNCTION)."""

    def __init__(self, max_connections: int) -> None:
        import pycurl

        self.pycurl = pycurl
        self.loop = asyncio.get_running_loop()
        self.multi = pycurl.CurlMulti()
        self.multi.setopt(pycurl.M_SOCKETFUNCTION, self._socket)
        self.multi.setopt(pycurl.M_TIMERFUNCTION, self._timer)
        self.multi.setopt(pycurl.M_MAX_TOTAL_CONNECTIONS, max_connections)
        self.timer: asyncio.TimerHandle | None = None
        self.streams: dict[Any, _CurlStream] = {}
        self.idle: list[Any] = []

    def _socket(self, what: int, fd: int, multi: Any, data: Any) -> None:
        pc, loop = self.pycurl, self.loop
        if what == pc.POLL_REMOVE:
            loop.remove_reader(fd)
            loop.remove_writer(fd)
            return
        if what in (pc.POLL_IN, pc.POLL_INOUT):
            loop.add_reader(fd, self._act, fd, pc.CSELECT_IN)
        else:
            loop.remove_reader(fd)
        if what in (pc.POLL_OUT, pc.POLL_INOUT):
            loop.add_writer(fd, self._act, fd, pc.CSELECT_OUT)
        else:
            loop.remove_writer(fd)

    def _timer(self, ms: int) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if ms >= 0:
            self.timer = self.loop.call_later(ms / 1000, self._act, self.pycurl.SOCKET_TIMEOUT, 0)

    def _act(self, fd: int, ev: int) -> None:
        while True:
            ret, _running = self.multi.socket_action(fd, ev)
            if ret != self.pycurl.E_CALL_MULTI_PERFORM:
                break
        while True:
            queued, ok, failed = self.multi.info_read()
            for c in ok:
                self.multi.remove_handle(c)
                self.streams.pop(c).finish(None)
                self.idle.append(c)
            for c, errno, msg in failed:
                self.multi.remove_handle(c)
                self.streams.pop(c).finish(OSError(errno, msg))
                self.idle.append(c)
            if not queued:
                break

    def post(self, url: str, body: bytes, headers: list[str]) -> _CurlStream:
        pc = self.pycurl
        c = self.idle.pop() if self.idle else pc.Curl()
        st = _CurlStream(c)
        c.setopt(pc.URL, url)
        c.setopt(pc.POSTFIELDS, body)
        c.setopt(pc.HTTPHEADER, headers)
        c.setopt(pc.WRITEFUNCTION, st.write)
        c.setopt(pc.CONNECTTIMEOUT_MS, 5000)
        c.setopt(pc.LOW_SPEED_LIMIT, 1)  # the read timeout: less than 1 byte/s for 60 s
        c.setopt(pc.LOW_SPEED_TIME, 60)
        self.streams[c] = st
        self.multi.add_handle(c)
        self._act(pc.SOCKET_TIMEOUT, 0)
        return st

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        for c in self.idle:
            c.close()
        self.multi.close()


async def with_pycurl(url: str, body: bytes, concurrency: int, total: int, stream: bool) -> None:
    curl = _CurlLoop(4096)
    headers = [f"{k}: {v}" for k, v in HDRS.items()] + ["Expect:"]

    async def one() -> None:
        st = curl.post(url, body, headers)
        while await st.next_chunk() is not None:  # a chunk at a time, as the relay reads
            pass

    try:
        await _workers(concurrency, total, one)
    finally:
        curl.close()


async def with_pyreqwest(url: str, body: bytes, concurrency: int, total: int, stream: bool) -> None:
    from pyreqwest.client import ClientBuilder

    client = (
        ClientBuilder()
        .max_connections(4096)
        .connect_timeout(timedelta(seconds=5))
        .read_timeout(timedelta(seconds=60))
        .pool_idle_timeout(timedelta(seconds=60))
        .build()
    )
    async with client:

        async def one() -> None:
            if stream:
                async with client.post(url).headers(HDRS).body_bytes(body).build_streamed() as r:
                    reader = r.body_reader
                    while await reader.read_chunk() is not None:
                        pass
            else:
                r = await client.post(url).headers(HDRS).body_bytes(body).build().send()
                await r.bytes()

        await _workers(concurrency, total, one)


CLIENTS: dict[str, tuple[str, Runner]] = {
    "aiohttp": ("aiohttp", with_aiohttp),
    "httpx": ("httpx", with_httpx),
    "httpcore": ("httpcore", with_httpcore),
    "aiosonic": ("aiosonic", with_aiosonic),
    "niquests": ("niquests", with_niquests),
    "curl_cffi": ("curl_cffi", with_curl_cffi),
    "pycurl": ("pycurl", with_pycurl),
    "pyreqwest": ("pyreqwest", with_pyreqwest),
}
_DIST = {"curl_cffi": "curl-cffi"}


def available(names: list[str]) -> list[str]:
    out = []
    for name in names:
        if importlib.util.find_spec(CLIENTS[name][0]) is None:
            print(f"# {name}: not installed, skipped (pip install {_DIST.get(name, name)})", flush=True)
        else:
            out.append(name)
    return out


def lib_version(name: str) -> str:
    try:
        return version(_DIST.get(name, name))
    except PackageNotFoundError:
        return "?"


def measure(args: argparse.Namespace, url: str) -> dict[str, Any]:
    if not args.no_uvloop:
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
    names = available(args.clients)
    print("# " + ", ".join(f"{n} {lib_version(n)}" for n in names), flush=True)
    rows: list[dict[str, Any]] = []
    slow_n = {"httpx": 0.1, "httpcore": 0.25, "niquests": 0.1}  # share of the requests for the slow ones
    for kind, body, n in (("non-stream", BODY, args.requests), ("stream", SBODY, args.requests // 4)):
        for c in args.concurrency:
            for rep in range(args.repeat):
                order = names[rep % len(names) :] + names[: rep % len(names)]
                cpu_us: dict[str, float] = {}
                for name in order:
                    fn = CLIENTS[name][1]
                    total = max(c, int(n * slow_n.get(name, 1.0)) // c * c)
                    try:
                        asyncio.run(fn(url, body, c, min(total, 10 * c), kind == "stream"))  # warm-up
                        t0, c0 = time.perf_counter(), time.process_time()
                        asyncio.run(fn(url, body, c, total, kind == "stream"))
                    except Exception as e:
                        print(f"{kind:>10} c={c:>3} {name:>9}: failed: {type(e).__name__}: {e}", flush=True)
                        continue
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                    cpu_us[name] = cpu / total * 1e6
                    rows.append(
                        {
                            "workload": kind,
                            "concurrency": c,
                            "repeat": rep,
                            "client": name,
                            "requests": total,
                            "req_per_s": total / wall,
                            "cpu_us_per_request": cpu_us[name],
                        }
                    )
                base = cpu_us.get("aiohttp")
                for name in names:
                    if name not in cpu_us:
                        continue
                    ratio = f", {cpu_us[name] / base:5.2f}x aiohttp's CPU" if base else ""
                    row = next(r for r in rows[::-1] if r["client"] == name)
                    row["cpu_vs_aiohttp"] = cpu_us[name] / base if base else None
                    print(
                        f"{kind:>10} c={c:>3} #{rep + 1} {name:>9}: {row['req_per_s']:8,.0f} req/s, "
                        f"client CPU {cpu_us[name]:7.1f} us/request{ratio}",
                        flush=True,
                    )
    summary = []
    print("\n# median over the repetitions: CPU us/request, and the median of the per-repetition ratios")
    for kind in ("non-stream", "stream"):
        for c in args.concurrency:
            for name in names:
                sel = [
                    r for r in rows if r["workload"] == kind and r["concurrency"] == c and r["client"] == name
                ]
                if not sel:
                    continue
                cpu = statistics.median(r["cpu_us_per_request"] for r in sel)
                ratios = [r["cpu_vs_aiohttp"] for r in sel if r.get("cpu_vs_aiohttp")]
                ratio = statistics.median(ratios) if ratios else None
                rps = statistics.median(r["req_per_s"] for r in sel)
                summary.append(
                    {"workload": kind, "concurrency": c, "client": name, "cpu_us_per_request": cpu,
                     "cpu_vs_aiohttp": ratio, "req_per_s": rps, "cpu_runs": [r["cpu_us_per_request"] for r in sel]}
                )  # fmt: skip
                runs = ", ".join(f"{r['cpu_us_per_request']:.0f}" for r in sel)
                vs = "" if ratio is None else f"{ratio:.2f}x aiohttp, "
                print(
                    f"{kind:>10} c={c:>3} {name:>9}: {cpu:7.1f} us/request (runs {runs}), {vs}{rps:,.0f} req/s"
                )
    return {"versions": {n: lib_version(n) for n in names}, "rows": rows, "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000, help="non-streaming requests a run (streams: 1/4)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--repeat", type=int, default=3, help="repetitions of each cell")
    ap.add_argument("--chunks", type=int, default=64, help="chunks a stream")
    ap.add_argument("--clients", nargs="+", choices=sorted(CLIENTS), default=list(CLIENTS))
    ap.add_argument(
        "--no-uvloop", action="store_true", help="the default asyncio loop (the proxy uses uvloop)"
    )
    ap.add_argument("--json", help="write the results here as JSON")
    args = ap.parse_args()
    if "aiohttp" in args.clients:
        args.clients = ["aiohttp"] + [c for c in args.clients if c != "aiohttp"]
    port = free_port()
    cmd = [
        sys.executable,
        str(ROOT / "bench/instant_backend.py"),
        "--port",
        str(port),
        "--chunks",
        str(args.chunks),
    ]
    log = Path(tempfile.mkdtemp(prefix="qtrap-bench-")) / "backend.log"
    with child(cmd, f"http://127.0.0.1:{port}/health", log):
        res = measure(args, f"http://127.0.0.1:{port}/v1/chat/completions")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
