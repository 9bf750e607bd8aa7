"""The shipped H200 profile against the committed real-vLLM measurements (docs/results/h200-vllm-2026-12-05).

Each measured level (shape x precision x concurrency) is recomputed from qtrap_sim/profiles/h200.json through
the simulator's own CalibratedPerf at the level's mean engine step (bench/fit_vllm_profiles.py: rows and
context of loadgen's synthetic chains at that concurrency, prefix caching included), and must land within
15% of real vLLM's J/token and tokens/s; the B* each implies (or "no crossover") must match real vLLM's
within one sweep step. Qwen3-32B was measured on three machine starts (BF16 beside W4A16, beside FP8, beside
W8A8): every cell is checked against its own run, and B* on the ratio to the BF16 of the same run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

from qtrap_sim.perf import CalibratedPerf, kernel_of, load_profile

ROOT = Path(__file__).resolve().parents[3]
TOLERANCE = 0.15


def _fit_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "fit_vllm_profiles", ROOT / "bench" / "fit_vllm_profiles.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def fit() -> ModuleType:
    return _fit_module()


@pytest.fixture(scope="module")
def rows(fit: ModuleType) -> list[dict[str, object]]:
    return fit.table()  # type: ignore[no-any-return]


def test_every_committed_level_is_compared(fit: ModuleType, rows: list[dict[str, object]]) -> None:
    folders = {p.parent.name for p in fit.RESULTS.glob("*/e2e-summary.json")}
    assert folders == {run for runs in fit.RUNS.values() for run in runs}  # no result folder left out
    for shape in fit.SHAPES:
        for run in fit.RUNS[shape]:
            doc = json.loads((fit.RESULTS / run / "e2e-summary.json").read_text())
            complete = [
                lv for lv in doc["levels"] if lv.get("j_per_token") is not None and lv.get("avg_power_w")
            ]
            assert len([r for r in rows if r["shape"] == shape and r["run"] == run]) == len(complete) > 0
    # 0.6B: 4 precisions x 6 levels; 8B: 4 x 5 + 2; 32B: three runs of 2 precisions x 5 levels
    # (BF16 + W4A16, BF16 + FP8, BF16 + W8A8)
    assert len(rows) == 24 + 22 + 10 + 10 + 10
    assert {r["precision"] for r in rows if r["shape"] == "qwen3-32b"} == {"bf16", "fp8", "w8a8", "w4a16"}


def test_j_per_token_and_throughput_within_15_percent(rows: list[dict[str, object]]) -> None:
    bad = [
        f"{r['shape']} {r['precision']} C={r['concurrency']}: J/token x{r['j_ratio']:.3f}, "
        f"tok/s x{r['tps_ratio']:.3f}"
        for r in rows
        if abs(float(r["j_ratio"]) - 1) > TOLERANCE or abs(float(r["tps_ratio"]) - 1) > TOLERANCE  # type: ignore[arg-type]
    ]
    assert not bad, "\n".join(bad)


def test_b_star_matches_real_vllm_within_one_sweep_step(
    fit: ModuleType, rows: list[dict[str, object]]
) -> None:
    checked = 0
    for b in fit.b_stars(rows):
        cs: list[int] = b["concurrency"]
        real, sim = b["real_b_star"], b["sim_b_star"]
        where = f"{b['shape']} {b['precision']}: real {real}, sim {sim}"
        if real is None or sim is None:
            assert real is None and sim is None, where
        else:
            # within one sweep step: at most one level of the sweep lies between them
            lo, hi = sorted((real, sim))
            between = [c for c in cs if lo < c < hi]
            assert len(between) <= 1, where
        checked += 1
    assert checked == 9  # 0.6B and 8B: fp8, w8a8, w4a16; 32B: w4a16, fp8, w8a8 (each in its own run)


def test_quantized_cheaper_on_the_8b_shape_at_every_level(
    fit: ModuleType, rows: list[dict[str, object]]
) -> None:
    """What real vLLM showed on the H200 for Qwen3-8B, and the simulator must keep: no trap."""
    for b in fit.b_stars(rows):
        if b["shape"] == "qwen3-8b":
            assert max(b["sim_ratio"]) < 0.95 and max(b["real_ratio"]) < 0.95, b


def test_32b_bf16_run_to_run_spread_is_reported_and_the_simulator_sits_inside_it(
    fit: ModuleType, rows: list[dict[str, object]]
) -> None:
    """The three 32B runs' BF16 servers are the same server on separate machine starts: their spread is
    printed (run to run, not a model error), and the simulator's one BF16 lies between the runs."""
    spread = fit.bf16_spread(rows)
    assert [s["concurrency"] for s in spread] == [1, 4, 16, 64, 128]
    for s in spread:
        assert set(s["runs"]) == set(fit.RUNS["qwen3-32b"]) and s["j_spread"] > 1
        j = [r["j_per_token"] for r in s["runs"].values()]
        assert min(j) < s["sim_j_per_token"] < max(j), s
    assert "BF16 run to run" in fit.markdown(rows)


def test_profile_maps_precision_labels_to_vllm_kernels() -> None:
    assert kernel_of("h200", "int4") == "int4_w4a16"
    assert kernel_of("h200", "fp8") == "fp8_w8a8"
    assert kernel_of("h200", "w8a8") == "int8_w8a8"
    assert kernel_of("h100", "int4") == "int4_tinygemm"  # the kernel-probe profile keeps its what-ifs
    prof = load_profile("h200")
    assert prof["kind"] == "serving" and prof["gpu_name"] == "NVIDIA H200"
    for shape in ("qwen3-0.6b", "qwen3-8b", "qwen3-32b"):
        assert set(prof["models"][shape]["kernels"]) == {"bf16", "fp8_w8a8", "int8_w8a8", "int4_w4a16"}


def test_per_step_host_overhead_dominates_the_small_shape() -> None:
    """The 0.6B shape is launch-bound on vLLM: its fixed per-step time exceeds the time to stream its
    weights, and one decode step costs about the same at every precision."""
    steps = {
        k: CalibratedPerf("h200", "qwen3-0.6b", k) for k in ("bf16", "fp8_w8a8", "int8_w8a8", "int4_w4a16")
    }
    for perf in steps.values():
        assert perf.t0 > perf.a
    times = [p.step(1, 150).time_s for p in steps.values()]
    assert max(times) / min(times) < 1.15
    assert all(math.isfinite(t) and t > 0 for t in times)
