"""The simulated GPU's energy counter refreshes at the configured period (attribution's granularity studies)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from qtrap_sim.backend import SimBackend, SimBackendConfig


def test_counter_period_reaches_the_gpu_and_defaults_to_an_h100s() -> None:
    assert SimBackend(SimBackendConfig(model="qwen3-8b")).gpu.update_s == pytest.approx((0.085, 0.115))
    b = SimBackend(SimBackendConfig(model="qwen3-8b", counter_update_ms=(17, 23)))
    assert b.gpu.update_s == pytest.approx((0.017, 0.023))


@pytest.mark.parametrize("bad", [(0.5, 2.0), (30.0, 20.0), (5.0, 20_000.0)])
def test_counter_period_is_bounded(bad: tuple[float, float]) -> None:
    with pytest.raises(ValidationError, match="counter_update_ms"):
        SimBackendConfig(model="qwen3-8b", counter_update_ms=bad)
