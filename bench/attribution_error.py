"""How wrong is the proxy's energy attribution? Measured against qtrap_sim's ground truth.

    .venv/bin/python bench/attribution_error.py [--requests-per-level 48] [--engine-facts [--skew-s 0.37]]
    .venv/bin/python bench/attribution_error.py --proxy URL --pool NAME --precisions bf16,fp8

With ``--engine-facts`` the simulated engines send their ``llm_request`` spans (vLLM's attributes) to the
proxy's OTLP receiver, their clocks ``--skew-s`` off the proxy's, and the proxy attributes with those
facts and also, for comparison, by its own view alone (``meter.compare_views``): both are compared with
the truth, side by side, in one run. ``--proxy`` sends the same workload to a running proxy (a real GPU:
no truth there), and compares the two views with each other.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
import yaml

from qtrap_common.localproc import child, free_port


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests-per-level", type=int, default=48)
    ap.add_argument("--levels", default="1,4,16,64")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="write every request's figures here")
    ap.add_argument("--engine-facts", action="store_true", help="engines send OTLP spans; compare both views")
    ap.add_argument("--skew-s", type=float, default=0.37, help="--engine-facts: the engines' clock offset")
    ap.add_argument("--proxy", help="a running proxy to send the workload to (no truth: compares the views)")
    ap.add_argument("--pool", default="q", help="--proxy: the pool (model) to address")
    ap.add_argument("--precisions", default="bf16,int4", help="precisions to mix")
    ap.add_argument("--extra-body", default="{}", help="JSON merged into every request body")
    ap.add_argument("--work-model", choices=["rows", "shared"], default="shared", help="meter.work_model")
    ap.add_argument(
        "--counter-update-ms",
        type=float,
        default=None,
        help="the simulated GPUs' energy counters refresh every 0.85-1.15x this (default: 85-115 ms, an "
        "H100's NVML counter); the proxy samples them 5x as often",
    )
    ap.add_argument(
        "--no-cached-tokens",
        dest="cached_tokens",
        action="store_false",
        help="the simulated engines' usage does not say how many prompt tokens their prefix cache held "
        "(vLLM without --enable-prompt-tokens-details): the proxy counts every prompt token as prefilled",
    )
    args = ap.parse_args()
    if args.proxy:
        external(args)
        return
    tmp = Path(tempfile.mkdtemp(prefix="qtrap-attr-"))
    ports = {"bf16": free_port(), "int4": free_port()}
    otlp_port = free_port()
    facts: dict[str, object] = (
        {
            "otlp_traces_endpoint": f"http://127.0.0.1:{otlp_port}/v1/traces",
            "otlp_batch_delay_ms": 100,
            "clock_skew_s": args.skew_s,
        }
        if args.engine_facts
        else {}
    )
    counter: dict[str, object] = (
        {"counter_update_ms": [0.85 * args.counter_update_ms, 1.15 * args.counter_update_ms]}
        if args.counter_update_ms
        else {}
    )
    (tmp / "sim.yaml").write_text(
        yaml.safe_dump(
            {
                "backends": [
                    {
                        "model": "qwen3-8b",
                        "precision": p,
                        "port": port,
                        **facts,
                        **counter,
                        "enable_prompt_tokens_details": args.cached_tokens,
                    }
                    for p, port in ports.items()
                ]
            }
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
                        "engine_facts": "otlp" if args.engine_facts else "none",
                    }
                    for i, (p, port) in enumerate(ports.items())
                ],
                "meter": {
                    "kind": "dcgm",
                    "urls": [f"http://127.0.0.1:{p}/dcgm/metrics" for p in ports.values()],
                    "compare_views": args.engine_facts,
                    "work_model": args.work_model,
                    **(
                        {"interval_s": min(0.02, args.counter_update_ms / 5000)}
                        if args.counter_update_ms
                        else {}
                    ),
                },
                "otlp_receiver": {"enabled": args.engine_facts, "port": otlp_port},
            }
        )
    )
    url = f"http://127.0.0.1:{pport}"
    rng = random.Random(args.seed)
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
        sims = [f"http://127.0.0.1:{port}/sim/v1/energy" for port in ports.values()]
        rows = send_workload(url, args, rng, lambda: engine_slip(sims))
        for row in wait_final(url, rows):
            truth = requests.get(
                f"http://127.0.0.1:{ports[row['precision']]}/sim/v1/requests/{row['id']}", timeout=10
            ).json()
            row["true_j"] = truth["energy_j"]
        energy = requests.get(url + "/qtrap/v1/energy", timeout=10).json()
    ok = [r for r in rows if r["final"] and r["attributed_j"] is not None and r["true_j"] > 0]
    views = [("attributed_j", "proxy's figure" + (" (engine facts)" if args.engine_facts else ""))]
    if args.engine_facts:
        views.append(("proxy_view_j", "the proxy's own view alone"))
    for key, what in views:
        for r in ok:
            r["rel_error"] = abs(r[key] - r["true_j"]) / r["true_j"]
        print(f"-- {what} against the simulator's truth")
        print_distribution(ok)
        if key == "attributed_j":
            covered = sum(
                1 for r in ok if r["bound_j"] is not None and abs(r[key] - r["true_j"]) <= r["bound_j"]
            )
            print(
                f"error bound covers the true error: {covered}/{len(ok)} ({100 * covered / max(1, len(ok)):.1f}%)"
            )
    print_context(rows, energy)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def engine_slip(urls: list[str]) -> tuple[float, float, int]:
    """The simulated engines' modelled busy seconds, their slip behind real time (seconds a step ran past its
    modelled length: this host's scheduling, not the GPU's) and their steps so far, summed."""
    busy = slip = 0.0
    steps = 0
    for u in urls:
        d = requests.get(u, timeout=10).json()
        busy += d["busy_s"]
        slip += d["slip_s_mean"] * d["steps"]
        steps += d["steps"]
    return busy, slip, steps


def send_workload(
    url: str,
    args: argparse.Namespace,
    rng: random.Random,
    slip: Callable[[], tuple[float, float, int]] | None = None,
) -> list[dict[str, Any]]:
    """The mixed workload, level by level: short and long prompts and outputs, 70% streamed. With ``slip``
    (the simulated engines' busy and slip seconds so far), each level's line says how far the engines slipped
    behind real time while it ran."""
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    extra = json.loads(args.extra_body)

    def one(job: tuple[str, int, int, bool]) -> str:
        precision, prompt_words, max_tokens, stream = job
        r = requests.post(
            url + "/v1/chat/completions",
            timeout=300,
            json={
                "model": f"{args.pool}@{precision}",
                "max_tokens": max_tokens,
                "stream": stream,
                "messages": [{"role": "user", "content": " ".join(["word"] * prompt_words)}],
                **extra,
            },
        )
        r.raise_for_status()
        if stream:
            for _ in r.iter_lines():
                pass
        return r.headers["x-qtrap-request-id"]

    rows: list[dict[str, Any]] = []
    for level in [int(x) for x in args.levels.split(",")]:
        jobs = [
            (
                rng.choice(precisions),
                rng.choice([8, 64, 512, 2000]),
                rng.choice([16, 64, 256]),
                rng.random() < 0.7,
            )
            for _ in range(max(args.requests_per_level, level))
        ]
        before = slip() if slip else None
        with concurrent.futures.ThreadPoolExecutor(level) as pool:
            ids = list(pool.map(one, jobs))
        slipped = ""
        if slip and before:
            busy, late, steps = (b - a for a, b in zip(before, slip(), strict=True))
            if steps > 0:
                slipped = (
                    f"; engines behind real time by {1000 * late / steps:.2f} ms per step "
                    f"({100 * late / max(1e-9, busy + late):.1f}% of their busy time)"
                )
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
        print(f"level {level}: {len(ids)} requests sent{slipped}", flush=True)
    return rows


def wait_final(url: str, rows: list[dict[str, Any]], timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Each request's final record, read into its row."""
    deadline = time.monotonic() + timeout_s
    for row in rows:
        while True:
            rec = requests.get(f"{url}/qtrap/v1/requests/{row['id']}", timeout=10).json()
            if rec["final"] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        row.update(
            attributed_j=rec["energy_j"],
            proxy_view_j=rec.get("energy_proxy_view_j"),
            e2e_s=rec["e2e_s"],
            bound_j=rec["error_bound_j"],
            final=rec["final"],
            facts=rec.get("facts"),
            facts_reason=rec.get("facts_reason"),
            engine_timing=rec.get("engine_timing"),
        )
    return rows


def _dist(rs: list[dict[str, Any]]) -> str:
    errs = sorted(float(r["rel_error"]) for r in rs)
    if not errs:
        return "none"
    p90 = errs[min(len(errs) - 1, int(0.9 * len(errs)))]
    return (
        f"n={len(errs)} median {statistics.median(errs) * 100:.2f}%  p90 {p90 * 100:.2f}%  "
        f"worst {errs[-1] * 100:.2f}%"
    )


def print_distribution(ok: list[dict[str, Any]]) -> None:
    print(f"all requests:            {_dist(ok)}")
    print(f"requests lasting >=0.5s: {_dist([r for r in ok if r['e2e_s'] >= 0.5])}")
    for level in sorted({r["level"] for r in ok}):
        long = [r for r in ok if r["level"] == level and r["e2e_s"] >= 0.5]
        print(f"  concurrency {level:>2}, >=0.5s: {_dist(long)}")
    for precision in sorted({r["precision"] for r in ok}):
        for stream in (True, False):
            part = [
                r for r in ok if r["precision"] == precision and r["stream"] == stream and r["e2e_s"] >= 0.5
            ]
            print(f"  {precision} {'streaming' if stream else 'non-streaming'}, >=0.5s: {_dist(part)}")


def print_context(rows: list[dict[str, Any]], energy: dict[str, Any]) -> None:
    by_facts: dict[str, int] = {}
    for r in rows:
        by_facts[str(r.get("facts"))] = by_facts.get(str(r.get("facts")), 0) + 1
    print(f"records by whose view placed the work: {by_facts}")
    reasons = sorted({str(r["facts_reason"]) for r in rows if r.get("facts_reason")})
    if reasons:
        print(f"  reasons: {reasons}")
    ef = energy.get("engine_facts") or {}
    if ef:
        print(f"engine facts: {ef.get('outcomes')}")
        for c in ef.get("clocks", []):
            if c["offset_s"] is not None:
                print(
                    f"  clock of {c['backend']}: offset {c['offset_s'] * 1000:.3f} ms +- "
                    f"{c['offset_error_s'] * 1000:.3f} ms over {c['samples']} requests"
                )
    for d in energy["devices"]:
        print(
            f"device {d['device']}: measured {d['measured_j']:.1f} J, attributed {d['attributed_j']:.1f} J, "
            f"idle {d['idle_j']:.1f} J, foreign {d['foreign_j']:.1f} J, "
            f"conservation error {d['conservation_error_ratio'] * 100:.4f}%"
        )
        fit = d.get("work_fit")
        if fit and fit["shared_power_w"] is not None:
            print(
                f"  work model fit over {fit['intervals']} intervals: shared {fit['shared_power_w']:.1f} W, "
                f"{fit['energy_per_prompt_row_j'] * 1000:.3f} mJ per prompt row, {fit['energy_per_kv_read_j'] * 1e6:.3f} uJ per KV read"
            )
            if fit.get("busy_s_per_kv_read") is not None:
                print(
                    f"  busy time added per KV read {fit['busy_s_per_kv_read'] * 1e9:.2f} ns, "
                    f"per prompt row {fit['busy_s_per_prompt_row'] * 1e6:.2f} us (their energy is theirs)"
                )
            if fit.get("energy_per_decoded_token_j") is not None:
                by = ", ".join(
                    f"batch {lo}+: {j * 1000:.3f}"
                    for lo, j in zip(fit["decode_batch_from"], fit["energy_per_decoded_token_j"], strict=True)
                )
                print(f"  mJ per decoded token, {by}")


def external(args: argparse.Namespace) -> None:
    """The workload through a running proxy (a real GPU): the two views against each other."""
    url = args.proxy.rstrip("/")
    rows = wait_final(url, send_workload(url, args, random.Random(args.seed)), timeout_s=120.0)
    energy = requests.get(url + "/qtrap/v1/energy", timeout=10).json()
    ok = [r for r in rows if r["final"] and r["attributed_j"] and r["proxy_view_j"] is not None]
    for r in ok:
        r["rel_error"] = abs(r["proxy_view_j"] - r["attributed_j"]) / r["attributed_j"]
    print("-- the proxy's own view against the engine-facts figure (no truth on real hardware)")
    print_distribution(ok)
    print_context(rows, energy)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "energy": energy}, indent=1))


if __name__ == "__main__":
    main()
