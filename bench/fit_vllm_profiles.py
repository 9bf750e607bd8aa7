"""Fit qtrap_sim's H200 profile to real vLLM serving (docs/results/h200-vllm-2026-12-05), and print how well
the shipped profile reproduces every measured cell.

    python bench/fit_vllm_profiles.py fit      # writes qtrap_sim/profiles/h200.json (needs scipy: .[bench])
    python bench/fit_vllm_profiles.py check    # the sim-vs-real table (markdown) from the shipped profile

What is fitted. The measurements are closed-loop loadgen sweeps (synthetic chains, one request per hop, 64
output tokens per request, ``ignore_eos``) through qtrap-proxy into vLLM 0.26.0. At concurrency C every
running request makes one token per engine step, so a level's output tokens/s gives the mean step time
(t = C / tokens_per_s) and its mean power gives the mean step energy (E = P * t). The simulator's engine runs
the same workload with C requests in its batch: per step C*(M-1)/M decoding rows plus, for the C/M requests
admitted, their uncached prompt tokens as prefill rows (vLLM's prefix caching: ``qtrap_sim/prefix_cache.py``);
attention reads every running request's context. ``serving_point`` computes those rows and context tokens
from the same synthetic chains loadgen sends (replayed through the simulator's prefix cache), and the fit
chooses, per shape and kernel, the per-step fixed time t0 (vLLM's host and launch time per step, which
dominates a 0.6B model), the weight-streaming floor A, the per-row compute B, the step and row energies, and
per shape the attention cost per context token, so that CalibratedPerf.step(rows, ctx) matches each level's
t and E. The weight-streaming time A is not free: it is the kernel's weight bytes over the H200's memory
bandwidth at the fitted efficiency (one efficiency per shape), so that t0 stays the overhead that remains.
Where a level still differs from the smooth model by more than 5% the profile's per-rows correction (the
mechanism the H100 profile uses) takes the rest, and the table says so (``corr``).

Qwen3-32B was measured in three runs (RUNS), separate machine starts each with its own BF16 server beside one
quantized one: the fit takes BF16 as the runs' geometric mean and each quantized level at the ratio to BF16 its
own run measured (``fit_points``); the check compares every cell with its own run, takes B* on the ratio to the
same run's BF16, and prints the BF16 spread between the runs (``bf16_spread``): the run-to-run variation.

``check`` is independent of the fit: it recomputes every cell from the shipped JSON through the simulator's
own CalibratedPerf and prints measured and simulated J/token and tokens/s, their ratio and the B* each
implies. tests/unit/sim/test_h200_profile.py asserts the same 15% and B* agreement.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadgen.analysis import crossings  # noqa: E402
from loadgen.chains import carried_step, hop_prompt  # noqa: E402
from loadgen.datasets import synthetic  # noqa: E402
from qtrap_sim.perf import CalibratedPerf, load_profile  # noqa: E402
from qtrap_sim.prefix_cache import PrefixCache  # noqa: E402
from qtrap_sim.textgen import count_tokens  # noqa: E402

RESULTS = ROOT / "docs" / "results" / "h200-vllm-2026-12-05"
PROFILE = ROOT / "qtrap_sim" / "profiles" / "h200.json"
SHAPES = ("qwen3-0.6b", "qwen3-8b", "qwen3-32b")
# the runs (result folders) of each shape: each a separate vLLM server pair on its own machine start, with
# BF16 beside the quantized precisions it was run with. 32B: BF16+W4A16 (KV_TOKENS=80000), BF16+FP8 and
# BF16+W8A8 (KV_TOKENS=60000; at most 128 requests of ~190 tokens, so the KV size never binds here).
RUNS = {
    "qwen3-0.6b": ("qwen3-0.6b",),
    "qwen3-8b": ("qwen3-8b",),
    "qwen3-32b": ("qwen3-32b", "qwen3-32b-fp8", "qwen3-32b-w8a8"),
}
# precision label in the measurements -> kernel name in the profile
KERNELS = {"bf16": "bf16", "fp8": "fp8_w8a8", "w8a8": "int8_w8a8", "w4a16": "int4_w4a16"}
KERNEL_NOTES = {
    "bf16": "BF16 GEMMs (cuBLAS), FlashAttention 3",
    "fp8_w8a8": "--quantization fp8: FP8 weights per tensor, dynamic per-token FP8 activations, "
    "CutlassFP8ScaledMMLinearKernel",
    "int8_w8a8": "compressed-tensors W8A8 INT8 (per-channel weights, dynamic per-token activations), "
    "CutlassInt8ScaledMMLinearKernel",
    "int4_w4a16": "compressed-tensors W4A16 INT4 (group 128, symmetric), MacheteLinearKernel",
}
# model shapes (public config.json values): linear parameters and embedding parameters
SHAPE_PARAMS = {
    "qwen3-0.6b": dict(hidden=1024, inter=3072, layers=28, heads=16, kv_heads=8, head_dim=128, vocab=151936, tie=True),
    "qwen3-8b": dict(hidden=4096, inter=12288, layers=36, heads=32, kv_heads=8, head_dim=128, vocab=151936, tie=False),
    "qwen3-32b": dict(hidden=5120, inter=25600, layers=64, heads=64, kv_heads=8, head_dim=128, vocab=151936, tie=False),
}  # fmt: skip
WEIGHT_BYTES = {"bf16": 2.0, "fp8_w8a8": 1.0, "int8_w8a8": 1.0, "int4_w4a16": 0.5 + 2 / 128}
H200_PEAK_BW = 4.8e12  # bytes/s, HBM3e (NVIDIA's H200 datasheet)
P_EXP = 8.0  # smooth-max exponent between the weight-streaming floor and the per-row compute


def _linear_params(shape: str) -> tuple[int, int]:
    s = SHAPE_PARAMS[shape]
    q = s["heads"] * s["head_dim"]
    kv = s["kv_heads"] * s["head_dim"]
    lin = s["layers"] * (s["hidden"] * (q + 2 * kv) + q * s["hidden"] + 3 * s["hidden"] * s["inter"])
    lm_head = s["vocab"] * s["hidden"]  # read every step (tied or not); BF16 in every kernel
    return lin, lm_head


def weight_bytes(shape: str, kernel: str) -> float:
    lin, lm_head = _linear_params(shape)
    return lin * WEIGHT_BYTES[kernel] + lm_head * 2


# -- the workload -------------------------------------------------------------------------------------
def workload(max_tokens: int = 64, chains: int = 400, seed: int = 0) -> dict[str, float]:
    """Mean prompt tokens, uncached (prefilled) prompt tokens and context of loadgen's synthetic chains as
    the simulator counts them (words, 4 chat-template tokens), each hop's answer ``max_tokens`` words."""
    rng = random.Random(seed)
    cache = PrefixCache()
    prompts = uncached = n = 0
    for p in synthetic(chains, seed):
        steps: list[str] = []
        for hop in range(1, p.hops + 1):
            text = hop_prompt(p, hop, steps)
            tokens = count_tokens(text) + 4
            cached = min(cache.admit(text.split()), tokens - 1)
            prompts += tokens
            uncached += tokens - cached
            n += 1
            steps.append(carried_step(" ".join(f"w{rng.randrange(4, 150000)}" for _ in range(max_tokens))))
    return {"requests": n, "prompt_tokens": prompts / n, "prefill_tokens": uncached / n,
            "max_tokens": max_tokens}  # fmt: skip


