"""Proxy overhead: direct-to-backend vs through qtrap-proxy, measured in one run.

Starts an instant backend (bench/instant_backend.py) and a qtrap-proxy in front
of it, then measures with an aiohttp client:

* added latency p50/p99 of non-streaming chat requests at concurrency 1, 16, 64;
* streamed chunks/s at 64 and 512 concurrent streams (proxy / direct ratio), once
  with chunks sent back to back (the proxy's ceiling) and once paced like a
  decoding GPU (``--paced-ms`` between a stream's chunks);
* the proxy's CPU time per request and per chunk, and its peak RSS at 512 streams.

Usage:  .venv/bin/python bench/proxy_overhead.py [--quick] [--transport aiohttp|pyreqwest] [--json out.json]
Timings vary on a shared machine: compare the ratios printed by one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from qtrap_common.localproc import child, free_port

ROOT = Path(__file__).resolve().parent.parent
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()
HDRS = {"content-type": "application/json"}


def stream_body(interval_ms: float) -> bytes:
    msg = [{"role": "user", "content": "hi"}]
    return json.dumps(
        {"model": "m", "messages": msg, "stream": True, "bench_interval_ms": interval_ms}
    ).encode()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def latency(session: aiohttp.ClientSession, url: str, concurrency: int, total: int) -> list[float]:
    out: list[float] = []
    per = max(1, total // concurrency)

    async def worker() -> None:
        for _ in range(per):
            t0 = time.perf_counter()
            async with session.post(url, data=BODY, headers=HDRS) as r:
                await r.read()
                assert r.status == 200, r.status
            out.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


async def streams(
    session: aiohttp.ClientSession,
    url: str,
    concurrency: int,
    seconds: float,
    pid: int | None,
    interval_ms: float,
) -> tuple[float, float, int]:
    """(chunks/s, peak RSS of ``pid`` in MB, chunks) over a closed loop of ``concurrency`` streams."""
    chunks = 0
    stop_at = time.monotonic() + seconds
    peak = 0.0
    body = stream_body(interval_ms)

    async def worker() -> None:
        nonlocal chunks
        while time.monotonic() < stop_at:
            async with session.post(url, data=body, headers=HDRS) as r:
                n = 0
                async for data in r.content.iter_any():
                    n += data.count(b"data: {")
                chunks += n

    async def sampler() -> None:
        nonlocal peak
        while time.monotonic() < stop_at:
            if pid is not None:
                peak = max(peak, rss_mb(pid))
            await asyncio.sleep(0.1)

    t0 = time.monotonic()
    await asyncio.gather(sampler(), *(worker() for _ in range(concurrency)))
    return chunks / (time.monotonic() - t0), peak, chunks


async def run(args: argparse.Namespace, direct: str, proxied: str, proxy_pid: int) -> dict[str, Any]:
    conn = aiohttp.TCPConnector(limit=0)
    res: dict[str, Any] = {"latency": [], "streams": []}
    path = "/v1/chat/completions"
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=300)) as s:
        for base in (direct, proxied):  # warm up both paths and their connection pools
            await latency(s, base + path, 64, 640)
        for c in (1, 16, 64):
            total = args.requests if c == 1 else args.requests * 2
            d: list[float] = []
            p: list[float] = []
            cpu = 0.0
            for _ in range(args.rounds):  # interleave so drifts in machine load hit both alike
                d += await latency(s, direct + path, c, total // args.rounds)
                c0 = cpu_s(proxy_pid)
                p += await latency(s, proxied + path, c, total // args.rounds)
                cpu += cpu_s(proxy_pid) - c0
            row = {
                "concurrency": c,
                "n": len(p),
                "direct_p50_ms": pct(d, 0.5) * 1e3,
                "proxy_p50_ms": pct(p, 0.5) * 1e3,
                "direct_p99_ms": pct(d, 0.99) * 1e3,
                "proxy_p99_ms": pct(p, 0.99) * 1e3,
                "proxy_cpu_us_per_request": cpu / len(p) * 1e6,
            }
            row["added_p50_ms"] = row["proxy_p50_ms"] - row["direct_p50_ms"]
            row["added_p99_ms"] = row["proxy_p99_ms"] - row["direct_p99_ms"]
            res["latency"].append(row)
            print(
                f"latency c={c:>3}: added p50 {row['added_p50_ms']:.3f} ms, p99 {row['added_p99_ms']:.3f} ms "
                f"(direct p50 {row['direct_p50_ms']:.3f}, proxy p50 {row['proxy_p50_ms']:.3f}); "
                f"proxy CPU {row['proxy_cpu_us_per_request']:.0f} us/request",
                flush=True,
            )
        for interval in (0.0, args.paced_ms):
            for c in (64, 512):
                d_rate, _, _ = await streams(s, direct + path, c, args.seconds, None, interval)
                c0 = cpu_s(proxy_pid)
                p_rate, peak, n = await streams(s, proxied + path, c, args.seconds, proxy_pid, interval)
                cpu = cpu_s(proxy_pid) - c0
                row = {
                    "streams": c,
                    "interval_ms": interval,
                    "direct_chunks_per_s": d_rate,
                    "proxy_chunks_per_s": p_rate,
                    "ratio": p_rate / d_rate,
                    "proxy_peak_rss_mb": peak,
                    "proxy_cpu_us_per_chunk": cpu / max(n, 1) * 1e6,
                }
                res["streams"].append(row)
                print(
                    f"streams {c:>3} (chunk gap {interval:g} ms): direct {d_rate:,.0f} chunks/s, "
                    f"proxy {p_rate:,.0f} chunks/s, ratio {row['ratio']:.3f}, proxy CPU "
                    f"{row['proxy_cpu_us_per_chunk']:.1f} us/chunk, peak RSS {peak:.1f} MB",
                    flush=True,
                )
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000, help="requests per latency level at c=1 (x2 above)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved direct/proxy rounds per level")
    ap.add_argument("--seconds", type=float, default=8.0, help="duration of each stream measurement")
    ap.add_argument("--chunks", type=int, default=64, help="content chunks per stream")
    ap.add_argument(
        "--paced-ms",
        type=float,
        default=20.0,
        help="gap between a stream's chunks in the paced run (default 20 ms: 50 tokens/s per stream)",
    )
    ap.add_argument("--quick", action="store_true", help="short run for a smoke test")
    ap.add_argument(
        "--with-meter",
        action="store_true",
        help="run the proxy with a DCGM meter (a simulated GPU's counter) and energy attribution on",
    )
    ap.add_argument(
        "--transport",
        default="aiohttp",
        choices=["aiohttp", "pyreqwest"],
        help="the proxy's upstream client (backends[].transport; pyreqwest needs `pip install pyreqwest`)",
    )
    ap.add_argument(
        "--work-model", default="shared", choices=["rows", "shared"], help="--with-meter: meter.work_model"
    )
    ap.add_argument("--json", help="write the results here as JSON")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.rounds, args.seconds = 300, 1, 2.0
    bport, pport = free_port(), free_port()
    py = sys.executable
    tmp = Path(tempfile.mkdtemp(prefix="qtrap-bench-"))
    cfg = {
        "server": {"port": pport},
        "ledger": {"path": str(tmp / "ledger.sqlite")},
        "backends": [
            {
                "name": "instant",
                "pool": "m",
                "precision": "bf16",
                "kind": "vllm",
                "url": f"http://127.0.0.1:{bport}",
                "model": "m",
                "transport": args.transport,
            }
        ],
    }
    meter_sim = contextlib.nullcontext()
    if args.with_meter:
        mport = free_port()
        cfg["backends"][0]["devices"] = [{"host": "qtrap-sim", "index": 0}]  # type: ignore[index]
        cfg["meter"] = {
            "kind": "dcgm",
            "urls": [f"http://127.0.0.1:{mport}/dcgm/metrics"],
            "work_model": args.work_model,
        }
        meter_sim = child(
            [py, "-m", "qtrap_sim", "--port", str(mport), "--step-ms", "10"],
            f"http://127.0.0.1:{mport}/health",
            tmp / "meter-sim.log",
        )
    (tmp / "proxy.yaml").write_text(yaml.safe_dump(cfg))
    backend_cmd = [
        py,
        str(ROOT / "bench/instant_backend.py"),
        "--port",
        str(bport),
        "--chunks",
        str(args.chunks),
    ]
    proxy_cmd = [
        py,
        "-m",
        "qtrap_proxy",
        "serve",
        "--config",
        str(tmp / "proxy.yaml"),
        "--log-level",
        "warning",
    ]
    with (
        meter_sim,
        child(backend_cmd, f"http://127.0.0.1:{bport}/health", tmp / "backend.log"),
        child(proxy_cmd, f"http://127.0.0.1:{pport}/health", tmp / "proxy.log") as proxy,
    ):
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        res = asyncio.run(run(args, f"http://127.0.0.1:{bport}", f"http://127.0.0.1:{pport}", proxy.pid))
    res["settings"] = {k: v for k, v in vars(args).items() if k != "json"}
    res["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
