"""The shipped H100 profile against the calibration data measured on an H100."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qtrap_sim.perf import KERNEL_OF_PRECISION, CalibratedPerf, LinearPerf, ProfileError, load_profile

ROOT = Path(__file__).resolve().parents[3]
MODELS = ("qwen3-0.6b", "qwen3-8b")


def _kernels(model: str) -> list[str]:
    return sorted(load_profile("h100")["models"][model]["kernels"])


@pytest.mark.parametrize("model", MODELS)
def test_profile_reproduces_calibration_within_10_percent(model: str) -> None:
    data = json.loads((ROOT / f"docs/calibration/h100-{model}.json").read_text())["models"][model]["kernels"]
    assert len(_kernels(model)) == 7
    for kernel in _kernels(model):
        perf = CalibratedPerf("h100", model, kernel)
        for point in data[kernel]["points"]:
            t, e = perf.linear_cost(point["batch"])
            assert t == pytest.approx(point["step_s"], rel=0.10), (kernel, point["batch"])
            assert e / point["batch"] == pytest.approx(point["step_j"] / point["batch"], rel=0.10), (
                kernel,
                point,
            )


def test_parametric_fit_quality_is_recorded_and_good_for_torch_kernels() -> None:
    for model in MODELS:
        for kernel, k in load_profile("h100")["models"][model]["kernels"].items():
            fe = k["fit_error"]
            uses_table = any(v != 1.0 for v in k["correction"]["time"] + k["correction"]["energy"])
            assert uses_table == (fe["parametric_time_max"] > 0.10 or fe["parametric_j_per_token_max"] > 0.10)
            if kernel in ("bf16", "int8_w8a8", "int8_dequant"):
                assert not uses_table, (model, kernel)


def _jpt(model: str, kernel: str, b: int) -> float:
    return CalibratedPerf("h100", model, kernel).step(b, 0).energy_j / b


def test_profile_expresses_what_h100_kernels_show() -> None:
    m = "qwen3-8b"
    # fused weight-only INT4: cheaper than BF16 at small batch, dearer at large batch
    assert _jpt(m, "int4_tinygemm", 1) < _jpt(m, "bf16", 1)
    assert _jpt(m, "int4_tinygemm", 256) > 1.5 * _jpt(m, "bf16", 256)
    for b in (1, 4, 16, 64, 256):
        # naive dequantise-then-matmul and library 8-bit: dearer at every batch
        assert _jpt(m, "int8_dequant", b) > _jpt(m, "bf16", b)
        assert _jpt(m, "bnb_int8", b) > _jpt(m, "bf16", b)
    # FP8 relative to BF16 is much better for the larger model
    r_small = _jpt("qwen3-0.6b", "fp8_w8a8", 1) / _jpt("qwen3-0.6b", "bf16", 1)
    r_large = _jpt(m, "fp8_w8a8", 1) / _jpt(m, "bf16", 1)
    assert r_large < 1.0 < r_small


def test_attention_cost_grows_with_context_and_power_with_load() -> None:
    p = CalibratedPerf("h100", "qwen3-8b", "bf16")
    short, long = p.step(64, 64 * 512), p.step(64, 64 * 4096)
    assert long.time_s > short.time_s and long.energy_j > short.energy_j
    idle = p.idle_power_w
    light, heavy = p.step(1, 100), p.step(256, 256 * 1024)
    assert idle < light.energy_j / light.time_s < heavy.energy_j / heavy.time_s


def test_marginal_costs_do_not_exceed_the_step() -> None:
    for kernel in _kernels("qwen3-8b"):
        c = CalibratedPerf("h100", "qwen3-8b", kernel).step(200, 200 * 1000)
        assert 0 < 200 * c.row_j + 200 * 1000 * c.ctx_j < c.energy_j


def test_every_precision_label_maps_to_a_kernel() -> None:
    for label, kernel in KERNEL_OF_PRECISION.items():
        assert kernel in _kernels("qwen3-8b"), label


def test_unknown_profile_entries_are_clear_errors() -> None:
    with pytest.raises(ProfileError, match="no calibrated profile for GPU 'a100'"):
        CalibratedPerf("a100", "qwen3-8b", "bf16")
    with pytest.raises(ProfileError, match="no model 'llama'"):
        CalibratedPerf("h100", "llama", "bf16")
    with pytest.raises(ProfileError, match="no kernel 'int2'"):
        CalibratedPerf("h100", "qwen3-8b", "int2")


def test_linear_model_is_constant_power() -> None:
    c = LinearPerf(0.01, 0.0001, busy_power_w=300.0).step(10, 0)
    assert c.time_s == pytest.approx(0.011) and c.energy_j == pytest.approx(300.0 * 0.011)