def serving_point(c: int, w: dict[str, float]) -> tuple[float, float]:
    """(rows, context tokens) of a mean engine step at concurrency ``c`` (module docstring)."""
    m = w["max_tokens"]
    admitted = c / m
    decoding = c - admitted
    rows = decoding + admitted * w["prefill_tokens"]
    ctx = decoding * (w["prompt_tokens"] + m / 2) + admitted * w["prompt_tokens"]
    return rows, ctx


def measured(shape: str) -> list[dict[str, Any]]:
    """The levels of a shape's committed runs with a complete window (tokens/s, power, J/token, its CI),
    each tagged with its run (result folder)."""
    out = []
    for run in RUNS[shape]:
        doc = json.loads((RESULTS / run / "e2e-summary.json").read_text())
        for lv in doc["levels"]:
            if not lv.get("tokens_per_s") or not lv.get("avg_power_w") or lv.get("j_per_token") is None:
                continue
            out.append({"run": run, "precision": lv["precision"], "concurrency": lv["concurrency"],
                        "tokens_per_s": lv["tokens_per_s"], "power_w": lv["avg_power_w"],
                        "j_per_token": lv["j_per_token"], "ci": lv.get("j_per_token_ci")})  # fmt: skip
    return out


def _gmean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def fit_points(shape: str, w: dict[str, float]) -> list[dict[str, Any]]:
    """The step time and energy each fitted level must cost, one point per kernel and concurrency.

    One run: its levels as measured. Several runs of a shape (each with its own BF16): BF16 at each C is the
    geometric mean of the runs' step times and step energies, and each quantized level is moved by its own
    run's offset from that mean at the same C (its time by mean_t / t_bf16_run, its energy likewise), so the
    fit sees every quantized kernel at the ratio to BF16 that its own run measured, on the runs' mean BF16."""
    cells = measured(shape)
    step = {(c["run"], c["precision"], c["concurrency"]): (c["concurrency"] / c["tokens_per_s"],
            c["power_w"] * c["concurrency"] / c["tokens_per_s"]) for c in cells}  # fmt: skip
    base: dict[int, list[tuple[str, float, float]]] = {}
    for (run, prec, c), (t, e) in step.items():
        if prec == "bf16":
            base.setdefault(c, []).append((run, t, e))
    mean = {c: (_gmean([t for _, t, _ in v]), _gmean([e for _, _, e in v])) for c, v in base.items()}
    pts = []
    for c, (t, e) in sorted(mean.items()):
        rows, ctx = serving_point(c, w)
        pts.append({"kernel": "bf16", "concurrency": c, "rows": rows, "ctx": ctx, "t": t, "e": e,
                    "runs": sorted(run for run, _, _ in base[c])})  # fmt: skip
    for (run, prec, c), (t, e) in sorted(step.items()):
        if prec == "bf16":
            continue
        rows, ctx = serving_point(c, w)
        ft = fe = 1.0
        if len(RUNS[shape]) > 1 and (run, "bf16", c) in step:
            tb, eb = step[(run, "bf16", c)]
            ft, fe = mean[c][0] / tb, mean[c][1] / eb
        pts.append({"kernel": KERNELS[prec], "concurrency": c, "rows": rows, "ctx": ctx, "t": t * ft,
                    "e": e * fe, "runs": [run], "offset": [round(ft, 4), round(fe, 4)]})  # fmt: skip
    return pts


