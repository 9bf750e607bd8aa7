"""``qtrap-proxy demo``: the whole stack on simulated backends, no GPU needed.

Starts three qtrap_sim backends (one model at BF16, INT8 and INT4, each on its
own simulated H100) and a qtrap-proxy in front of them, as child processes on
loopback; streams chat requests through the proxy at each concurrency level and
precision; reads every request's record back from the proxy; prints a summary;
and stops everything it started.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from qtrap_proxy.localproc import child, free_port

PRECISIONS = ("bf16", "int8", "int4")


async def _level(url: str, precision: str, concurrency: int, requests: int, max_tokens: int) -> list[str]:
    ids: list[str] = []
    todo = iter(range(requests))
    body = orjson.dumps(
        {
            "model": f"qwen3-8b@{precision}",
            "max_tokens": max_tokens,
            "stream": True,
            "messages": [{"role": "user", "content": "Natalia sold clips to 48 of her friends."}],
        }
    )

    async def worker(session: aiohttp.ClientSession) -> None:
        for _ in todo:
            async with session.post(
                url + "/v1/chat/completions", data=body, headers={"content-type": "application/json"}
            ) as r:
                await r.read()
                ids.append(r.headers["x-qtrap-request-id"])

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return ids


async def _records(url: str, ids: list[str], route: str) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as s:
        out = []
        for rid in ids:
            async with s.get(f"{url}{route}{rid}") as r:
                out.append(await r.json())
        return out


def run_demo(concurrency: list[int], requests: int, max_tokens: int) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="qtrap-demo-"))
    ports = {p: free_port() for p in PRECISIONS}
    proxy_port = free_port()
    (tmp / "sim.yaml").write_text(
        yaml.safe_dump(
            {
                "backends": [
                    {"name": f"qwen3-8b-{p}", "model": "qwen3-8b", "precision": p, "port": port}
                    for p, port in ports.items()
                ]
            }
        )
    )
    (tmp / "proxy.yaml").write_text(
        yaml.safe_dump(
            {
                "server": {"host": "127.0.0.1", "port": proxy_port},
                "ledger": {"path": str(tmp / "ledger.sqlite")},
                "backends": [
                    {
                        "name": f"sim-{p}",
                        "pool": "qwen3-8b",
                        "precision": p,
                        "kind": "vllm",
                        "url": f"http://127.0.0.1:{port}",
                        "model": "qwen3-8b",
                        "devices": [{"host": "sim", "index": i}],
                    }
                    for i, (p, port) in enumerate(ports.items())
                ],
                "pools": {"qwen3-8b": {"default_precision": "bf16"}},
            }
        )
    )
    url = f"http://127.0.0.1:{proxy_port}"
    print(f"qtrap demo: 3 simulated backends + proxy on {url} (logs in {tmp})", flush=True)
    rows = []
    sim_cmd = [sys.executable, "-m", "qtrap_sim", "--config", str(tmp / "sim.yaml")]
    proxy_cmd = [sys.executable, "-m", "qtrap_proxy", "serve", "--config", str(tmp / "proxy.yaml")]
    with (
        child(sim_cmd, f"http://127.0.0.1:{ports['int4']}/health", tmp / "sim.log"),
        child([*proxy_cmd, "--log-level", "warning"], url + "/health", tmp / "proxy.log"),
    ):
        for c in concurrency:
            for p in PRECISIONS:
                t0 = time.monotonic()
                ids = asyncio.run(_level(url, p, c, max(requests, c), max_tokens))
                wall = time.monotonic() - t0
                recs = asyncio.run(_records(url, ids, "/qtrap/v1/requests/"))
                ok = [r for r in recs if r["status"] == "ok"]
                toks = sum(r["completion_tokens"] or 0 for r in ok)
                # what the simulated GPU says these requests cost (its ground truth, by request id)
                sim_url = f"http://127.0.0.1:{ports[p]}"
                truth = asyncio.run(_records(sim_url, [r["id"] for r in ok], "/sim/v1/requests/"))
                true_j = sum(t["energy_j"] for t in truth)
                rows.append(
                    (
                        p,
                        c,
                        len(recs),
                        len(ok),
                        toks,
                        toks / wall,
                        statistics.median(r["ttft_s"] for r in ok) * 1e3 if ok else float("nan"),
                        statistics.median(r["e2e_s"] for r in ok) * 1e3 if ok else float("nan"),
                        true_j / toks if toks else float("nan"),
                    )
                )
                print(f"  {p:>5} at concurrency {c:>3}: {len(ok)}/{len(recs)} ok", flush=True)
    print()
    print(
        f"{'precision':>9} {'conc':>5} {'requests':>8} {'ok':>5} {'tokens':>7} {'tok/s':>8} "
        f"{'TTFT p50 ms':>11} {'e2e p50 ms':>10} {'sim J/token':>11}"
    )
    for p, c, n, ok_n, toks, tps, ttft, e2e, jpt in rows:
        print(f"{p:>9} {c:>5} {n:>8} {ok_n:>5} {toks:>7} {tps:>8.0f} {ttft:>11.1f} {e2e:>10.1f} {jpt:>11.4f}")
    print(
        "\nsim J/token: the simulated H100's own account of what these requests cost (calibrated Qwen3-8B "
        "profiles: BF16, W8A8 INT8, fused INT4). The proxy's own energy metering is not in this version: "
        "its records carry energy_j = null."
    )
    return 0 if all(r[3] == r[2] for r in rows) else 1
