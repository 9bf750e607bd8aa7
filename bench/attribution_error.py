"""How wrong is the proxy's energy attribution? Measured against qtrap_sim's ground truth.

    .venv/bin/python bench/attribution_error.py [--requests-per-level 48]

Runs two simulated H100s (Qwen3-8B at BF16 and INT4, calibrated profiles) behind
a proxy with the DCGM meter, sends a mixed workload (short and long prompts and
outputs, streaming and not) at concurrency 1, 4, 16 and 64, waits for every
record to become final, and compares each request's attributed energy with what
the simulated GPU says it cost (GET /sim/v1/requests/{id}). Prints the relative
error distribution (median, p90, worst) for all requests and for requests lasting
at least 0.5 s, and the conservation figures of both devices.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml

from qtrap_common.localproc import child, free_port


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests-per-level", type=int, default=48)
    ap.add_argument("--levels", default="1,4,16,64")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="write every request's figures here")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="qtrap-attr-"))
    ports = {"bf16": free_port(), "int4": free_port()}
    (tmp / "sim.yaml").write_text(
        yaml.safe_dump(
            {"backends": [{"model": "qwen3-8b", "precision": p, "port": port} for p, port in ports.items()]}
        )
    )
    pport = free_port()
    (tmp / "proxy.yaml").write_text(
        yaml.safe_dump(
            {
                "server": {"port": pport},
                "ledger": {"path": str(tmp / "ledger.sqlite")},
                "backends": [
                    {
                        "name": f"sim-{p}",
                        "pool": "q",
                        "precision": p,
                        "url": f"http://127.0.0.1:{port}",
                        "model": "qwen3-8b",
                        "devices": [{"host": "qtrap-sim", "index": i}],
                    }
                    for i, (p, port) in enumerate(ports.items())
                ],
                "meter": {
                    "kind": "dcgm",
                    "urls": [f"http://127.0.0.1:{p}/dcgm/metrics" for p in ports.values()],
                },
            }
        )
    )
    url = f"http://127.0.0.1:{pport}"
    rng = random.Random(args.seed)
    rows = []
    with (
        child(
            [sys.executable, "-m", "qtrap_sim", "--config", str(tmp / "sim.yaml")],
            f"http://127.0.0.1:{ports['int4']}/health",
            tmp / "sim.log",
        ),
        child(
            [
                sys.executable,
                "-m",
                "qtrap_proxy",
                "serve",
                "--config",
                str(tmp / "proxy.yaml"),
                "--log-level",
                "warning",
            ],
            url + "/health",
            tmp / "proxy.log",
        ),
    ):

        def one(job: tuple[str, int, int, bool]) -> str:
            precision, prompt_words, max_tokens, stream = job
            r = requests.post(
                url + "/v1/chat/completions",
                timeout=300,
                json={
                    "model": f"q@{precision}",
                    "max_tokens": max_tokens,
                    "stream": stream,
                    "messages": [{"role": "user", "content": " ".join(["word"] * prompt_words)}],
                },
            )
            r.raise_for_status()
            return r.headers["x-qtrap-request-id"]

        for level in [int(x) for x in args.levels.split(",")]:
            jobs = [
                (
                    rng.choice(["bf16", "int4"]),
                    rng.choice([8, 64, 512, 2000]),
                    rng.choice([16, 64, 256]),
                    rng.random() < 0.7,
                )
                for _ in range(max(args.requests_per_level, level))
            ]
            with concurrent.futures.ThreadPoolExecutor(level) as pool:
                ids = list(pool.map(one, jobs))
            for rid, job in zip(ids, jobs, strict=True):
                rows.append(
                    {
                        "id": rid,
                        "level": level,
                        "precision": job[0],
                        "prompt_words": job[1],
                        "max_tokens": job[2],
                        "stream": job[3],
                    }
                )
            print(f"level {level}: {len(ids)} requests sent", flush=True)
        deadline = time.monotonic() + 60
        for row in rows:
            while True:
                rec = requests.get(f"{url}/qtrap/v1/requests/{row['id']}", timeout=10).json()
                if rec["final"] or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            truth = requests.get(
                f"http://127.0.0.1:{ports[row['precision']]}/sim/v1/requests/{row['id']}", timeout=10
            ).json()
            row.update(
                attributed_j=rec["energy_j"],
                true_j=truth["energy_j"],
                e2e_s=rec["e2e_s"],
                bound_j=rec["error_bound_j"],
                final=rec["final"],
            )
        energy = requests.get(url + "/qtrap/v1/energy", timeout=10).json()
    ok = [r for r in rows if r["final"] and r["attributed_j"] is not None and r["true_j"] > 0]
    for r in ok:
        r["rel_error"] = abs(r["attributed_j"] - r["true_j"]) / r["true_j"]

    def dist(rs: list[dict[str, object]]) -> str:
        errs = sorted(float(r["rel_error"]) for r in rs)  # type: ignore[arg-type]
        if not errs:
            return "none"
        p90 = errs[min(len(errs) - 1, int(0.9 * len(errs)))]
        return (
            f"n={len(errs)} median {statistics.median(errs) * 100:.2f}%  p90 {p90 * 100:.2f}%  "
            f"worst {errs[-1] * 100:.2f}%"
        )

    print(f"all requests:            {dist(ok)}")
    print(f"requests lasting >=0.5s: {dist([r for r in ok if r['e2e_s'] >= 0.5])}")
    for level in sorted({r["level"] for r in ok}):
        print(f"  concurrency {level:>2}:        {dist([r for r in ok if r['level'] == level])}")
    for d in energy["devices"]:
        print(
            f"device {d['device']}: measured {d['measured_j']:.1f} J, attributed {d['attributed_j']:.1f} J, "
            f"idle {d['idle_j']:.1f} J, conservation error {d['conservation_error_ratio'] * 100:.4f}%"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