def idle_power_w() -> float:
    """The H200's idle draw before the runs (gpu.csv: nvidia-smi's power.draw with no server up)."""
    for line in (RESULTS / "gpu.csv").read_text().splitlines()[1:]:
        return float(line.split(",")[3].strip().split()[0])
    raise ValueError("gpu.csv has no reading")


# -- fit ----------------------------------------------------------------------------------------------
def _smax(a: float, b: float) -> float:
    return float((a**P_EXP + b**P_EXP) ** (1 / P_EXP))


def fit() -> dict[str, Any]:
    import numpy as np
    from scipy.optimize import least_squares, nnls

    w = workload()
    p_idle = idle_power_w()
    prof: dict[str, Any] = {
        "schema_version": 1,
        "gpu": "h200",
        "gpu_name": "NVIDIA H200",
        "kind": "serving",
        "engine": "vLLM 0.26.0 (V1 engine, CUDA graphs, FlashAttention 3, prefix caching)",
        "sources": [
            {
                "dir": str(RESULTS.relative_to(ROOT)),
                "runs": {shape: list(runs) for shape, runs in RUNS.items()},
                "gpu": "NVIDIA H200 141GB HBM3e, driver 580.159.04",
                "workload": w,
            }
        ],
        "idle_power_w": round(p_idle, 2),
        "precisions": {
            "bf16": "bf16",
            "fp16": "bf16",
            "fp8": "fp8_w8a8",
            "w8a8-fp8": "fp8_w8a8",
            "int8": "int8_w8a8",
            "w8a8": "int8_w8a8",
            "int4": "int4_w4a16",
            "w4a16": "int4_w4a16",
            "awq": "int4_w4a16",
            "gptq": "int4_w4a16",
        },
        "kernel_notes": KERNEL_NOTES,
        "models": {},
    }
    for shape in SHAPES:
        fpts = fit_points(shape, w)
        kernels = sorted({p["kernel"] for p in fpts})
        layers = SHAPE_PARAMS[shape]["layers"]
        pts = [(p["kernel"], p["concurrency"], p["rows"], p["ctx"], p["t"], p["e"]) for p in fpts]
        ki = {k: i for i, k in enumerate(kernels)}

        # time: per kernel (t0, B), per shape (bandwidth efficiency, attention s per ctx token)
        def t_model(
            x: Any, k: str, rows: float, ctx: float, shape: str = shape, ki: dict[str, int] = ki
        ) -> float:
            eff, a1 = x[0], x[1]
            t0, b = x[2 + 2 * ki[k]], x[3 + 2 * ki[k]]
            a = weight_bytes(shape, k) / (H200_PEAK_BW * eff)
            return t0 + _smax(a, b * rows) + a1 * ctx

        def resid(x: Any, pts: list[Any] = pts, t_model: Any = t_model) -> Any:
            return np.array([math.log(t_model(x, k, r, cx) / t) for k, _, r, cx, t, _ in pts])

        x0 = [0.7, 1e-8] + [1e-3, 2e-5] * len(kernels)
        lo = [0.2, 0.0] + [0.0, 0.0] * len(kernels)
        hi = [1.0, 1e-6] + [0.05, 1e-2] * len(kernels)
        fitted = least_squares(resid, x0, bounds=(lo, hi), x_scale="jac")
        x = fitted.x
        eff, a1 = float(x[0]), float(x[1])

        # energy: E - P_idle*t = e0 + e1*rows (per kernel) + ea*ctx (per shape), non-negative least squares
        cols = 2 * len(kernels) + 1
        A_mat = np.zeros((len(pts), cols))
        y = np.zeros(len(pts))
        for i, (k, _, r, cx, t, e) in enumerate(pts):
            tm = t_model(x, k, r, cx)
            A_mat[i, 2 * ki[k]] = 1.0
            A_mat[i, 2 * ki[k] + 1] = r
            A_mat[i, -1] = cx
            y[i] = (
                e * (tm / t) - p_idle * tm
            )  # the energy the model's step time implies at the measured power
        scale = np.maximum(np.abs(A_mat).max(axis=0), 1e-30)
        sol, _ = nnls(A_mat / scale / y[:, None], np.ones(len(pts)))  # relative residuals
        sol = sol / scale
        ea = float(sol[-1])
        model: dict[str, Any] = {
            "shape": SHAPE_PARAMS[shape],
            "attention": {
                "layers": layers,
                "a0_s": 0.0,
                "a1_s_per_ctx_token": a1 / layers,
                "e_j_per_ctx_token": ea / layers,
                "fit": "per shape, all kernels",
            },
            "bandwidth_efficiency": round(eff, 4),
            "kernels": {},
        }
        for k in kernels:
            t0, b = float(x[2 + 2 * ki[k]]), float(x[3 + 2 * ki[k]])
            e0, e1 = float(sol[2 * ki[k]]), float(sol[2 * ki[k] + 1])
            entry: dict[str, Any] = {
                "bits": {"bf16": 16, "fp8_w8a8": 8, "int8_w8a8": 8, "int4_w4a16": 4}[k],
                "linear_bytes": weight_bytes(shape, k),
                "note": KERNEL_NOTES[k],
                "time": {
                    "t0_s": t0,
                    "weights_s": weight_bytes(shape, k) / (H200_PEAK_BW * eff),
                    "compute_s_per_row": b,
                    "quant_s_per_row": 0.0,
                    "p": P_EXP,
                },
                "energy": {"step_j": e0, "row_j": e1},
                "correction": {"batches": [1], "time": [1.0], "energy": [1.0]},
                "measured": [],
            }
            model["kernels"][k] = entry
        prof["models"][shape] = model
        # per-rows corrections where the smooth model misses a level by more than 5%
        PROFILE.write_text(json.dumps(prof, indent=1) + "\n")
        load_profile.cache_clear()
        for k in kernels:
            perf = CalibratedPerf("h200", shape, k)
            mine = sorted((p for p in fpts if p["kernel"] == k), key=lambda p: p["rows"])
            batches, kt, ke = [], [], []
            for p in mine:
                c_, r, cx, t, e = p["concurrency"], p["rows"], p["ctx"], p["t"], p["e"]
                t_lin, e_lin = perf.linear_cost(round(r))
                t_att = perf.att_fixed_s + perf.att_ctx_s * cx
                e_att = perf.idle_power_w * t_att + perf.att_ctx_j * cx
                ct = max(0.2, (t - t_att) / t_lin)
                ce = max(0.2, (e - e_att) / e_lin)
                batches.append(round(r))
                kt.append(round(ct, 4) if abs(ct - 1) > 0.05 else 1.0)
                ke.append(round(ce, 4) if abs(ce - 1) > 0.05 else 1.0)
                rec = {"concurrency": c_, "rows": round(r, 1), "ctx": round(cx), "step_s": t, "step_j": e,
                       "runs": p["runs"]}  # fmt: skip
                if "offset" in p and p["offset"] != [1.0, 1.0]:
                    rec["bf16_offset_time_energy"] = p["offset"]
                model["kernels"][k]["measured"].append(rec)
            model["kernels"][k]["correction"] = {"batches": batches, "time": kt, "energy": ke}
        PROFILE.write_text(json.dumps(prof, indent=1) + "\n")
        load_profile.cache_clear()
        print(f"{shape}: bandwidth efficiency {eff:.2f}, attention {a1 * 1e9:.3g} ns and {ea * 1e6:.3g} uJ per "
              f"context token; " + ", ".join(f"{k}: t0 {x[2 + 2 * ki[k]] * 1e3:.2f} ms" for k in kernels))  # fmt: skip
    return prof


