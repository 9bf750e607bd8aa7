"""Stopping background tasks: bounded, and a cancellation that gets lost costs a round, not the shutdown."""

from __future__ import annotations

import asyncio
import time

import pytest

from qtrap_common.background import Background, stop_task
from qtrap_proxy.config import load_config
from qtrap_proxy.energy.service import EnergyService
from qtrap_proxy.upstream import Backend
from tests.helpers import ONE_BACKEND


class _InstantMeter:
    """Answers after one event-loop round trip, so a read completes every few iterations."""

    kind = "dcgm"

    async def read(self) -> dict[str, float]:
        await asyncio.sleep(0)
        return {"h:0": 1.0}

    async def close(self) -> None:
        return None


def _service() -> EnergyService:
    cfg = load_config(
        data={
            "backends": ONE_BACKEND,
            # as short as it goes: the sampler reads back to back
            "meter": {"kind": "dcgm", "urls": ["http://127.0.0.1:9/metrics"], "interval_s": 1e-9},
        }
    )
    return EnergyService(cfg, [Backend(b) for b in cfg.backends], lambda tr: None, meter=_InstantMeter())


def test_one_cancellation_stops_the_sampler_whenever_it_arrives() -> None:
    """The sampler used asyncio.wait_for around the meter read: on Python 3.11 a cancellation arriving
    in the event-loop iterations between the read completing and wait_for resuming was dropped, and the
    sampler ran on, so SIGTERM never finished. Cancel it once at every offset of its cycle."""

    async def run() -> list[int]:
        lost = []
        for offset in range(40):
            svc = _service()
            svc.start()
            task = svc._task
            assert task is not None
            for _ in range(offset):
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.wait((task,), timeout=0.5)
            if not task.done():
                lost.append(offset)
                await stop_task(task, 1.0)  # re-cancelled until it stops: don't leak it
        return lost

    assert asyncio.run(run()) == []


def test_stop_task_recancels_a_task_that_lost_its_cancellation() -> None:
    async def run() -> tuple[bool, int, float]:
        swallowed = 0

        async def loses_one() -> None:
            nonlocal swallowed
            while True:
                try:
                    await asyncio.sleep(10)
                except asyncio.CancelledError:
                    if swallowed:
                        raise
                    swallowed += 1  # as wait_for on 3.11 does when the inner future has just completed

        task = asyncio.get_running_loop().create_task(loses_one())
        await asyncio.sleep(0)
        t0 = time.monotonic()
        ok = await stop_task(task, 5.0)
        return ok, swallowed, time.monotonic() - t0

    ok, swallowed, took = asyncio.run(run())
    assert ok and swallowed == 1 and took < 1.0


def test_stop_task_gives_up_on_a_task_that_ignores_cancellation_at_the_bound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Stubborn(Background):
        task_name = "stubborn"

        def __init__(self) -> None:
            self.release = asyncio.Event()

        async def _run(self) -> None:
            while not self.release.is_set():
                try:
                    await self.release.wait()
                except asyncio.CancelledError:
                    pass

    async def run() -> tuple[bool, float]:
        bg = Stubborn()
        bg.start()
        task = bg._task
        assert task is not None
        await asyncio.sleep(0)
        t0 = time.monotonic()
        ok = await bg.stop(0.3)
        took = time.monotonic() - t0
        assert bg._task is None and not task.done()
        bg.release.set()  # let it end, or asyncio.run would wait for it forever
        await task
        return ok, took

    ok, took = asyncio.run(run())
    assert not ok and 0.3 <= took < 0.6
    assert "stubborn did not stop within 0.3 s" in caplog.text


def test_stop_does_not_swallow_the_callers_cancellation() -> None:
    """The old stop() awaited the task inside suppress(CancelledError), which also ate a cancellation
    of the caller: a shutdown step that was cancelled went on as if nothing had happened."""

    async def run() -> bool:
        class Slow(Background):
            async def _run(self) -> None:
                try:
                    await asyncio.sleep(10)
                finally:
                    await asyncio.sleep(0.5)  # slow to unwind

        bg = Slow()
        bg.start()
        await asyncio.sleep(0)
        caller = asyncio.get_running_loop().create_task(bg.stop(5.0))
        await asyncio.sleep(0.05)
        caller.cancel()
        try:
            await caller
        except asyncio.CancelledError:
            return True
        return False

    assert asyncio.run(run())
