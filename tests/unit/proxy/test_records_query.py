"""The records query and usage sums over a real ledger, SQLite and PostgreSQL (issue 17): keyset pages that neither repeat
nor skip a record while new ones are written, usage grouped in SQL with unknown energy kept null, the
client request id column and the indexes added to older ledgers."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest

from qtrap_proxy.energy import reasons
from qtrap_proxy.ledger import Ledger
from qtrap_proxy.query import RecordFilter, parse_record_query
from qtrap_proxy.records import RecordStore

_T = TypeVar("_T")
KEY_A, KEY_B = "key_0123456789ab", "key_ba9876543210"


class _NoOpenAccounts:
    """The energy service as the record store sees it, with nothing in flight."""

    kind = "null"

    def open_accounts(self, **_: Any) -> Iterator[Any]:
        return iter(())


class _Durable:
    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.lock = threading.Lock()

    def __call__(self, records: list[dict[str, Any]]) -> None:
        with self.lock:
            self.ids.update(r["id"] for r in records)


@pytest.fixture
def led(ledger_args: dict[str, str]) -> Iterator[Ledger]:
    ledger = Ledger(**ledger_args, batch_s=0.005)
    yield ledger
    ledger.close()


def _wait(cond: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def _write(led: Ledger, durable: _Durable, recs: list[dict[str, Any]]) -> None:
    for r in recs:
        led.put(r)
    _wait(lambda: all(r["id"] in durable.ids for r in recs), "records not written")


def _rec(rid: str, start: float, **kw: Any) -> dict[str, Any]:
    return {
        "id": rid,
        "chain_id": None,
        "hop": None,
        "key_id": None,
        "client_request_id": None,
        "pool": "p",
        "backend": "b",
        "precision": "bf16",
        "status": "ok",
        "start_unix_s": start,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "energy_j": 1.0,
        "idle_energy_j": 0.25,
        "final": True,
        **kw,
    }


def _sync(coro: Coroutine[Any, Any, _T]) -> _T:
    """A record store's read run to its end (its ledger part in the ledger's read thread)."""
    return asyncio.run(coro)


def _store(led: Ledger) -> RecordStore:
    return RecordStore(cast(Any, _NoOpenAccounts()), led, cast(Any, None))


def _pages(store: RecordStore, params: list[tuple[str, str]], between: Callable[[int], None]) -> list[str]:
    """Every id the query lists, page after page by its cursor; ``between(n)`` runs after page n."""
    seen: list[str] = []
    cursor: str | None = None
    n = 0
    while True:
        q = parse_record_query([*params] + ([("cursor", cursor)] if cursor else []))
        page = _sync(store.list_records(q))
        assert len(page["data"]) <= q.limit
        seen += [r["id"] for r in page["data"]]
        assert page["has_more"] == (page["next_cursor"] is not None)
        if not page["has_more"]:
            return seen
        cursor = page["next_cursor"]
        n += 1
        between(n)


@pytest.mark.parametrize("order", ["desc", "asc"])
def test_pages_neither_repeat_nor_skip_a_record_while_new_ones_are_written(led: Ledger, order: str) -> None:
    durable = _Durable()
    led.start(durable)
    rng = random.Random(17)
    # 230 records over 100 s, many sharing a start time (the id breaks the tie)
    initial = [_rec(f"r{i:03d}", 1_000 + rng.randrange(100) * 1.0) for i in range(230)]
    rng.shuffle(initial)
    _write(led, durable, initial)
    store = _store(led)
    added: list[str] = []

    def insert(n: int) -> None:
        # records that start later (a real proxy's new requests), and some inside the window already paged
        recs = [_rec(f"new{n}-{j}", 1_100 + n + j * 0.5) for j in range(3)]
        recs.append(_rec(f"old{n}", 1_000 + rng.randrange(100) * 1.0))
        added.extend(r["id"] for r in recs)
        _write(led, durable, recs)

    seen = _pages(store, [("limit", "17"), ("order", order)], insert)
    assert len(seen) == len(set(seen)), "a record was listed twice"
    assert {r["id"] for r in initial} <= set(seen), "a record that existed before the first page was skipped"
    keys = [(rec["start_unix_s"], rec["id"]) for rec in (led.get(i) for i in seen) if rec is not None]
    assert keys == sorted(keys, reverse=order == "desc")
    if order == "asc":  # records starting after the last page read are on later pages
        assert {i for i in added if i.startswith("new")} <= set(seen)


def test_filters_select_in_sql_as_in_memory(led: Ledger) -> None:
    durable = _Durable()
    led.start(durable)
    recs = [
        _rec("a", 100.0, pool="p", precision="bf16", key_id=KEY_A, client_request_id="c-1", chain_id="ch"),
        _rec("b", 101.0, pool="p", precision="int4", key_id=KEY_B, status="upstream_error"),
        _rec("c", 102.0, pool="q", precision="int4", key_id=KEY_A, backend="b2"),
        _rec("d", 200.0, pool="p", precision="bf16"),
    ]
    _write(led, durable, recs)
    store = _store(led)

    def ids(*params: tuple[str, str]) -> list[str]:
        q = parse_record_query(list(params))
        page = [r["id"] for r in _sync(store.list_records(q))["data"]]
        chosen = [r for r in recs if q.filter.matches(r) and q.final in (None, r["final"])]
        expected = sorted(chosen, key=q.sort_key, reverse=q.order == "desc")
        assert page == [r["id"] for r in expected]
        return page

    assert ids() == ["d", "c", "b", "a"]
    assert ids(("order", "asc")) == ["a", "b", "c", "d"]
    assert ids(("since", "101"), ("until", "200")) == ["c", "b"]
    assert ids(("pool", "p"), ("precision", "bf16")) == ["d", "a"]
    assert ids(("key", KEY_A)) == ["c", "a"]
    assert ids(("status", "upstream_error")) == ["b"]
    assert ids(("backend", "b2")) == ["c"]
    assert ids(("chain_id", "ch")) == ["a"]
    assert ids(("client_request_id", "c-1")) == ["a"]
    assert ids(("client_request_id", "c-2")) == []
    assert ids(("final", "true")) == ["d", "c", "b", "a"]
    assert ids(("final", "false")) == []  # the ledger holds final records only; none is in flight here
    page = _sync(store.list_records(parse_record_query([("limit", "3")])))
    assert page["object"] == "list" and page["has_more"] and page["order"] == "desc" and page["limit"] == 3
    assert led.get("a") == recs[0]  # a page holds the records as stored


def test_usage_groups_in_sql_and_keeps_unknown_energy_null(led: Ledger) -> None:
    durable = _Durable()
    led.start(durable)
    recs = [
        _rec("1", 100.0, pool="p", precision="bf16", key_id=KEY_A, energy_j=2.0, idle_energy_j=0.5),
        _rec("2", 101.0, pool="p", precision="bf16", key_id=KEY_B, energy_j=None, idle_energy_j=None),
        _rec("3", 102.0, pool="p", precision="int4", key_id=KEY_A, energy_j=None, idle_energy_j=None),
        _rec("4", 103.0, pool="p", precision="int4", key_id=KEY_A, energy_j=None, idle_energy_j=None,
             status="upstream_error", completion_tokens=0),
        _rec("5", 104.0, pool="q", precision="bf16", key_id=None, energy_j=0.0, idle_energy_j=0.0),
        _rec("6", 500.0, pool="p", precision="bf16", energy_j=9.0),  # outside the window below
    ]  # fmt: skip
    _write(led, durable, recs)
    store = _store(led)
    window = RecordFilter(since_unix_s=100, until_unix_s=200)

    rep = _sync(store.usage(window, ("pool", "precision")))
    groups = {(g["pool"], g["precision"]): g for g in rep["groups"]}
    assert list(groups) == [("p", "bf16"), ("p", "int4"), ("q", "bf16")]  # ordered by the groups
    pb = groups[("p", "bf16")]
    assert (pb["requests"], pb["ok_requests"], pb["prompt_tokens"], pb["completion_tokens"]) == (2, 2, 20, 10)
    assert (pb["energy_j"], pb["idle_energy_j"], pb["energy_unknown_requests"]) == (2.0, 0.5, 1)
    assert pb["j_per_token"] == 2.0 / 5  # over the completion tokens of the requests whose energy is known
    pi = groups[("p", "int4")]
    # no request's energy known: null with the reason and the count, never 0 J
    assert (pi["requests"], pi["ok_requests"], pi["energy_j"], pi["idle_energy_j"]) == (2, 1, None, None)
    assert pi["energy_unknown_requests"] == 2 and pi["energy_null_reason"] == reasons.KEY_NONE_MEASURED
    assert pi["j_per_token"] is None
    qb = groups[("q", "bf16")]
    assert (qb["energy_j"], qb["energy_unknown_requests"]) == (0.0, 0)  # measured as 0 J: 0, not unknown
    total = rep["total"]
    assert (total["requests"], total["energy_j"], total["energy_unknown_requests"]) == (5, 2.0, 3)
    assert (
        rep["truncated"] is False
        and rep["not_final_requests"] == 0
        and rep["group_by"] == ["pool", "precision"]
    )

    by_key = {g["key"]: g["requests"] for g in _sync(store.usage(window, ("key",)))["groups"]}
    assert by_key == {None: 1, KEY_A: 3, KEY_B: 1}
    by_status = {
        g["status"]: g["requests"] for g in _sync(store.usage(window, ("status", "backend")))["groups"]
    }
    assert by_status == {"ok": 4, "upstream_error": 1}
    only_a = _sync(store.usage(RecordFilter(key_id=KEY_A), ()))
    assert only_a["groups"] == [] and only_a["total"]["requests"] == 3
    nothing = _sync(store.usage(RecordFilter(pool="none"), ("pool",)))
    assert nothing["groups"] == [] and nothing["total"]["requests"] == 0
    # the per-key usage is the same SQL, grouped by precision for one key
    assert [(r.group, r.requests, r.energy_j) for r in led.key_usage(KEY_A, 100, 200)] == [
        (("bf16",), 1, 2.0),
        (("int4",), 2, None),
    ]


_BEFORE_ISSUE_17 = """
CREATE TABLE requests (id TEXT PRIMARY KEY, chain_id TEXT, hop INTEGER, start_unix_s REAL NOT NULL,
                       record TEXT NOT NULL, key_id TEXT);
