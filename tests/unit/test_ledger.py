"""The ledger's writer survives faults: nothing a record holds or SQLite raises stops persistence."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qtrap_proxy import ledger as ledger_mod
from qtrap_proxy.ledger import Ledger


class Durables:
    """What the writer reported durable, batch by batch (filled from its thread)."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def __call__(self, records: list[dict[str, Any]]) -> None:
        self.batches.append([r["id"] for r in records])

    @property
    def ids(self) -> set[str]:
        return {i for b in self.batches for i in b}


@pytest.fixture
def led(tmp_path: Path) -> Iterator[Ledger]:
    ledger = Ledger(str(tmp_path / "l.sqlite"), batch_s=0.02)
    yield ledger
    ledger.close()


def _wait(cond: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def _rec(i: int | str, **kw: Any) -> dict[str, Any]:
    return {"id": f"r{i}", "chain_id": "c", "hop": 1, "start_unix_s": 1e9, **kw}


def test_a_failing_sqlite_write_degrades_the_ledger_keeps_the_batch_and_recovers(
    led: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    durable = Durables()
    led.start(durable)
    failing = threading.Event()
    failing.set()
    real_write = Ledger._write

    def write(self: Ledger, conn: sqlite3.Connection, rows: list[Any]) -> None:
        if failing.is_set():
            raise sqlite3.OperationalError("disk I/O error (injected)")
        real_write(self, conn, rows)

    monkeypatch.setattr(Ledger, "_write", write)
    for i in range(5):
        led.put(_rec(i))
    _wait(lambda: led.write_errors["commit"] >= 2, "the writer did not retry the refused batch")
    state = led.state()
    assert state["status"] == "degraded" and "disk I/O error" in state["reason"]
    assert state["pending"] == 5 and not durable.ids and led.count() == 0
    led.put(_rec(5))  # records handed over while SQLite refuses them join the kept batch
    failing.clear()
    _wait(lambda: len(durable.ids) == 6, "the kept records were not written once SQLite took them again")
    assert led.count() == 6 and led.state()["status"] == "ok" and led.state()["pending"] == 0
    led.put(_rec(6))
    _wait(lambda: led.get("r6") is not None, "a later record was not persisted")


def test_a_record_sqlite_cannot_take_is_stored_with_a_note_and_its_batch_as_is(led: Ledger) -> None:
    """A hop of 10**30 made SQLite raise OverflowError, which killed the writer: every later record was lost."""
    durable = Durables()
    led.start(durable)
    led.put(_rec("before"))
    _wait(lambda: "rbefore" in durable.ids, "first record")
    led.put(_rec("big-hop", hop=10**30))
    led.put(_rec("surrogate", chain_id="bad\ud800"))  # not UTF-8: sqlite3 cannot encode it
    led.put(_rec("ok-in-same-batch"))
    led.put(_rec("nan", e2e_s=float("nan"), prompt_tokens=2**70))  # orjson refuses 2**70
    _wait(lambda: len(durable.ids) == 5, "the batch holding unstorable values was not written")
    led.put(_rec("after"))
    _wait(lambda: "rafter" in durable.ids, "a record after the bad ones was not persisted")
    assert led.write_errors["record"] == 3 and led.state()["status"] == "ok"
    big = led.get("rbig-hop")
    assert big is not None and big["hop"] == 10**30 and "hop" in big["ledger_error"]
    with sqlite3.connect(led.path) as conn:
        hop_column = conn.execute("SELECT hop FROM requests WHERE id = 'rbig-hop'").fetchone()[0]
    assert hop_column is None
    surrogate = led.get("rsurrogate")
    assert surrogate is not None and surrogate["chain_id"] == "bad\ud800" and surrogate["ledger_error"]
    ok = led.get("rok-in-same-batch")
    assert ok == _rec("ok-in-same-batch")  # the rest of the batch is stored as it was, without a note
    nan = led.get("rnan")
    assert nan is not None and nan["prompt_tokens"] == 2**70


def test_a_value_error_from_sqlite_itself_costs_only_that_record(
    led: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refusal tied to one row's values (raised by the write, not found beforehand): the others are written."""
    durable = Durables()
    real_write = Ledger._write

    def write(self: Ledger, conn: sqlite3.Connection, rows: list[Any]) -> None:
        if any(r[0] == "rpoison" and "ledger_error" not in r[4] for r in rows):
            raise OverflowError("Python int too large to convert to SQLite INTEGER (injected)")
        real_write(self, conn, rows)

    monkeypatch.setattr(Ledger, "_write", write)
    led.start(durable)
    for i in ("a", "poison", "b"):
        led.put(_rec(i))
    _wait(lambda: len(durable.ids) == 3, "the batch was not written around the refused record")
    assert led.write_errors["record"] == 1 and led.write_errors["commit"] == 0
    poison = led.get("rpoison")
    assert poison is not None and "OverflowError" in poison["ledger_error"]
    assert led.get("ra") == _rec("a") and led.get("rb") == _rec("b")


def test_a_writer_thread_killed_by_a_fault_is_restarted_and_loses_nothing(
    led: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    durable = Durables()
    real_write = Ledger._write
    kills = [SystemExit("injected: the writer thread dies")]

    def write(self: Ledger, conn: sqlite3.Connection, rows: list[Any]) -> None:
        if kills:
            raise kills.pop()  # not an Exception: nothing in the loop catches it, the thread ends
        real_write(self, conn, rows)

    monkeypatch.setattr(Ledger, "_write", write)
    led.start(durable)
    first_thread = led._thread
    led.put(_rec(1))
    assert first_thread is not None
    first_thread.join(10)
    assert not first_thread.is_alive() and led.write_errors["writer"] == 1
    # a new writer is started at once (or by the next check), and the dead thread's batch is written
    assert led.state()["status"] == "ok" and led.restarts == 1
    _wait(lambda: "r1" in durable.ids, "the dead writer's batch was lost")
    led.put(_rec(2))
    _wait(lambda: "r2" in durable.ids, "records after the restart were not persisted")
    assert led.count() == 2 and led.state()["last_error"].startswith("writer: writer thread died")


def test_a_dead_writer_is_reported_down_until_it_can_be_restarted(
    led: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger_mod, "_RESTART_MIN_S", 3600.0)
    led.start(Durables())
    led._last_restart = time.monotonic()  # a restart just happened: the next one must wait

    def kill(*_: object) -> None:
        raise SystemExit("injected")

    monkeypatch.setattr(Ledger, "_write", kill)
    led.put(_rec(1))
    assert led._thread is not None
    led._thread.join(10)
    state = led.state()
    assert state["status"] == "down" and "SystemExit" in state["reason"] and state["pending"] == 1


def test_records_are_handed_over_in_batches_not_one_wake_per_record(tmp_path: Path) -> None:
    led = Ledger(str(tmp_path / "l.sqlite"), batch_s=1.0)
    wakes = 0
    real_set = led._wake.set

    def counting_set() -> None:
        nonlocal wakes
        wakes += 1
        real_set()

    led._wake.set = counting_set  # type: ignore[method-assign]
    durable = Durables()
    led.start(durable)
    wakes = 0
    for i in range(200):
        led.put(_rec(i))
    _wait(lambda: len(durable.ids) == 200, "records not committed")
    assert wakes == 1 and len(durable.batches) == 1
    stored = led.get("r7")
    assert stored == _rec(7)
    led.close()


def test_close_gives_up_on_records_sqlite_keeps_refusing_after_bounded_tries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    led = Ledger(str(tmp_path / "l.sqlite"), batch_s=0.02)
    dropped: list[str] = []
    led.start(Durables(), lambda recs: dropped.extend(r["id"] for r in recs))

    def refuse(*_: object) -> None:
        raise sqlite3.OperationalError("database or disk is full (injected)")

    monkeypatch.setattr(Ledger, "_write", refuse)
    for i in range(3):
        led.put(_rec(i))
    led.close()  # returns: a bounded number of tries, then the records are given up, counted
    assert sorted(dropped) == ["r0", "r1", "r2"] and led.write_errors["dropped"] == 3
    assert led.state()["status"] == "down" and led.state()["reason"] == "closed"
