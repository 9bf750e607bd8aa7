"""SIGTERM under load: the real proxy process exits 0 within server.shutdown_timeout_s, every time,
with the final record of every request that completed before the signal in its ledger.

Issue 13, defect 2: about one SIGTERM in ten never finished (the energy sampler lost its
cancellation in Python 3.11's asyncio.wait_for and the lifespan waited for it forever), and
uvicorn re-raised the signal after a graceful shutdown, so the status was -15, never 0.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from qtrap_common.localproc import wait_http
from tests.helpers import ROOT, backend, free_port, sim

RUNS = 20
BOUND_S = 2.0  # server.shutdown_timeout_s in these runs
MARGIN_S = 1.0  # for the test's own polling and process reaping on a busy 2-core machine
CLIENTS = 24
LONG_CLIENTS = 4  # streams far longer than the bound: the proxy has to cut them
LOAD_S = 1.0  # load before the signal


@pytest.fixture(scope="module")
def sim_port() -> Iterator[int]:
    port = free_port()
    with sim(port, "--model", "qwen3-8b", "--step-ms", "5"):
        yield port


@dataclass
class Load:
    """Streaming clients in a loop until stopped; completions stamped with the client's clock."""

    url: str
    stop: threading.Event = field(default_factory=threading.Event)
    completed: list[tuple[float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def client(self, i: int) -> None:
        long = i < LONG_CLIENTS
        body = {
            "model": "qwen3-8b",
            "stream": True,
            "max_tokens": 5_000 if long else 16 + (i * 7) % 48,
            "messages": [{"role": "user", "content": f"count to {i}"}],
        }
        with requests.Session() as s:
            while not self.stop.is_set():
                try:
                    with s.post(self.url + "/v1/chat/completions", json=body, stream=True, timeout=30) as r:
                        data = b"".join(r.iter_content(None))
                        done_t = time.monotonic()
                        if r.status_code == 200 and b"data: [DONE]" in data:
                            with self.lock:
                                self.completed.append((done_t, r.headers["x-qtrap-request-id"]))
                except requests.RequestException:
                    if self.stop.is_set():
                        return
                    time.sleep(0.01)  # the proxy is going away: connection refused or reset


@dataclass
class Outcome:
    status: int | None  # None: still running at the bound plus the margin
    took_s: float
    log: str
    completed: list[str]  # requests whose answer the client had in full before the signal
    records: dict[str, dict[str, Any]]  # the ledger's, read after the exit
    ledger: Path

    def where(self, run: int) -> str:
        return f"run {run}: status {self.status} after {self.took_s:.2f} s\n{self.log[-4000:]}"


def _sigterm_under_load(
    tmp: Path, sim_port: int, run: int, before_signal: Callable[[Path], None] | None = None
) -> Outcome:
    """A proxy process under streaming load, SIGTERM, wait (at most the bound plus the margin)."""
    port = free_port()
    ledger = tmp / f"ledger-{run}.sqlite"
    cfg = {
        "server": {"port": port, "shutdown_timeout_s": BOUND_S},
        "backends": [
            backend(
                "sim",
                sim_port,
                model="qwen3-8b",
                token_counters=True,
                devices=[{"host": "qtrap-sim", "index": 0}],
            )
        ],
        # a short sampling period puts the sampler's read completions close to the shutdown's cancellation
        "meter": {
            "kind": "dcgm",
            "urls": [f"http://127.0.0.1:{sim_port}/dcgm/metrics"],
            "interval_s": 0.002,
            "settle_s": 0.3,
        },
        "ledger": {"path": str(ledger), "batch_s": 0.02},
    }
    cfg_path = tmp / f"proxy-{run}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    log = tmp / f"proxy-{run}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qtrap_proxy", "serve", "--config", str(cfg_path), "--log-level", "info"],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
    load = Load(f"http://127.0.0.1:{port}")
    clients = [threading.Thread(target=load.client, args=(i,), daemon=True) for i in range(CLIENTS)]
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", proc, 30.0, log)
        if before_signal is not None:
            before_signal(ledger)
        for c in clients:
            c.start()
        time.sleep(LOAD_S)
        t_signal = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        try:
            status: int | None = proc.wait(BOUND_S + MARGIN_S)
        except subprocess.TimeoutExpired:
            status = None
        took = time.monotonic() - t_signal
    finally:
        load.stop.set()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for c in clients:
            c.join(10)
    return Outcome(
        status,
        took,
        log.read_text(errors="replace"),
        [rid for t, rid in load.completed if t < t_signal],
        _records(ledger),
        ledger,
    )


def check_clean_sigterm(out: Outcome, run: int) -> None:
    """Exit 0 within the bound, no traceback, and a final record (energy known, or null with the reason)
    of every request the client had in full before the signal. The fault matrix's SIGTERM cell too."""
    where = out.where(run)
    assert out.status is not None, "SIGTERM did not finish within the bound: " + where
    assert out.status == 0 and out.took_s <= BOUND_S + MARGIN_S, where
    assert "Traceback" not in out.log, where
    assert len(out.completed) >= CLIENTS, f"too little load ({len(out.completed)} completed): " + where
    missing = [rid for rid in out.completed if rid not in out.records]
    assert not missing, f"{len(missing)} of {len(out.completed)} completed requests have no record: " + where
    for rid in out.completed:
        rec = out.records[rid]
        assert rec["final"] is True and rec["status"] == "ok", rec
        # energy is measured, or null with the reason: never a silent 0
        assert rec["energy_j"] is not None or rec["energy_null_reason"], rec


def _records(ledger: Path) -> dict[str, dict[str, Any]]:
    conn = sqlite3.connect(ledger, timeout=10)
    try:
        return {r[0]: json.loads(r[1]) for r in conn.execute("SELECT id, record FROM requests")}
    finally:
        conn.close()


@pytest.mark.slow  # about 60 s: 20 runs
def test_sigterm_under_load_exits_0_within_the_bound_with_the_ledger_flushed_20_times(
    tmp_path: Path, sim_port: int
) -> None:
    t0 = time.monotonic()
    took = []
    for run in range(RUNS):
        out = _sigterm_under_load(tmp_path, sim_port, run)
        check_clean_sigterm(out, run)
        took.append(out.took_s)
    print(
        f"{RUNS} SIGTERMs: shutdown took {min(took):.2f}-{max(took):.2f} s; {time.monotonic() - t0:.0f} s in all"
    )
    assert time.monotonic() - t0 < 180


def test_sigterm_with_a_ledger_that_cannot_commit_exits_1_within_the_bound(
    tmp_path: Path, sim_port: int
) -> None:
    """Another process holds the SQLite file's write lock: the ledger cannot flush, the process still exits
    at the bound, with status 1 and the reason in its log."""
    holder: list[sqlite3.Connection] = []

    def lock(ledger: Path) -> None:
        conn = sqlite3.connect(ledger, timeout=0, isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        holder.append(conn)

    try:
        out = _sigterm_under_load(tmp_path, sim_port, 0, before_signal=lock)
    finally:
        for conn in holder:
            conn.rollback()
            conn.close()
    where = out.where(0)
    assert out.status == 1 and out.took_s <= BOUND_S + MARGIN_S, where
    assert "final records not committed" in out.log or "could not be written to the ledger" in out.log, where
    assert out.completed and not out.records, where