CREATE INDEX requests_start ON requests (start_unix_s);
INSERT INTO requests VALUES ('old', NULL, NULL, 1e9, '{"id": "old", "start_unix_s": 1e9, "pool": "p"}', NULL);
"""


def test_an_older_ledger_gains_the_client_request_id_column_and_the_query_indexes(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(_BEFORE_ISSUE_17)
    conn.close()
    led = Ledger(str(path), batch_s=0.005)
    try:
        conn = sqlite3.connect(path)
        assert "client_request_id" in {row[1] for row in conn.execute("PRAGMA table_info(requests)")}

        def plan(sql: str) -> str:
            return str(conn.execute("EXPLAIN QUERY PLAN " + sql).fetchall())

        assert "requests_client_request_id" in plan(
            "SELECT record FROM requests WHERE client_request_id = 'x' AND start_unix_s >= 0"
        )
        keyset = plan(
            "SELECT record FROM requests WHERE start_unix_s >= 0 AND (start_unix_s, id) < (5, 'a') "
            "ORDER BY start_unix_s DESC, id DESC LIMIT 10"
        )
        assert "requests_start_id" in keyset and "TEMP B-TREE" not in keyset  # no sort: the index's order
        conn.close()
        durable = _Durable()
        led.start(durable)
        _write(led, durable, [_rec("new", 2e9, client_request_id="mine")])
        store = _store(led)
        assert [r["id"] for r in _sync(store.list_records(parse_record_query([])))["data"]] == ["new", "old"]
        found = _sync(store.list_records(parse_record_query([("client_request_id", "mine")])))["data"]
        assert [r["id"] for r in found] == ["new"]
    finally:
        led.close()


def test_a_client_request_id_that_is_not_a_valid_one_is_not_indexed(led: Ledger) -> None:
    durable = _Durable()
    led.start(durable)
    _write(
        led, durable, [_rec("x", 1.0, client_request_id="bad\x00id"), _rec("y", 2.0, client_request_id="ok")]
    )
    rows = dict(led._db.query(f"SELECT id, client_request_id FROM {led._db.table}", ()))
    assert rows == {"x": None, "y": "ok"}


def test_a_request_not_yet_final_is_filtered_on_its_timeline_as_on_its_record() -> None:
    from qtrap_proxy.energy.attribution import Tracked
    from qtrap_proxy.record import build_record
    from qtrap_proxy.records import _fields
    from qtrap_proxy.timeline import Timeline

    tl = Timeline("ab" * 16, route="chat", pool="p", precision="int4", backend="b", chain_id="c", hop=2)
    tl.key_id, tl.client_request_id = KEY_A, "mine"
    rec = build_record(Tracked(tl), "provisional", meter="null", devices=[])
    fields = _fields(tl)
    assert fields == {k: rec[k] for k in fields}


class _OpenAccounts(_NoOpenAccounts):
    """An energy service with requests in flight (their accounts)."""

    cfg = type("Cfg", (), {"compare_views": False})()

    def __init__(self, tracked: list[Any]) -> None:
        self.tracked = tracked

    def open_accounts(self, **_: Any) -> Iterator[Any]:
        return iter(self.tracked)

    def provisional_j(self, tr: Any) -> float:
        return 0.5

    def backend_devices_of(self, tr: Any) -> list[str]:
        return ["h:0"]


def test_pages_merge_requests_in_flight_with_the_ledgers_final_records(led: Ledger) -> None:
    from qtrap_proxy.energy.attribution import Tracked
    from qtrap_proxy.timeline import Timeline

    durable = _Durable()
    led.start(durable)
    _write(led, durable, [_rec(f"f{i}", 100.0 + 2 * i) for i in range(5)])  # 100, 102, ..., 108
    flying = []
    for i in range(4):  # 101, 103, 105, 107
        tl = Timeline(f"o{i}", route="chat", pool="p", precision="bf16", backend="b")
        tl.start_unix_s = 101.0 + 2 * i
        flying.append(Tracked(tl))
    store = RecordStore(cast(Any, _OpenAccounts(flying)), led, cast(Any, None))

    def listed(*params: tuple[str, str]) -> list[tuple[str, bool]]:
        seen: list[tuple[str, bool]] = []
        cursor: list[tuple[str, str]] = []
        while True:
            page = _sync(store.list_records(parse_record_query([*params, ("limit", "3"), *cursor])))
            seen += [(r["id"], r["final"]) for r in page["data"]]
            if page["next_cursor"] is None:
                return seen
            cursor = [("cursor", page["next_cursor"])]

    assert listed(("order", "asc")) == [
        ("f0", True), ("o0", False), ("f1", True), ("o1", False), ("f2", True), ("o2", False), ("f3", True),
        ("o3", False), ("f4", True),
    ]  # fmt: skip
    assert [i for i, _ in listed()] == ["f4", "o3", "f3", "o2", "f2", "o1", "f1", "o0", "f0"]
    assert listed(("final", "false")) == [("o3", False), ("o2", False), ("o1", False), ("o0", False)]
    assert [i for i, _ in listed(("final", "true"))] == ["f4", "f3", "f2", "f1", "f0"]
    assert listed(("status", "in_flight"), ("since", "103"), ("until", "107")) == [
        ("o2", False),
        ("o1", False),
    ]
    rec = _sync(store.list_records(parse_record_query([("final", "false"), ("limit", "1")])))["data"][0]
    assert (
        rec["provisional"] is True and rec["energy_j"] == 0.5
    )  # built as GET /qtrap/v1/requests/{id} shows it
    usage = _sync(store.usage(RecordFilter(), ()))
    assert usage["total"]["requests"] == 5 and usage["not_final_requests"] == 4


def test_pages_read_while_a_writer_thread_keeps_writing_neither_repeat_nor_skip(led: Ledger) -> None:
    durable = _Durable()
    led.start(durable)
    initial = [_rec(f"i{i:03d}", 1_000 + (i % 50) * 1.0) for i in range(300)]
    _write(led, durable, initial)
    store = _store(led)
    stop = threading.Event()
    written: list[str] = []

    def writer() -> None:  # new requests, and late finals of requests that started inside the window
        n = 0
        while not stop.is_set():
            rid = f"w{n:05d}"
            led.put(_rec(rid, (2_000.0 + n) if n % 2 else (1_000.0 + n % 50 + 0.5)))
            written.append(rid)
            n += 1
            time.sleep(0.001)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for order in ("desc", "asc"):
            seen = _pages(
                store, [("limit", "13"), ("order", order), ("until", "1999")], lambda n: time.sleep(0.002)
            )
            assert len(seen) == len(set(seen)), order
            assert {r["id"] for r in initial} <= set(seen), order
    finally:
        stop.set()
        thread.join()
    assert len(written) > 10  # the writer did write while the pages were read


class _BlockingLedger:
    """A ledger whose reads (in a worker thread, as Ledger.read runs them) wait until the test lets them
    go; ``seen_by_read`` is what they answer: the rows as they were when the read began, or as they are
    when it ends (a read that began before a commit, or after it)."""

    def __init__(self, rows: list[dict[str, Any]], *, seen_before: bool) -> None:
        self.rows = rows
        self.seen_before = seen_before
        self.reading = threading.Event()
        self.go = threading.Event()

    async def read(self, fn: Callable[..., _T], /, *args: Any) -> _T:
        return await asyncio.to_thread(fn, *args)

    def _rows(self, keep: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        before = [r for r in self.rows if keep(r)]
        self.reading.set()
        assert self.go.wait(10), "the test did not let the read go"
        return before if self.seen_before else [r for r in self.rows if keep(r)]

    def records(self, query: Any) -> list[dict[str, Any]]:
        return self._rows(query.filter.matches)

    def chain(self, chain_id: str) -> list[dict[str, Any]]:
        return self._rows(lambda r: r.get("chain_id") == chain_id)


@pytest.mark.parametrize("seen_by_read", [False, True], ids=["read-began-before-commit", "read-saw-commit"])
@pytest.mark.parametrize("what", ["list_records", "chain"])
def test_a_record_committed_during_a_ledger_read_neither_vanishes_nor_repeats(
    what: str, seen_by_read: bool
) -> None:
    """The interleaving the ledger's read thread allows: a record is committing when a read begins and is
    committed (in the ledger, out of the committing records) before the ledger's answer is merged. It is
    listed once: the ledger's (final) when the read saw it, else as it was when the read began."""
    from qtrap_proxy.energy.attribution import Tracked
    from qtrap_proxy.timeline import Timeline

    final_old = _rec("old", 100.0, chain_id="ch", hop=1)
    tl = Timeline("moving", route="chat", pool="p", precision="bf16", backend="b", chain_id="ch", hop=2)
    tl.start_unix_s = 200.0
    tr = Tracked(tl)
    ledger = _BlockingLedger([final_old], seen_before=not seen_by_read)
    store = RecordStore(cast(Any, _OpenAccounts([])), cast(Any, ledger), cast(Any, None))
    store._committing["moving"] = tr  # final, queued for the ledger

    async def read_while_committing() -> list[dict[str, Any]]:
        if what == "list_records":
            task: asyncio.Future[Any] = asyncio.ensure_future(store.list_records(parse_record_query([])))
        else:
            task = asyncio.ensure_future(store._chain_records("ch"))
        # the read is in its thread, waiting
        assert await asyncio.to_thread(ledger.reading.wait, 10), "the ledger was not read"
        committed = {**_rec("moving", 200.0, chain_id="ch", hop=2), "final": True}
        ledger.rows.append(committed)  # the writer commits it ...
        store._durable([committed])  # ... and reports it durable (on the event loop, as _on_durable does)
        assert "moving" not in store._committing
        ledger.go.set()
        result = await asyncio.wait_for(task, 10)
        return list(result["data"] if what == "list_records" else result)

    recs = asyncio.run(read_while_committing())
    ids = [r["id"] for r in recs]
    assert sorted(ids) == ["moving", "old"], ids  # neither vanished nor listed twice
    moving = next(r for r in recs if r["id"] == "moving")
    if what == "list_records":
        assert moving["final"] is seen_by_read  # the ledger's version wins when it has one
    else:
        assert moving["final"] is False  # a chain: what was in memory overrides the ledger (as ever)
