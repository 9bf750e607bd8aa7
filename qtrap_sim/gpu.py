"""A simulated GPU's energy counter, stepping like NVML's on an H100.

Energy is integrated exactly (every engine step's modelled energy, idle power
in between); what readers see is a cumulative millijoule counter that is
refreshed about every 100 ms (85-115 ms apart, as measured on an H100) and
never runs backwards, plus the average power over the last refresh interval.
Exposed in dcgm-exporter's text format.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid

from qtrap_common.background import Background


class SimGPU(Background):
    def __init__(
        self,
        index: int,
        name: str,
        idle_power_w: float,
        hostname: str = "qtrap-sim",
        update_s: tuple[float, float] = (0.085, 0.115),
    ) -> None:
        self.index = index
        self.name = name
        self.hostname = hostname
        self.uuid = f"GPU-{uuid.uuid4()}"
        self.idle_power_w = idle_power_w
        self.update_s = update_s
        self._acc_j = 0.0  # exact energy up to _last_t
        self._last_t = time.monotonic()
        self._cur_w = idle_power_w  # power of what runs since _last_t
        self.counter_mj = 0  # what readers see
        self.power_w = idle_power_w
        self.updates = 0
        self.task_name = f"sim-gpu-{index}"

    # -- written by the engine ------------------------------------------------
    def begin_step(self, t: float, power_w: float) -> None:
        self._acc_j += self.idle_power_w * max(0.0, t - self._last_t)
        self._last_t = t
        self._cur_w = power_w

    def end_step(self, t: float, energy_j: float) -> None:
        self._acc_j += energy_j
        self._last_t = t
        self._cur_w = self.idle_power_w

    def energy_j(self, now: float | None = None) -> float:
        """Exact energy since start (what the counter converges to)."""
        now = time.monotonic() if now is None else now
        return self._acc_j + self._cur_w * max(0.0, now - self._last_t)

    # -- the stepping counter ---------------------------------------------------
    def refresh(self, now: float | None = None) -> None:
        mj = int(self.energy_j(now) * 1000)
        if mj > self.counter_mj:
            self.counter_mj = mj
        self.updates += 1

    async def _run(self) -> None:
        last_t, last_mj = time.monotonic(), self.counter_mj
        while True:
            await asyncio.sleep(random.uniform(*self.update_s))
            now = time.monotonic()
            self.refresh(now)
            if now > last_t:
                self.power_w = (self.counter_mj - last_mj) / 1000.0 / (now - last_t)
            last_t, last_mj = now, self.counter_mj

    def dcgm_text(self) -> str:
        labels = (
            f'gpu="{self.index}",UUID="{self.uuid}",device="nvidia{self.index}",'
            f'modelName="{self.name}",Hostname="{self.hostname}"'
        )
        return (
            "# HELP DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION Total energy consumption since boot (in mJ).\n"
            "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter\n"
            f"DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{{labels}}} {self.counter_mj}\n"
            "# HELP DCGM_FI_DEV_POWER_USAGE Power draw (in W).\n"
            "# TYPE DCGM_FI_DEV_POWER_USAGE gauge\n"
            f"DCGM_FI_DEV_POWER_USAGE{{{labels}}} {self.power_w:.3f}\n"
        )
