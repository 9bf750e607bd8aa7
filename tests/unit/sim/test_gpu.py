"""The simulated GPU's energy counter."""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time

import pytest

from qtrap_sim.gpu import SimGPU


def test_counter_steps_about_every_100ms_and_never_backwards() -> None:
    async def run() -> tuple[list[float], list[int]]:
        gpu = SimGPU(0, "test", idle_power_w=100.0)
        gpu.start()
        seen: list[int] = [gpu.counter_mj]
        changes: list[float] = []
        t_end = time.monotonic() + 1.6
        while time.monotonic() < t_end:
            # alternate busy steps (500 W) and idle gaps while polling the visible counter
            now = time.monotonic()
            gpu.begin_step(now, 500.0)
            await asyncio.sleep(0.004)
            gpu.end_step(time.monotonic(), 500.0 * (time.monotonic() - now))
            await asyncio.sleep(0.002)
            if gpu.counter_mj != seen[-1]:
                changes.append(time.monotonic())
            seen.append(gpu.counter_mj)
        await gpu.stop()
        return changes, seen

    changes, seen = asyncio.run(run())
    assert all(b >= a for a, b in itertools.pairwise(seen)), "counter ran backwards"
    gaps = [b - a for a, b in itertools.pairwise(changes)]
    assert len(gaps) >= 10
    assert 0.08 <= statistics.median(gaps) <= 0.125
    assert min(gaps) >= 0.075  # it never moves faster than the NVML-like cadence


def test_energy_integrates_steps_and_idle_exactly() -> None:
    gpu = SimGPU(0, "test", idle_power_w=100.0)
    t0 = gpu._last_t
    gpu.begin_step(t0 + 1.0, 400.0)  # 1 s idle: 100 J
    gpu.end_step(t0 + 1.5, 200.0)  # a 0.5 s step worth 200 J
    assert gpu.energy_j(t0 + 1.5) == pytest.approx(300.0)
    assert gpu.energy_j(t0 + 2.5) == pytest.approx(400.0)  # then idle again
    gpu.refresh(t0 + 2.5)
    assert gpu.counter_mj == 400_000
    gpu.refresh(t0 + 2.0)  # an older reading never lowers the visible counter
    assert gpu.counter_mj == 400_000


def test_dcgm_text_parses() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    gpu = SimGPU(3, "NVIDIA H100 80GB HBM3 (simulated)", idle_power_w=100.0)
    gpu.counter_mj = 1234
    fams = {f.name: f for f in text_string_to_metric_families(gpu.dcgm_text())}
    energy = fams["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"]
    assert energy.type == "counter"
    sample = energy.samples[0]
    assert sample.value == 1234 and sample.labels["gpu"] == "3" and sample.labels["UUID"].startswith("GPU-")
    assert fams["DCGM_FI_DEV_POWER_USAGE"].samples[0].value == pytest.approx(100.0)
