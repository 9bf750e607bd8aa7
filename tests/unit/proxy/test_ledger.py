"""The ledger's writer survives faults: nothing a record holds or the database raises stops persistence.

The tests taking ``led`` (or ``ledger_args``) run on SQLite and on PostgreSQL (tests/pg.py's server)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qtrap_proxy import ledger as ledger_mod
from qtrap_proxy.errors import LedgerUnavailable
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
def led(ledger_args: dict[str, str]) -> Iterator[Ledger]:
    ledger = Ledger(**ledger_args, batch_s=0.02)
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
    hop_column = led._db.query(f"SELECT hop FROM {led._db.table} WHERE id = ?", ("rbig-hop",))[0][0]
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


def test_records_are_handed_over_in_batches_not_one_wake_per_record(ledger_args: dict[str, str]) -> None:
    led = Ledger(**ledger_args, batch_s=1.0)
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


def test_close_gives_up_on_records_the_database_keeps_refusing_after_bounded_tries(
    ledger_args: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    led = Ledger(**ledger_args, batch_s=0.02)
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


# ---------------------------------------------------------------- key ids (issue 13)

_OLD_SCHEMA = """
CREATE TABLE requests (id TEXT PRIMARY KEY, chain_id TEXT, hop INTEGER, start_unix_s REAL NOT NULL,
                       record TEXT NOT NULL);
CREATE INDEX requests_chain ON requests (chain_id) WHERE chain_id IS NOT NULL;
CREATE INDEX requests_start ON requests (start_unix_s);
INSERT INTO requests VALUES ('old', 'c', 1, 1e9, '{"id": "old", "chain_id": "c", "hop": 1, "start_unix_s": 1e9}');
"""


def test_a_ledger_written_before_key_ids_gains_the_column_and_its_index(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(_OLD_SCHEMA)
    conn.close()
    led = Ledger(str(path), batch_s=0.02)
    try:
        conn = sqlite3.connect(path)
        assert "key_id" in {row[1] for row in conn.execute("PRAGMA table_info(requests)")}
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT * FROM requests WHERE key_id = 'key_0123456789ab' AND start_unix_s >= 0"
        ).fetchall()
        assert "requests_key" in str(plan)
        conn.close()
        assert led.get("old") == {"id": "old", "chain_id": "c", "hop": 1, "start_unix_s": 1e9}
        durable = Durables()
        led.start(durable)
        led.put(_rec("new", key_id="key_0123456789ab"))
        _wait(lambda: "rnew" in durable.ids, "a record was not written to a migrated ledger")
        assert [u.requests for u in led.key_usage("key_0123456789ab", 0, 2e9)] == [1]
    finally:
        led.close()
    Ledger(str(path)).close()  # opening a migrated ledger again changes nothing


def test_key_usage_sums_a_keys_records_by_precision_in_a_time_window(led: Ledger) -> None:
    k, other = "key_0123456789ab", "key_ba9876543210"
    recs = [
        _rec(
            1,
            key_id=k,
            precision="bf16",
            status="ok",
            prompt_tokens=10,
            completion_tokens=5,
            energy_j=2.0,
            idle_energy_j=0.5,
        ),
        _rec(
            2,
            key_id=k,
            precision="bf16",
            status="ok",
            prompt_tokens=20,
            completion_tokens=7,
            energy_j=None,
            idle_energy_j=None,
        ),
        _rec(
            3,
            key_id=k,
            precision="int4",
            status="upstream_error",
            prompt_tokens=1,
            completion_tokens=0,
            energy_j=0.25,
            idle_energy_j=0.0,
        ),
        _rec(
            4,
            key_id=k,
            precision="bf16",
            status="ok",
            prompt_tokens=99,
            completion_tokens=99,
            energy_j=9.0,
            start_unix_s=2e9,
        ),  # outside the window
        _rec(
            5,
            key_id=other,
            precision="bf16",
            status="ok",
            prompt_tokens=99,
            completion_tokens=99,
            energy_j=9.0,
        ),
        _rec(6, key_id="not a key id' OR 1=1", precision="bf16", prompt_tokens=99),  # stored without a key id
    ]
    durable = Durables()
    led.start(durable)
    for r in recs:
        led.put(r)
    _wait(lambda: len(durable.ids) == len(recs), "records not written")
    bf16, int4 = led.key_usage(k, 0, 1.5e9)
    assert (bf16.group, bf16.requests, bf16.ok_requests, bf16.prompt_tokens, bf16.completion_tokens) == (
        ("bf16",), 2, 2, 30, 12
    )  # fmt: skip
    assert (bf16.energy_j, bf16.idle_energy_j, bf16.energy_unknown_requests) == (2.0, 0.5, 1)
    assert bf16.completion_tokens_energy_known == 5
    assert (int4.group, int4.requests, int4.ok_requests, int4.energy_j, int4.energy_unknown_requests) == (
        ("int4",), 1, 0, 0.25, 0
    )  # fmt: skip
    assert led.key_usage(k, 1.5e9, 3e9)[0].requests == 1
    assert led.key_usage("not a key id' OR 1=1", 0, 3e9) == []
    assert led.get("r6") is not None


def test_nul_characters_which_postgresql_refuses_cost_only_their_record(led: Ledger) -> None:
    """PostgreSQL's text takes no NUL: an id or chain id holding one is stored escaped, with a note, and a
    NUL in another field stays in the record's JSON (escaped there); the rest of the batch as it was."""
    durable = Durables()
    led.start(durable)
    led.put(_rec("nul\x00id"))
    led.put(_rec("nul-chain", chain_id="c\x00d", pool="p\x00q", status="ok\x00"))
    led.put(_rec("plain", error="a\x00b"))
    _wait(lambda: len(durable.ids) == 3, "the batch holding NUL characters was not written")
    assert led.write_errors["record"] == 2 and led.state()["status"] == "ok"
    noted = led.get("rnul\\x00id")
    assert noted is not None and noted["id"] == "rnul\x00id" and "ledger_error" in noted
    chain = led.get("rnul-chain")
    assert chain is not None and chain["chain_id"] == "c\x00d" and "ledger_error" in chain
    assert led.get("rplain") == _rec("plain", error="a\x00b")


