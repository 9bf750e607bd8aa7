"""The simulator in real time against real vLLM: the measured workload replayed through qtrap_sim.

bench/fit_vllm_profiles.py checks the H200 profile cell by cell at each level's mean engine step; this runs
the simulator itself (its batching engine, prefix cache and energy counter, in real time) behind a real
qtrap-proxy with its DCGM meter, drives it with loadgen exactly as bench/gpu/vllm_e2e.sh drove vLLM
(synthetic chains, one request per hop, 64 output tokens, ``ignore_eos``, steady-state windows), and prints
J/token and tokens/s next to the committed measurements (docs/results/h200-vllm-2026-12-05).

    .venv/bin/python bench/sim_vs_vllm.py [--shapes qwen3-8b] [--concurrency 1,4,16,64] [--duration 6]

High concurrency is bounded by this machine, not by the model: on 2 cores the proxy and loadgen cannot carry
the token rates of C >= 128 (8,000-10,000 streamed tokens/s), so the default stops at 64. The engine's
real-time slip is printed: a level whose slip is large ran slower than the model and says so.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadgen.embedded import embedded_stack  # noqa: E402

RESULTS = ROOT / "docs" / "results" / "h200-vllm-2026-12-05"
LABELS = {"bf16": "bf16", "fp8": "fp8", "w8a8": "int8", "w4a16": "int4"}  # measured label -> sim label
# the result folders of each shape (bench/fit_vllm_profiles.py's RUNS): 32B was measured on three machine
# starts, each with its own BF16 server; a simulated BF16 level is compared with every run's BF16
RUNS = {
    "qwen3-0.6b": ("qwen3-0.6b",),
    "qwen3-8b": ("qwen3-8b",),
    "qwen3-32b": ("qwen3-32b", "qwen3-32b-fp8", "qwen3-32b-w8a8"),
}


def measured(shape: str) -> dict[tuple[str, str, int], dict[str, Any]]:
    """(run, sim label, concurrency) -> the measured level, over the shape's runs."""
    out = {}
    for run in RUNS.get(shape, (shape,)):
        doc = json.loads((RESULTS / run / "e2e-summary.json").read_text())
        for lv in doc["levels"]:
            if lv.get("j_per_token"):
                out[(run, LABELS[lv["precision"]], lv["concurrency"])] = lv
    return out


def run_shape(shape: str, concurrency: list[int], duration: float, out: Path) -> list[dict[str, Any]]:
    real = measured(shape)
    precisions = tuple(p for p in ("bf16", "fp8", "int8", "int4") if any(k[1] == p for k in real))
    rows = []
    with embedded_stack(shape, precisions, workdir=out, think_tokens=0) as stack:
        cmd = [
            sys.executable, "-m", "loadgen", "--proxy", stack.url, "--model", shape,
            "--precisions", ",".join(precisions), "--concurrency", ",".join(map(str, concurrency)),
            "--duration", str(duration), "--max-tokens", "64", "--extra-body", '{"ignore_eos": true}',
            "--no-score", "simulated replay of a random-weight measurement", "--bootstrap", "200",
            "--quiet", "--out", str(out / "loadgen"),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"loadgen failed ({proc.returncode}): {proc.stderr[-2000:]}")
        slips = {}
        for p, url in stack.sim_urls.items():
            with urllib.request.urlopen(url + "/sim/v1/energy", timeout=10) as r:
                slips[p] = json.loads(r.read())
    rep = json.loads((out / "loadgen" / "report.json").read_text())
    for lv in rep["levels"]:
        if lv["j_per_token"] is None:
            continue
        for run in RUNS.get(shape, (shape,)):
            m = real.get((run, lv["precision"], lv["concurrency"]))
            if m is None:
                continue
            rows.append(
                {
                    "shape": run,
                    "precision": lv["precision"],
                    "concurrency": lv["concurrency"],
                    "real_j_per_token": m["j_per_token"],
                    "sim_j_per_token": lv["j_per_token"],
                    "real_tokens_per_s": m["tokens_per_s"],
                    "sim_tokens_per_s": lv["tokens_per_s"],
                    "slip": slips.get(lv["precision"]),
                }
            )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    L = [
        "| shape | precision | C | J/token real | J/token sim | sim/real | tok/s real | tok/s sim | sim/real |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        jr = r["sim_j_per_token"] / r["real_j_per_token"]
        tr = r["sim_tokens_per_s"] / r["real_tokens_per_s"]
        L.append(
            f"| {r['shape']} | {r['precision']} | {r['concurrency']} | {r['real_j_per_token']:.4g} | "
            f"{r['sim_j_per_token']:.4g} | {jr:.3f} | {r['real_tokens_per_s']:,.0f} | "
            f"{r['sim_tokens_per_s']:,.0f} | {tr:.3f} |"
        )
    return "\n".join(L) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="qwen3-0.6b,qwen3-8b,qwen3-32b")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--duration", type=float, default=6.0)
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    a = ap.parse_args()
    base = Path(a.out or tempfile.mkdtemp(prefix="qtrap-sim-vs-vllm-"))
    rows: list[dict[str, Any]] = []
    for shape in a.shapes.split(","):
        out = base / shape
        out.mkdir(parents=True, exist_ok=True)
        rows += run_shape(shape, [int(c) for c in a.concurrency.split(",")], a.duration, out)
        print(f"{shape}: done", file=sys.stderr, flush=True)
    print(markdown(rows))
    slips = {
        f"{r['shape']} {r['precision']}": (r["slip"] or {}).get("engine", r["slip"])
        for r in rows
        if r["slip"]
    }
    print("engine real-time slip (from /sim/v1/energy):", json.dumps(slips, default=str)[:2000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