# -- check --------------------------------------------------------------------------------------------
def predict(shape: str, precision: str, c: int, w: dict[str, float] | None = None) -> dict[str, float]:
    """The simulator's steady state for the measured workload: tokens/s, power, J/token."""
    w = w or workload()
    rows, ctx = serving_point(c, w)
    step = CalibratedPerf("h200", shape, KERNELS[precision]).step(round(rows), round(ctx))
    return {"tokens_per_s": c / step.time_s, "power_w": step.energy_j / step.time_s,
            "j_per_token": step.energy_j / c}  # fmt: skip


def table() -> list[dict[str, Any]]:
    w = workload()
    rows = []
    for shape in SHAPES:
        for cell in measured(shape):
            sim = predict(shape, cell["precision"], cell["concurrency"], w)
            rows.append({"shape": shape, **cell, "sim": sim,
                         "j_ratio": sim["j_per_token"] / cell["j_per_token"],
                         "tps_ratio": sim["tokens_per_s"] / cell["tokens_per_s"]})  # fmt: skip
    return rows


def b_star_of_ratios(cs: list[int], ratios: list[float]) -> float | None:
    """The first crossing of a ratio curve through 1 (loadgen's interpolation), or None."""
    found = crossings(cs, ratios)
    return found[0][0] if found else None


