"""The proxy's close at shutdown: bounded whatever hangs, energy finalised, the ledger flushed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from qtrap_proxy.app import CLOSE_SHARE, Shutdown, close_proxy
from qtrap_proxy.config import load_config
from qtrap_proxy.energy.attribution import Tracked
from qtrap_proxy.energy.service import EnergyService
from qtrap_proxy.errors import ConfigError
from qtrap_proxy.proxy import Proxy
from qtrap_proxy.server import _Server
from qtrap_proxy.timeline import Timeline, new_request_id
from qtrap_proxy.upstream import Backend
from tests.helpers import ONE_BACKEND


def _proxy(tmp_path: Path, meter: dict[str, object]) -> Proxy:
    cfg = load_config(
        data={
            "backends": ONE_BACKEND,
            "meter": meter,
            "ledger": {"path": str(tmp_path / "ledger.sqlite"), "batch_s": 0.01},
        }
    )
    return Proxy(cfg)


def _finished_request(proxy: Proxy) -> str:
    tl = Timeline(new_request_id(), route="chat")
    proxy.begin(tl, proxy.backends[0])
    tl.finish("ok", 200)
    proxy.end(tl, was_inflight=True)
    return tl.request_id


def _ledger(path: Path) -> dict[str, dict[str, object]]:
    conn = sqlite3.connect(path)
    try:
        return {r[0]: json.loads(r[1]) for r in conn.execute("SELECT id, record FROM requests")}
    finally:
        conn.close()


def test_shutdown_timeout_is_validated() -> None:
    base: dict[str, object] = {
        "backends": [{"name": "a", "pool": "p", "precision": "x", "url": "http://h", "model": "m"}]
    }
    assert load_config(data=base).server.shutdown_timeout_s == 10.0
    assert load_config(data={**base, "server": {"shutdown_timeout_s": 0.5}}).server.shutdown_timeout_s == 0.5
    for bad in (0, -1, "inf", "nan"):
        with pytest.raises(ConfigError, match=r"server\.shutdown_timeout_s"):
            load_config(data={**base, "server": {"shutdown_timeout_s": bad}})


def test_close_is_bounded_with_a_sampler_that_ignores_cancellation_and_still_flushes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = _proxy(tmp_path, {"kind": "dcgm", "urls": ["http://127.0.0.1:9/metrics"], "settle_s": 60})
    release = asyncio.Event()

    async def stubborn() -> None:  # a sampler that swallows every cancellation
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                pass

    proxy.energy._run = stubborn  # type: ignore[method-assign]

    async def run() -> tuple[bool, float, list[str]]:
        await proxy.start()
        task = proxy.energy._task
        assert task is not None
        await asyncio.sleep(0.01)  # in its loop
        ids = [_finished_request(proxy) for _ in range(5)]
        shutdown = Shutdown(1.0)
        t0 = time.monotonic()
        flushed = await close_proxy(proxy, shutdown)
        took = time.monotonic() - t0
        assert shutdown.flushed is flushed
        release.set()
        await task
        return flushed, took, ids

    flushed, took, ids = asyncio.run(run())
    assert flushed and took <= CLOSE_SHARE * 1.0 + 0.1
    assert "background task qtrap-energy-sampler did not stop" in caplog.text
    recs = _ledger(tmp_path / "ledger.sqlite")
    for rid in ids:  # no reading ever came: final, energy unknown, and why
        assert recs[rid]["final"] is True and recs[rid]["energy_j"] is None
        assert recs[rid]["energy_null_reason"] == "proxy stopped before the final reading"


def test_a_request_that_ends_after_the_energy_service_stopped_is_still_recorded(tmp_path: Path) -> None:
    """No reading will come for it: it is finalised at once, energy unknown, rather than waiting forever."""
    proxy = _proxy(tmp_path, {"kind": "dcgm", "urls": ["http://127.0.0.1:9/metrics"], "settle_s": 60})

    async def run() -> tuple[str, bool]:
        await proxy.start()
        tl = Timeline(new_request_id(), route="chat")
        proxy.begin(tl, proxy.backends[0])
        assert await proxy.energy.stop(1.0)
        tl.finish("ok", 200)
        proxy.end(tl, was_inflight=True)
        return tl.request_id, await close_proxy(proxy, Shutdown(1.0))

    rid, flushed = asyncio.run(run())
    rec = _ledger(tmp_path / "ledger.sqlite")[rid]
    assert flushed and rec["final"] is True and rec["energy_j"] is None
    assert rec["energy_null_reason"] == "proxy stopped before the final reading"


@pytest.mark.parametrize(("flushed", "status"), [(True, 0), (None, 1), (False, 1)])
def test_the_watchdog_ends_the_process_at_the_bound(
    monkeypatch: pytest.MonkeyPatch, flushed: bool | None, status: int
) -> None:
    """Whatever still runs at the bound (a task that ignores its cancellation, a thread stuck in a driver
    call, asyncio.run's teardown waiting for either), the process exits: 0 if the ledger was flushed."""
    exited: list[tuple[int, float]] = []
    done = threading.Event()

    def fake_exit(code: int) -> None:
        exited.append((code, time.monotonic()))
        done.set()

    monkeypatch.setattr(os, "_exit", fake_exit)
    bound = Shutdown(0.3, flushed=flushed)
    srv = _Server(uvicorn.Config(lambda *a: None), bound)
    t0 = time.monotonic()
    srv.handle_exit(signal.SIGTERM, None)
    srv.handle_exit(signal.SIGTERM, None)  # a second signal does not restart the clock
    assert srv.should_exit and done.wait(5.0)
    assert len(exited) == 1 and exited[0][0] == status
    assert 0.3 <= exited[0][1] - t0 < 0.6


def test_stop_waits_for_the_reading_that_settles_a_request_that_just_ended() -> None:
    """A request that ended after the meter's last update gets its measured figure at shutdown, not
    'unknown', when the meter can still close its interval within the bound."""
    cfg = load_config(
        data={
            "backends": ONE_BACKEND,
            "meter": {
                "kind": "dcgm",
                "urls": ["http://127.0.0.1:9/metrics"],
                "interval_s": 0.01,
                "settle_s": 60,
            },
        }
    )

    class Counter:  # 300 W, its value moving every 50 ms as a GPU's counter does
        kind = "dcgm"

        async def read(self) -> dict[str, float]:
            return {"h:0": 300.0 * round(time.monotonic(), 1)}

        async def close(self) -> None:
            return None

    finals: list[Tracked] = []
    backends = [Backend(b) for b in cfg.backends]
    svc = EnergyService(cfg, backends, finals.append, meter=Counter())

    async def run() -> bool:
        svc.start()
        await asyncio.sleep(0.3)
        tl = Timeline(new_request_id(), route="chat", backend="b")  # as Proxy.begin sets it
        tr = svc.begin(tl, backends[0], False)
        await asyncio.sleep(0.2)
        tl.completion_tokens, tl.prompt_tokens = 10, 5
        tl.finish("ok", 200)
        svc.end(tr)
        assert not finals
        return await svc.stop(2.0)

    assert asyncio.run(run())
    assert len(finals) == 1 and finals[0].energy_known and finals[0].energy_j > 0