def test_reads_run_in_the_ledgers_threads_concurrently_and_fail_as_unavailable_once_closed(
    ledger_args: dict[str, str],
) -> None:
    """Ledger.read: the database part of a read runs in one of READ_THREADS worker threads (never the
    caller's), many at once share the one reader connection safely, and once the ledger is closed a
    read is a LedgerUnavailable (503), not a crash."""
    led = Ledger(**ledger_args, batch_s=0.005)
    durable = Durables()
    led.start(durable)
    for i in range(50):
        led.put(_rec(i, chain_id=f"c{i % 5}", hop=i // 5 + 1))
    _wait(lambda: len(durable.ids) == 50, "the records were not written")
    threads: set[str] = set()

    def chain(cid: str) -> list[str]:
        threads.add(threading.current_thread().name)
        return [r["id"] for r in led.chain(cid)]

    async def many() -> list[list[str]]:
        return await asyncio.gather(*(led.read(chain, f"c{i % 5}") for i in range(40)))

    try:
        chains = asyncio.run(many())
        assert chains == [[f"r{j}" for j in range(i % 5, 50, 5)] for i in range(40)]
        assert threads and all(t.startswith("qtrap-ledger-read") for t in threads)
        assert len(threads) <= ledger_mod.READ_THREADS
    finally:
        led.close()
    with pytest.raises(LedgerUnavailable) as e:
        asyncio.run(led.read(led.get, "r1"))
    assert e.value.status == 503 and "closed" in e.value.message
    with pytest.raises(LedgerUnavailable):
        led.get("r1")  # the database part itself, called directly


def test_close_cancels_a_read_still_waiting_on_the_database(ledger_args: dict[str, str]) -> None:
    """A read still running when the ledger closes is interrupted (SQLite) or cancelled (PostgreSQL), so
    close never waits on it; the read fails (PostgreSQL's as LedgerUnavailable, 503)."""
    led = Ledger(**ledger_args, batch_s=0.005)
    started = threading.Event()
    if led.backend == "sqlite":
        reader = led._db._reader  # type: ignore[attr-defined]
        reader.create_function("slow", 1, lambda x: (started.set(), time.sleep(0.01), x)[2])
        slow = (
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000) "
            "SELECT sum(slow(i)) FROM n"
        )
    else:
        slow = "SELECT pg_sleep(60)"

    def query() -> list[Any]:
        started.set()
        return led._db.query(slow, ())

    async def read_and_close() -> BaseException | None:
        reading = asyncio.ensure_future(led.read(query))
        assert await asyncio.to_thread(started.wait, 10), "the read did not start"
        await asyncio.sleep(0.2)  # the query is running
        t0 = time.monotonic()
        await asyncio.to_thread(led.close)
        assert time.monotonic() - t0 < ledger_mod._CLOSE_READ_S  # interrupted, not waited for
        try:
            await asyncio.wait_for(reading, 10)
        except BaseException as e:
            return e
        return None

    err = asyncio.run(read_and_close())
    if led.backend == "sqlite":
        assert isinstance(err, sqlite3.OperationalError) and "interrupted" in str(err)
    else:
        assert isinstance(err, LedgerUnavailable) and "cancel" in err.message