def b_stars(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """B* (first crossing of quantized/BF16 J/token through 1) measured and simulated, per shape, run and
    precision, with the ratio at each level. The real ratio is taken within a run (the quantized server over
    the BF16 server of the same machine start); the simulator has one BF16 per shape."""
    out = []
    for shape in SHAPES:
        for run in RUNS[shape]:
            mine = [r for r in rows if r["shape"] == shape and r["run"] == run]
            base = {r["concurrency"]: r for r in mine if r["precision"] == "bf16"}
            for prec in sorted({r["precision"] for r in mine} - {"bf16"}):
                pts = sorted((r for r in mine if r["precision"] == prec and r["concurrency"] in base),
                             key=lambda r: r["concurrency"])  # fmt: skip
                cs = [r["concurrency"] for r in pts]
                real = [r["j_per_token"] / base[r["concurrency"]]["j_per_token"] for r in pts]
                sim = [r["sim"]["j_per_token"] / base[r["concurrency"]]["sim"]["j_per_token"] for r in pts]
                out.append({"shape": shape, "run": run, "precision": prec, "concurrency": cs,
                            "real_ratio": real, "sim_ratio": sim, "real_b_star": b_star_of_ratios(cs, real),
                            "sim_b_star": b_star_of_ratios(cs, sim)})  # fmt: skip
    return out


def bf16_spread(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per shape with several runs and per C: each run's BF16 J/token, tokens/s and power, and the spread
    (largest over smallest) between the runs: the run-to-run (machine start to machine start) variation."""
    out = []
    for shape in SHAPES:
        if len(RUNS[shape]) < 2:
            continue
        bf = [r for r in rows if r["shape"] == shape and r["precision"] == "bf16"]
        for c in sorted({r["concurrency"] for r in bf}):
            by_run = {r["run"]: r for r in bf if r["concurrency"] == c}
            if len(by_run) < 2:
                continue
            j = [r["j_per_token"] for r in by_run.values()]
            out.append({"shape": shape, "concurrency": c, "runs": by_run,
                        "j_spread": max(j) / min(j),
                        "tps_spread": max(r["tokens_per_s"] for r in by_run.values())
                        / min(r["tokens_per_s"] for r in by_run.values()),
                        "power_spread": max(r["power_w"] for r in by_run.values())
                        / min(r["power_w"] for r in by_run.values()),
                        "sim_j_per_token": next(iter(by_run.values()))["sim"]["j_per_token"]})  # fmt: skip
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    L = ["| shape | run | precision | C | J/token real | J/token sim | sim/real | tok/s real | tok/s sim | sim/real |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        L.append(f"| {r['shape']} | {r['run']} | {r['precision']} | {r['concurrency']} | {r['j_per_token']:.4g} | "
                 f"{r['sim']['j_per_token']:.4g} | {r['j_ratio']:.3f} | {r['tokens_per_s']:,.0f} | "
                 f"{r['sim']['tokens_per_s']:,.0f} | {r['tps_ratio']:.3f} |")  # fmt: skip
    worst_j = max(abs(r["j_ratio"] - 1) for r in rows)
    worst_t = max(abs(r["tps_ratio"] - 1) for r in rows)
    L.append(f"\nWorst cell: J/token {worst_j:.1%}, tokens/s {worst_t:.1%} off ({len(rows)} cells).\n")
    L.append("| shape | worst J/token off | worst tok/s off | cells |")
    L.append("| --- | --- | --- | --- |")
    for shape in SHAPES:
        mine = [r for r in rows if r["shape"] == shape]
        L.append(f"| {shape} | {max(abs(r['j_ratio'] - 1) for r in mine):.1%} | "
                 f"{max(abs(r['tps_ratio'] - 1) for r in mine):.1%} | {len(mine)} |")  # fmt: skip
    L.append("")
    L.append("| shape | run | precision | B* real | B* sim | quantized/BF16 J/token by C (real / sim) |")
    L.append("| --- | --- | --- | --- | --- | --- |")
    for b in b_stars(rows):
        pairs = "; ".join(f"{c}: {r:.2f}/{s:.2f}" for c, r, s in zip(b["concurrency"], b["real_ratio"],
                                                                    b["sim_ratio"], strict=True))  # fmt: skip
        fmt = lambda x: "none in range" if x is None else f"{x:.3g}"  # noqa: E731
        L.append(
            f"| {b['shape']} | {b['run']} | {b['precision']} | {fmt(b['real_b_star'])} | {fmt(b['sim_b_star'])} "
            f"| {pairs} |"
        )
    spread = bf16_spread(rows)
    if spread:
        L.append("\nBF16 run to run (the same server on separate machine starts): J/token by run "
                 "(tok/s, W), the spread max/min, and the simulator's one BF16\n")  # fmt: skip
        for shape in SHAPES:
            mine = [s for s in spread if s["shape"] == shape]
            if not mine:
                continue
            runs = RUNS[shape]
            L.append(
                "| shape | C | " + " | ".join(runs) + " | J/token spread | tok/s spread | W spread | sim |"
            )
            L.append("| --- | --- | " + " | ".join("---" for _ in runs) + " | --- | --- | --- | --- |")
            for s_ in mine:
                cols = []
                for run in runs:
                    r = s_["runs"].get(run)
                    cols.append("-" if r is None else f"{r['j_per_token']:.4g} ({r['tokens_per_s']:,.0f}, "
                                f"{r['power_w']:.0f})")  # fmt: skip
                L.append(f"| {shape} | {s_['concurrency']} | " + " | ".join(cols) + f" | {s_['j_spread']:.3f} | "
                         f"{s_['tps_spread']:.3f} | {s_['power_spread']:.3f} | {s_['sim_j_per_token']:.4g} |")  # fmt: skip
    return "\n".join(L) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["fit", "check"])
    a = ap.parse_args()
    if a.cmd == "fit":
        fit()
    print(markdown(table()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
