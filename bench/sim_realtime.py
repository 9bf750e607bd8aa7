"""qtrap_sim keeping real time: start-up of a 3-backend fleet, and step-time slip under 512 streams.

    .venv/bin/python bench/sim_realtime.py [--streams 512] [--max-tokens 128]

Starts ``qtrap-sim --config`` with Qwen3-8B at BF16, INT8 and INT4 (calibrated H100
profiles), measures how long until all three answer /health, then opens
``--streams`` concurrent streaming requests against the BF16 backend from one
client process and reads the engine's own accounting (/sim/v1/energy): steps,
modelled busy time, and the slip of each step's end past its deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import yaml

from qtrap_common.localproc import free_port, stop, wait_http


async def streams(url: str, n: int, max_tokens: int) -> tuple[int, float]:
    body = json.dumps(
        {"model": "qwen3-8b", "prompt": "count", "max_tokens": max_tokens, "stream": True}
    ).encode()
    chunks = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def one() -> None:
            nonlocal chunks
            async with s.post(
                url + "/v1/completions", data=body, headers={"content-type": "application/json"}
            ) as r:
                async for data in r.content.iter_any():
                    chunks += data.count(b"data: {")

        t0 = time.monotonic()
        await asyncio.gather(*(one() for _ in range(n)))
        return chunks, time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    ports = {p: free_port() for p in ("bf16", "int8", "int4")}
    tmp = Path(tempfile.mkdtemp(prefix="qtrap-bench-"))
    cfg = {
        "backends": [
            {"model": "qwen3-8b", "precision": p, "port": port, "max_num_seqs": 512}
            for p, port in ports.items()
        ]
    }
    (tmp / "sim.yaml").write_text(yaml.safe_dump(cfg))
    t0 = time.monotonic()
    with (tmp / "sim.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qtrap_sim", "--config", str(tmp / "sim.yaml")],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        for port in ports.values():
            wait_http(f"http://127.0.0.1:{port}/health", proc, 30, tmp / "sim.log")
        startup = time.monotonic() - t0
        print(f"start-up of 3 simulated backends (process start to all healthy): {startup:.2f} s", flush=True)
        url = f"http://127.0.0.1:{ports['bf16']}"
        chunks, wall = asyncio.run(streams(url, args.streams, args.max_tokens))
        with urllib.request.urlopen(url + "/sim/v1/energy") as r:
            e = json.load(r)
        print(
            f"{args.streams} streams x {args.max_tokens} tokens: {chunks} chunks in {wall:.2f} s "
            f"({chunks / wall:,.0f} tokens/s)",
            flush=True,
        )
        print(
            f"engine: {e['steps']} steps, modelled busy {e['busy_s']:.2f} s of {wall:.2f} s wall, "
            f"slip per step mean {e['slip_s_mean'] * 1e3:.2f} ms, max {e['slip_s_max'] * 1e3:.2f} ms",
            flush=True,
        )
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
