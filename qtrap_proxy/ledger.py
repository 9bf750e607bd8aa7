"""The durable per-request ledger, written in batches off the request path: SQLite in WAL mode
(``ledger.path``, the embedded default) or PostgreSQL (``ledger.url``, one ledger for a fleet of replicas).

One :class:`Ledger` serves both: the writer thread, its batching and fault rules, and the queries are the
same; a small database layer (:class:`_Sqlite`, :class:`_Postgres`; the PostgreSQL connections, credentials
and migrations are in ledger_pg.py) supplies connections, the upsert and how a record's fields are read in
SQL (``json_extract`` over the record in SQLite, columns of their own in PostgreSQL).

Final records are handed over in batches: :meth:`Ledger.put` appends to a list
and wakes the writer thread only when that list was empty, so the request path
never wakes it once per record. The writer lets a batch gather for at most
``batch_s``, serialises it with orjson, commits it and only then reports it
durable, so a record the admin API calls final survives a SIGKILL of the proxy.
``synchronous=NORMAL`` in WAL mode keeps committed transactions across a process
crash (not across a power cut); PostgreSQL's commit is durable as the server is configured
(``synchronous_commit``, on by default).

No exception stops persistence:

* a batch the database refuses (disk full, locked, I/O error, PostgreSQL down or
  restarting, anything else) is kept and retried with backoff (``_BACKOFF_S``) on a
  fresh connection; records that arrive meanwhile join it, up to ``_MAX_BACKLOG``
  records (beyond, the oldest are dropped, counted);
* a record that cannot be written as it is (a value out of the database's range, a
  string that is not UTF-8 or holds NUL, ...) is written with its index columns made safe and
  a ``ledger_error`` note, and counted; the rest of its batch is written as is;
* whatever escapes the loop is caught per iteration; if the thread dies anyway
  (or its loop returns), a new one is started at once (then at most once per
  ``_RESTART_MIN_S``, by a timer, the next record, health check or scrape), which
  picks up the dead one's batch; until then :meth:`state` reports ``down``.

Every such event is counted in ``write_errors`` (kinds in ``ERROR_KINDS``) and logged.

Reads (a record, a chain, a page of records, usage sums) are plain methods that query the database on
the calling thread; the proxy awaits them through :meth:`Ledger.read`, which runs them in the ledger's
own pool of ``READ_THREADS`` worker threads, never on the event loop: a PostgreSQL ledger that is slow
or cannot be reached, or a large usage sum in SQLite, then stalls only the reads waiting for it, not the
requests the proxy is relaying. A dedicated pool rather than ``asyncio.to_thread``: reads held up by the
database cannot take every thread of the event loop's default executor, which others use too (the
resolver's ``getaddrinfo`` for the backends' connections, ``to_thread``), and it is bounded and shut
down with the ledger (:meth:`Ledger.close`), a read still waiting on the database then cancelled.
Each database has one reader connection, guarded by a lock, so one read queries at a time; the threads
beyond the first wait for it without holding up the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import orjson
import psycopg

from qtrap_common.wire import RequestRecord
from qtrap_proxy import ledger_pg
from qtrap_proxy.errors import ConfigError, LedgerUnavailable
from qtrap_proxy.keystore import KEY_ID
from qtrap_proxy.limits import check_client_request_id
from qtrap_proxy.query import RecordFilter, RecordQuery

log = logging.getLogger("qtrap.ledger")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
  id TEXT PRIMARY KEY,
  chain_id TEXT,
  hop INTEGER,
  start_unix_s REAL NOT NULL,
  record TEXT NOT NULL,
  key_id TEXT,
  client_request_id TEXT,
  co2e_g REAL,
  cost REAL,
  cost_currency TEXT
);
CREATE INDEX IF NOT EXISTS requests_chain ON requests (chain_id) WHERE chain_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS requests_start ON requests (start_unix_s);
"""
# ledgers written before a column gain it (key_id: issue 13; client_request_id, co2e_g, cost and
# cost_currency: issue 17, NULL in the rows already there: their carbon and cost are unknown); then the indexes
_MIGRATIONS = (
    ("key_id", "ALTER TABLE requests ADD COLUMN key_id TEXT"),
    ("client_request_id", "ALTER TABLE requests ADD COLUMN client_request_id TEXT"),
    ("co2e_g", "ALTER TABLE requests ADD COLUMN co2e_g REAL"),
    ("cost", "ALTER TABLE requests ADD COLUMN cost REAL"),
    ("cost_currency", "ALTER TABLE requests ADD COLUMN cost_currency TEXT"),
)
# requests_start_id: the records query's keyset pages on (start_unix_s, id), either order
_INDEXES = """
CREATE INDEX IF NOT EXISTS requests_key ON requests (key_id, start_unix_s) WHERE key_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS requests_start_id ON requests (start_unix_s, id);
CREATE INDEX IF NOT EXISTS requests_client_request_id ON requests (client_request_id, start_unix_s)
  WHERE client_request_id IS NOT NULL;
"""
_INSERT = (
    "INSERT OR REPLACE INTO requests (id, chain_id, hop, start_unix_s, record, key_id, client_request_id, "
    "co2e_g, cost, cost_currency) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
# Usage sums over the final records a filter selects, grouped by some of _GROUPS (GET /qtrap/v1/usage and,
# grouped by precision for one key, GET /qtrap/v1/keys/{id}/usage): requests, ok requests, prompt and
# completion tokens, attributed and idle energy of the requests whose energy is known (NULL when none is),
# the requests whose energy is unknown, and the completion tokens of those whose energy is known; then the
# CO2e and cost of those whose figure is known (NULL when none is), the requests whose figure is unknown,
# and the least and greatest currency of the costs (two different: the sum is not one amount).
# The same SQL in either database; {pool}, {status}, ...: how the database reads those fields (_Db.fields).
_USAGE = """
SELECT {{groups}}count(*), coalesce(sum(CASE WHEN status = 'ok' THEN 1 ELSE 0 END), 0), coalesce(sum(prompt), 0),
       coalesce(sum(completion), 0), sum(energy), sum(idle), coalesce(sum(CASE WHEN energy IS NULL THEN 1 ELSE 0 END), 0),
       coalesce(sum(CASE WHEN energy IS NOT NULL THEN completion END), 0),
       sum(co2e_g), coalesce(sum(CASE WHEN co2e_g IS NULL THEN 1 ELSE 0 END), 0),
       sum(cost), coalesce(sum(CASE WHEN cost IS NULL THEN 1 ELSE 0 END), 0), min(cost_currency), max(cost_currency)
FROM (
  SELECT {{inner}}{status} AS status, {prompt_tokens} AS prompt, {completion_tokens} AS completion,
         {energy_j} AS energy, {idle_energy_j} AS idle,
         co2e_g, cost, CASE WHEN cost IS NOT NULL THEN cost_currency END AS cost_currency
  FROM {table} WHERE {{where}}
) AS t
{{group_by}}
"""
# what usage may be grouped by (query.GROUP_BY): the field it reads
_GROUPS = {
    "pool": "pool",
    "precision": "precision",
    "backend": "backend",
    "key": "key_id",
    "status": "status",
}
# how SQLite reads a record's fields: the indexed columns where the ledger has them, else from its JSON
_SQLITE_FIELDS = {
    **{
        name: f"json_extract(record, '$.{name}')"
        for name in ("pool", "precision", "backend", "status", *ledger_pg.FACETS)
    },
    "chain_id": "chain_id",
    "key_id": "key_id",
    "client_request_id": "client_request_id",
}
# PostgreSQL has a column for each (ledger_pg.FACETS: taken from the record when it is written)
_PG_FIELDS = {name: name for name in _SQLITE_FIELDS}

_COLUMNS = frozenset(("chain_id", "key_id", "client_request_id"))  # filters with a column of their own

_COMMIT_ROWS = 1_000  # records per transaction
_MAX_BACKLOG = (
    100_000  # records held while the database refuses them; beyond, the oldest are dropped (counted)
)
_BACKOFF_S = (0.05, 5.0)  # first and longest wait before a refused batch is tried again
_CLOSE_TRIES = 5  # at shutdown, tries before records the database still refuses are given up (counted)
_RESTART_MIN_S = 1.0  # a writer thread that died is restarted at most this often
_MAX_TEXT = 1_024  # longest id / chain id stored in an index column as is
_INT64 = 2**63
READ_THREADS = 4  # the ledger's read threads (Ledger.read): reads off the event loop
_CLOSE_READ_S = 5.0  # at close, how long a read still running (cancelled) is waited for
_CLOSED = "the ledger is closed (the proxy is shutting down)"

_P = ParamSpec("_P")
_T = TypeVar("_T")

# write_errors kinds: a refused batch (kept, retried) | a record written with a note instead of as it was |
# the writer loop failed or its thread died (restarted) | records given up (backlog full, or refused at shutdown)
ERROR_KINDS = ("commit", "record", "writer", "dropped")

# What a value the database or the serialiser cannot take raises; anything else is about the database, not
# the record (PostgreSQL adds its own: ledger_pg.VALUE_ERRORS).
_VALUE_ERRORS: tuple[type[BaseException], ...] = (
    OverflowError,
    TypeError,
    ValueError,
    sqlite3.InterfaceError,
    sqlite3.DataError,
    sqlite3.IntegrityError,
    sqlite3.ProgrammingError,
)

Record = RequestRecord  # a record as the proxy wrote it; partial in tests, and in old ledgers (no key_id)


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One group's sums (Ledger.usage; Ledger.key_usage: by precision); energies None when none is known."""

    group: tuple[str | None, ...]  # the values of the group_by fields, in their order
    requests: int
    ok_requests: int
    prompt_tokens: int
    completion_tokens: int
    energy_j: float | None  # of the requests whose energy is known
    idle_energy_j: float | None
    energy_unknown_requests: int
    completion_tokens_energy_known: int  # completion tokens of the requests whose energy is known
    co2e_g: float | None = None  # of the requests whose CO2e is known
    co2e_unknown_requests: int = 0
    cost: float | None = None  # of the requests whose cost is known
    cost_unknown_requests: int = 0
    cost_currency_min: str | None = None  # the costs' currencies (two different: not one sum)
    cost_currency_max: str | None = None


Row = tuple[
    Any, ...
]  # id, chain_id, hop, start_unix_s, record, key_id, client_request_id, co2e_g, cost, cost_currency (+ PostgreSQL's facets)
Durable = Callable[[list[Record]], None]


class _Db:
    """What differs between the databases: connections, the upsert, pruning, reads, how fields are read."""

    kind: str
    table: str
    fields: dict[str, str]  # a field (query.EQUALITY_FIELDS, ledger_pg.FACETS) as SQL over a row
    value_errors: tuple[type[BaseException], ...]
    errors: tuple[type[BaseException], ...]  # what the driver raises
    display: str  # where the ledger is, for logs (no password)

    def connect(self) -> Any:
        """A connection for the writer thread (raises when the database cannot be reached)."""
        raise NotImplementedError

    def write(self, conn: Any, rows: list[Row]) -> None:
        """One transaction inserting (or replacing) ``rows``."""
        raise NotImplementedError

    def prune(self, conn: Any, before_unix_s: float) -> None:
        raise NotImplementedError

    def query(self, sql: str, params: tuple[Any, ...] | list[Any]) -> list[tuple[Any, ...]]:
        """Rows of a read (``?`` placeholders), from any thread (one at a time on the reader connection);
        LedgerUnavailable once closed."""
        raise NotImplementedError

    def row(self, row: Row, rec: Record) -> Row:
        """The database's row of a record from its common columns."""
        return row

    def close(self) -> None:
        raise NotImplementedError


class _Sqlite(_Db):
    kind = "sqlite"
    table = "requests"
    fields = _SQLITE_FIELDS
    value_errors = _VALUE_ERRORS
    errors = (sqlite3.Error,)

    def __init__(self, path: str) -> None:
        self.path = self.display = path
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(requests)")}
            for column, ddl in _MIGRATIONS:
                if column not in columns:
                    conn.execute(ddl)
            conn.executescript(_INDEXES)
            conn.commit()
            conn.close()
        except (sqlite3.Error, OSError) as e:
            raise ConfigError(f"ledger.path: cannot open SQLite ledger {path!r}: {e}") from e
        # one reader connection for the read threads (Ledger.read): one read at a time, under the lock
        self._read_lock = threading.Lock()
        self._reader = sqlite3.connect(path, check_same_thread=False)
        self._reader.execute("PRAGMA query_only=ON")
        self._closed = False

    def connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=5.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def write(self, conn: sqlite3.Connection, rows: list[Row]) -> None:
        with conn:
            conn.executemany(_INSERT, rows)

    def prune(self, conn: sqlite3.Connection, before_unix_s: float) -> None:
        with conn:
            conn.execute("DELETE FROM requests WHERE start_unix_s < ?", (before_unix_s,))

    def query(self, sql: str, params: tuple[Any, ...] | list[Any]) -> list[tuple[Any, ...]]:
        with self._read_lock:
            if self._closed:
                raise LedgerUnavailable(_CLOSED)
            return self._reader.execute(sql, params).fetchall()

    def close(self) -> None:
        if not self._read_lock.acquire(blocking=False):  # a read is running: interrupt it
            self._reader.interrupt()
            if not self._read_lock.acquire(timeout=_CLOSE_READ_S):
                log.warning(
                    "a ledger read did not stop within %.3g s; its connection is left open", _CLOSE_READ_S
                )
                self._closed = True
                return
        try:
            if not self._closed:
                self._closed = True
                self._reader.close()
        finally:
            self._read_lock.release()


_PG_COLUMNS = (
    "id",
    "chain_id",
    "hop",
    "start_unix_s",
    "record",
    "key_id",
    "client_request_id",
    "co2e_g",
    "cost",
    "cost_currency",
    *ledger_pg.FACETS,
)
_PG_INSERT = (
    f"INSERT INTO {ledger_pg.TABLE} ({', '.join(_PG_COLUMNS)}) VALUES ({', '.join(['%s'] * len(_PG_COLUMNS))}) "
    f"ON CONFLICT (id) DO UPDATE SET {', '.join(f'{c} = EXCLUDED.{c}' for c in _PG_COLUMNS[1:])}"
)
_READ_RETRY_S = 1.0  # after a failed read connection, reads fail at once (503) for this long


class _Postgres(_Db):
    kind = "postgresql"
    table = ledger_pg.TABLE
    fields = _PG_FIELDS
    value_errors = _VALUE_ERRORS + ledger_pg.VALUE_ERRORS
    errors = ledger_pg.ERRORS

    def __init__(self, url: str, password_env: str | None) -> None:
        self.target = ledger_pg.open_target(url, password_env, "ledger.url")
        self.display = self.target.display
        self.migrated = False
        self._read_lock = threading.Lock()
        self._reader: psycopg.Connection[Any] | None = None
        self._read_down_until = -math.inf
        self._read_error = ""
        self._closed = False
        self.ensure_schema(at_start=True)

    def ensure_schema(self, at_start: bool = False) -> None:
        """Apply the migrations once; at start, a database that cannot be reached is waited for (by the
        writer's retries) rather than refused, so that the proxy starts and keeps its records meanwhile."""
        if self.migrated:
            return
        try:
            self.target.migrate()
        except psycopg.OperationalError as e:
            if not at_start:
                raise
            log.warning(
                "ledger %s cannot be reached yet (%s); records are kept until it can", self.display, e
            )
            return
        except psycopg.Error as e:
            if not at_start:
                raise
            raise ConfigError(f"ledger.url: cannot set up the ledger in {self.display}: {e}") from None
        self.migrated = True

    def connect(self) -> psycopg.Connection[Any]:
        self.ensure_schema()
        return self.target.connect(autocommit=True)

    def write(self, conn: psycopg.Connection[Any], rows: list[Row]) -> None:
        try:
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(_PG_INSERT, rows)
        except psycopg.Error as e:
            raise type(e)(self.target.scrub(str(e))) from None

    def prune(self, conn: psycopg.Connection[Any], before_unix_s: float) -> None:
        try:
            with conn.transaction():
                conn.execute(f"DELETE FROM {ledger_pg.TABLE} WHERE start_unix_s < %s", (before_unix_s,))
        except psycopg.Error as e:
            raise type(e)(self.target.scrub(str(e))) from None

    def query(self, sql: str, params: tuple[Any, ...] | list[Any]) -> list[tuple[Any, ...]]:
        """A read on the shared reader connection; LedgerUnavailable (503) when the database cannot answer
        (a connection lost since the last read is made again once)."""
        pg_sql = sql.replace("?", "%s")
        with self._read_lock:
            if self._closed:
                raise LedgerUnavailable(_CLOSED)
            while True:
                fresh = self._reader is None
                try:
                    if self._reader is None:
                        if time.monotonic() < self._read_down_until:
                            raise LedgerUnavailable(self._read_error)
                        self._reader = self.target.connect(autocommit=True)
                    return self._reader.execute(pg_sql, params).fetchall()
                except psycopg.Error as e:
                    why = f"the ledger database cannot be read: {self.target.scrub(str(e))}"[:500]
                    reader = self._reader
                    if reader is not None and not (reader.closed or reader.broken):
                        raise LedgerUnavailable(why) from None  # the query, not the connection
                    if reader is not None:
                        _close_quietly(reader)
                        self._reader = None
                    if fresh:
                        self._read_down_until = time.monotonic() + _READ_RETRY_S
                        self._read_error = why
                        raise LedgerUnavailable(why) from None
                    # a connection lost since the last read (a restart of the database): once more, anew

    def row(self, row: Row, rec: Record) -> Row:
        return (*row, *ledger_pg.facets(rec))

    def close(self) -> None:
        if not self._read_lock.acquire(blocking=False):  # a read is running: cancel its query
            reader = self._reader
            if reader is not None:
                try:
                    reader.cancel_safe(timeout=_CLOSE_READ_S)
                except Exception:
                    log.debug("cancelling a ledger read failed", exc_info=True)
            if not self._read_lock.acquire(timeout=_CLOSE_READ_S):
                log.warning(
                    "a ledger read did not stop within %.3g s; its connection is left open", _CLOSE_READ_S
                )
                self._closed = True
                return
        try:
            self._closed = True
            if self._reader is not None:
                _close_quietly(self._reader)
                self._reader = None
        finally:
            self._read_lock.release()


class Ledger:
    def __init__(
        self,
        path: str,
        retention_days: float | None = None,
        batch_s: float = 0.05,
        url: str | None = None,
        password_env: str | None = None,
    ) -> None:
        """The SQLite ledger at ``path``, or the PostgreSQL ledger at ``url`` when one is given."""
        self.path = path
        self.retention_s = retention_days * 86400 if retention_days else None
        self.batch_s = batch_s
        self._db: _Db = _Postgres(url, password_env) if url else _Sqlite(path)
        # the reads' threads (read): started on the first read, shut down by close
        self._reads = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="qtrap-ledger-read")
        self._lock = threading.Lock()  # guards _pending
        self._pending: list[Record] = []  # handed over, not yet taken by the writer
        self._backlog: list[Record] = []  # taken by the writer, not yet committed (outlives a dead thread)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._restart_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None  # a scheduled restart of a writer that died
        self._on_durable: Durable | None = None
        self._on_dropped: Durable | None = None
        self._closed = False
        self._failing: str | None = None  # why the last commit failed; None once one succeeds
        self._died: str | None = None  # what killed the last writer thread
        self._last_restart = -math.inf
        self.written = 0
        self.restarts = 0
        self.write_errors: dict[str, int] = dict.fromkeys(ERROR_KINDS, 0)
        self.last_error: str | None = None
        self.last_error_unix_s: float | None = None

    # -- lifecycle ---------------------------------------------------------------
    def start(self, on_durable: Durable, on_dropped: Durable | None = None) -> None:
        """Start the writer. ``on_durable`` gets each committed batch, ``on_dropped`` records given up."""
        self._on_durable = on_durable
        self._on_dropped = on_dropped
        self._spawn()

    def put(self, record: Record) -> None:
        """Hand over a final record (never blocks on the database); the writer is woken once per batch."""
        with self._lock:
            self._pending.append(record)
            first = len(self._pending) == 1
        if first:
            self._ensure_writer()
            self._wake.set()

    def close(self) -> None:
        """Flush what is queued (a bounded number of tries) and stop the writer."""
        if self._thread is not None and not self._closed:
            self._ensure_writer(force=True)  # a dead writer is replaced so that the queue is flushed
            self._closed = True
            self._stop.set()
            self._wake.set()
            thread = self._thread
            thread.join(timeout=30)
            if thread.is_alive():
                log.error("ledger writer did not finish within 30 s; %d records may be lost", self.pending())
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self._reads.shutdown(wait=False)  # reads still queued find the database closed (503)
        self._db.close()

    @property
    def backend(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._db.kind

    def pending(self) -> int:
        """Records handed over and not yet committed."""
        return len(self._pending) + len(self._backlog)

    def state(self) -> dict[str, Any]:
        """The ledger's health: ``status`` ok | degraded (commits failing, records kept) | down (no writer)."""
        self._ensure_writer()
        thread = self._thread
        if thread is None or not thread.is_alive():
            status = "down"
            if self._closed:
                reason: str | None = "closed"
            elif thread is None:
                reason = "not started"
            else:
                reason = f"the writer thread died ({self._died}); it is restarted on the next record or check"
        elif self._failing is not None:
            status, reason = "degraded", f"commits failing, records kept and retried: {self._failing}"
        else:
            status, reason = "ok", None
        return {
            "status": status,
            "reason": reason,
            "pending": self.pending(),
            "written": self.written,
            "write_errors": dict(self.write_errors),
            "restarts": self.restarts,
            "last_error": self.last_error,
            "last_error_unix_s": self.last_error_unix_s,
        }

    def _spawn(self) -> None:
        self._thread = threading.Thread(target=self._run, name="qtrap-ledger", daemon=True)
        self._thread.start()
        self._wake.set()  # a dead writer's batch may be waiting

    def _ensure_writer(self, force: bool = False) -> None:
        """Restart a writer thread that died (at most once per _RESTART_MIN_S unless forced)."""
        dead = self._thread
        if dead is None or dead.is_alive() or self._closed:
            return
        with self._restart_lock:
            now = time.monotonic()
            if self._thread is not dead or (not force and now - self._last_restart < _RESTART_MIN_S):
                return
            self._last_restart = now
            self.restarts += 1
            log.warning("restarting the ledger writer (%d records waiting)", self.pending())
            self._spawn()

    def _restart_after(self, dead: threading.Thread) -> None:
        dead.join(timeout=5)  # it is on its way out; only a finished thread is replaced
        self._ensure_writer()

    # -- reads (any thread; the proxy's through read; WAL lets them run beside the writer) --
    async def read(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """``fn(*args, **kwargs)``, one or more of the reads below, run in one of the ledger's read threads
        (``READ_THREADS``) while the event loop goes on; what it raises (LedgerUnavailable: 503) is raised
        here. LedgerUnavailable once the ledger is closed."""
        try:
            future = self._reads.submit(fn, *args, **kwargs)
        except RuntimeError:  # the pool is shut down: the ledger is closed
            raise LedgerUnavailable(_CLOSED) from None
        return await asyncio.wrap_future(future)

    def get(self, request_id: str) -> Record | None:
        t = self._db.table
        rows = self._db.query(f"SELECT record FROM {t} WHERE id = ?", (request_id,))
        return _load(rows[0][0]) if rows else None

    def chain(self, chain_id: str) -> list[Record]:
        t = self._db.table
        rows = self._db.query(
            f"SELECT record FROM {t} WHERE chain_id = ? ORDER BY hop NULLS FIRST, start_unix_s, id",
            (chain_id,),
        )
        return [_load(r[0]) for r in rows]

    def key_usage(self, key_id: str, since_unix_s: float, until_unix_s: float) -> list[UsageRow]:
        """One key's final records that started in [since, until), summed by precision."""
        return self.usage(RecordFilter(since_unix_s, until_unix_s, key_id=key_id), ("precision",))

    def usage(
        self, filt: RecordFilter, group_by: tuple[str, ...], limit: int | None = None
    ) -> list[UsageRow]:
        """The final records ``filt`` selects, summed per group of ``group_by`` (query.GROUP_BY; none: one
        row for all, its energy NULL when there are none), ordered by the groups (nulls first, text
        byte-wise); at most ``limit`` rows."""
        fields = self._db.fields
        where, params = _where(filt, _COLUMNS, fields)
        sql = _USAGE.format(table=self._db.table, **fields).format(
            groups="".join(f"g{i}, " for i in range(len(group_by))),
            inner="".join(f"{fields[_GROUPS[g]]} AS g{i}, " for i, g in enumerate(group_by)),
            where=where,
            group_by=(
                "GROUP BY {g} ORDER BY {o}".format(
                    g=", ".join(f"g{i}" for i in range(len(group_by))),
                    o=", ".join(f"g{i} NULLS FIRST" for i in range(len(group_by))),
                )
                if group_by
                else ""
            ),
        )
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return [_usage_row(row, len(group_by)) for row in self._db.query(sql, params)]

    def records(self, query: RecordQuery) -> list[Record]:
        """One page of the final records ``query`` selects, in its order after its cursor: at most
        ``query.limit + 1`` (one more tells that there is a next page)."""
        if query.final is False:  # the ledger holds final records only
            return []
        where, params = _where(query.filter, _COLUMNS, self._db.fields)
        desc = query.order == "desc"
        if query.after is not None:
            where += f" AND (start_unix_s, id) {'<' if desc else '>'} (?, ?)"
            params.extend(query.after)
        way = "DESC" if desc else "ASC"
        t = self._db.table
        sql = f"SELECT record FROM {t} WHERE {where} ORDER BY start_unix_s {way}, id {way} LIMIT ?"
        rows = self._db.query(sql, (*params, query.limit + 1))
        return [_load(r[0]) for r in rows]

    def count(self) -> int:
        return int(self._db.query(f"SELECT count(*) FROM {self._db.table}", ())[0][0])

    # -- the writer thread ----------------------------------------------------------
    def _run(self) -> None:
        """Thread target: whatever ends the loop early is logged and counted, and a restart is scheduled."""
        try:
            self._loop()
            if self._stop.is_set():
                return
            self._died = "its loop returned"
        except BaseException as e:  # even SystemExit: never lost in threading.excepthook
            self._died = f"{type(e).__name__}: {e}"
        self._error("writer", f"writer thread died: {self._died}")
        log.critical("ledger writer thread died: %s", self._died, exc_info=True)
        # restart without waiting for the next record or check (sooner would exceed the restart rate)
        delay = max(0.05, self._last_restart + _RESTART_MIN_S - time.monotonic() + 0.01)
        self._timer = threading.Timer(delay, self._restart_after, (threading.current_thread(),))
        self._timer.daemon = True
        self._timer.start()

    def _loop(self) -> None:
        conn: Any = None
        failures = 0
        last_prune = -math.inf
        try:
            while True:
                stopping = self._stop.is_set()
                phase = "writer"
                try:
                    if conn is None:
                        phase = "commit"
                        conn = self._connect()
                        phase = "writer"
                    if self.retention_s and time.monotonic() - last_prune > 60:
                        last_prune = time.monotonic()
                        self._prune(conn)
                    if not self._backlog:
                        if stopping and not self._pending:
                            return
                        if self._wake.wait(timeout=1.0) and not stopping:
                            self._stop.wait(self.batch_s)  # let a batch gather (close() cuts it short)
                    self._take_pending()
                    if self._backlog:
                        phase = "commit"
                        self._commit_some(conn)
                        failures = 0
                        if self._failing is not None:
                            log.warning("ledger writes recovered (%d records waiting)", self.pending())
                            self._failing = None
                except Exception as e:  # never let the writer stop: keep the records, back off, try again
                    failures += 1
                    what = f"{type(e).__name__}: {e}"
                    self._error(phase, what)
                    if phase == "commit":
                        self._failing = what
                    log.error(
                        "ledger %s failed (%s); %d records kept for the next try",
                        phase,
                        what,
                        len(self._backlog),
                        exc_info=phase == "writer",
                    )
                    if conn is not None:  # a fresh connection for the next try
                        _close_quietly(conn)
                        conn = None
                    if stopping and failures >= _CLOSE_TRIES:
                        self._drop(self._backlog[:], f"still refused at shutdown after {failures} tries")
                        self._backlog.clear()
                        return
                    wait = min(_BACKOFF_S[1], _BACKOFF_S[0] * 2 ** min(failures - 1, 16))
                    if stopping:
                        time.sleep(min(wait, 0.2))
                    else:
                        self._stop.wait(wait)
        finally:
            if conn is not None:
                _close_quietly(conn)

    def _take_pending(self) -> None:
        self._wake.clear()  # before the swap: a record handed over after it wakes the writer again
        with self._lock:
            batch, self._pending = self._pending, []
        if batch:
            self._backlog.extend(batch)
            over = len(self._backlog) - _MAX_BACKLOG
            if over > 0:
                self._drop(self._backlog[:over], f"backlog over {_MAX_BACKLOG} records")
                del self._backlog[:over]

    def _connect(self) -> Any:
        return self._db.connect()

    def _commit_some(self, conn: Any) -> None:
        """Commit the oldest records of the backlog (raises, keeping them, when the batch is refused)."""
        chunk = self._backlog[:_COMMIT_ROWS]
        rows: list[Row] = []
        stored: list[Record] = []
        for rec in chunk:
            try:
                rows.append(self._db.row(_row(rec), rec))
                stored.append(rec)
            except Exception as e:
                row, rec2 = self._with_note(rec, e)
                rows.append(row)
                stored.append(rec2)
        try:
            self._write(conn, rows)
        except self._db.value_errors:  # one record's values, probably: write them one by one
            for i, (row, rec) in enumerate(zip(rows, stored, strict=True)):
                try:
                    self._write(conn, [row])
                except self._db.value_errors as e:
                    rows[i], stored[i] = self._with_note(rec, e)
                    self._write(conn, [rows[i]])  # refused too: it is the database, not the record
        del self._backlog[: len(chunk)]
        self.written += len(rows)
        if self._on_durable is not None:
            try:
                self._on_durable(stored)
            except Exception:
                log.exception("ledger durable callback failed")

    def _write(self, conn: Any, rows: list[Row]) -> None:
        """One transaction (tests replace this to inject faults)."""
        self._db.write(conn, rows)

    def _with_note(self, rec: Record, e: BaseException) -> tuple[Row, Record]:
        """A record that cannot be stored as it is: safe index columns, a note, counted and logged."""
        note = f"stored with a note: {type(e).__name__}: {e}"[:300]
        rid = _safe_text(rec.get("id")) or "unknown"
        self._error("record", f"record {rid}: {note}")
        log.error("ledger record %s could not be stored as it was (%s)", rid, note)
        rec2: Record = {**rec, "ledger_error": note}
        try:
            text = json.dumps(rec2, default=repr)  # ASCII, arbitrary ints, NaN: takes what orjson refuses
        except Exception:
            text = json.dumps({"id": rid, "ledger_error": note})
        chain = rec.get("chain_id")
        hop = rec.get("hop")
        row: Row = self._db.row(
            (
                rid,
                _safe_text(chain) if isinstance(chain, str) else None,
                hop if type(hop) is int and -_INT64 <= hop < _INT64 else None,
                _start(rec),
                text,
                _key_id(rec),
                _client_request_id(rec),
                *_footprint(rec),
            ),
            rec,
        )
        return row, rec2

    def _drop(self, records: list[Record], why: str) -> None:
        if not records:
            return
        self._error("dropped", f"{len(records)} records dropped: {why}", n=len(records))
        log.error("ledger dropped %d records: %s", len(records), why)
        if self._on_dropped is not None:
            try:
                self._on_dropped(records)
            except Exception:
                log.exception("ledger dropped callback failed")

    def _error(self, kind: str, what: str, n: int = 1) -> None:
        self.write_errors[kind] += n
        self.last_error = f"{kind}: {what}"[:500]
        self.last_error_unix_s = time.time()

    def _prune(self, conn: Any) -> None:
        assert self.retention_s is not None
        try:
            self._db.prune(conn, time.time() - self.retention_s)
        except self._db.errors as e:
            log.error("ledger retention pass failed: %s", e)


def _row(rec: Record) -> Row:
    """The common columns of a record's row, or ValueError/TypeError naming what cannot be stored as it is."""
    rid, chain, hop = rec["id"], rec.get("chain_id"), rec.get("hop")
    if not _storable_text(rid):
        raise ValueError(f"id {_safe_text(rid)!r} is not a storable string")
    if chain is not None and not _storable_text(chain):
        raise ValueError(f"chain_id {_safe_text(chain)!r} is not a storable string")
    if hop is not None and not (type(hop) is int and -_INT64 <= hop < _INT64):
        raise ValueError(f"hop {_safe_text(hop)} is not a 64-bit integer")
    return (
        rid,
        chain,
        hop,
        _start(rec),
        orjson.dumps(rec, option=orjson.OPT_NON_STR_KEYS).decode(),
        _key_id(rec),
        _client_request_id(rec),
        *_footprint(rec),
    )


def _footprint(rec: Record) -> tuple[float | None, float | None, str | None]:
    """The record's CO2e, cost and currency for their columns (anything but a finite number: NULL)."""
    co2e, cost, currency = rec.get("co2e_g"), rec.get("cost"), rec.get("cost_currency")

    def num(v: Any) -> float | None:
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        return float(v) if ok else None

    cost_n = num(cost)
    ok_currency = isinstance(currency, str) and len(currency) <= 16 and currency.isascii()
    return num(co2e), cost_n, currency if cost_n is not None and ok_currency else None


def _storable_text(v: Any) -> bool:
    if not isinstance(v, str) or not v or len(v) > _MAX_TEXT or "\x00" in v:  # PostgreSQL takes no NUL
        return False
    if v.isascii():
        return True
    try:
        v.encode()
    except UnicodeEncodeError:
        return False
    return True


def _safe_text(v: Any) -> str | None:
    """Any value as a short string either database takes (lone surrogates and NUL escaped)."""
    if v is None:
        return None
    try:
        s = v if isinstance(v, str) else repr(v)
    except ValueError:  # an int too long to print
        s = f"<{type(v).__name__}>"
    return s[:_MAX_TEXT].encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def _key_id(rec: Record) -> str | None:
    """The record's key id for its index column (anything but a well-formed key id is not one)."""
    v = rec.get("key_id")
    return v if isinstance(v, str) and KEY_ID.fullmatch(v) else None


def _client_request_id(rec: Record) -> str | None:
    """The record's client request id for its index column (as the relay checks it, else none)."""
    v = rec.get("client_request_id")
    return v if isinstance(v, str) and check_client_request_id(v) == v else None


def _where(
    filt: RecordFilter, columns: frozenset[str], fields: dict[str, str] = _SQLITE_FIELDS
) -> tuple[str, list[Any]]:
    """SQL (and its parameters) selecting the rows ``filt`` selects; ``columns``: the index columns the
    table has (a SQLite ledger opened read-only may predate some: their values are read from the record);
    ``fields``: how the database reads a field."""
    clauses = ["start_unix_s >= ?"]
    params: list[Any] = [filt.since_unix_s]
    if filt.until_unix_s is not None:
        clauses.append("start_unix_s < ?")
        params.append(filt.until_unix_s)
    for name, value in filt.equalities():
        sql = fields[name] if name in columns or name not in _COLUMNS else f"json_extract(record, '$.{name}')"
        clauses.append(f"{sql} = ?")
        params.append(value)
    return " AND ".join(clauses), params


def _usage_row(row: tuple[Any, ...], n: int) -> UsageRow:
    """A usage row as either database returns it (PostgreSQL's sums of integers are numeric: Decimal)."""
    (requests, ok, prompt, completion, energy, idle, unknown, known_completion, co2e, co2e_unknown, cost,
     cost_unknown, currency_min, currency_max) = row[n:]  # fmt: skip
    return UsageRow(
        tuple(row[:n]),
        int(requests),
        int(ok),
        int(prompt),
        int(completion),
        None if energy is None else float(energy),
        None if idle is None else float(idle),
        int(unknown),
        int(known_completion),
        None if co2e is None else float(co2e),
        int(co2e_unknown),
        None if cost is None else float(cost),
        int(cost_unknown),
        currency_min,
        currency_max,
    )


def export(path: str, filt: RecordFilter) -> Iterator[Record]:
    """The final records of the ledger at ``path`` that ``filt`` selects, oldest first, read one by one
    from a read-only connection (the file is not changed, nor migrated). ConfigError when the file is
    not a ledger SQLite can open."""
    if not Path(path).is_file():
        raise ConfigError(f"--ledger: {path!r} is not a file")
    try:
        conn = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True)
        try:
            columns = frozenset(row[1] for row in conn.execute("PRAGMA table_info(requests)"))
            if "record" not in columns:
                raise ConfigError(f"--ledger: {path!r} is not a qtrap ledger (no requests table)")
            where, params = _where(filt, columns)
            cur = conn.execute(f"SELECT record FROM requests WHERE {where} ORDER BY start_unix_s, id", params)
        except BaseException:
            conn.close()
            raise
    except sqlite3.Error as e:
        raise ConfigError(f"--ledger: cannot read {path!r}: {e}") from e
    return _rows(conn, cur, path)


def _rows(conn: sqlite3.Connection, cur: sqlite3.Cursor, path: str) -> Iterator[Record]:
    try:
        for (text,) in cur:
            yield _load(text)
    except sqlite3.Error as e:
        raise ConfigError(f"--ledger: reading {path!r} failed: {e}") from e
    finally:
        conn.close()


def export_url(url: str, filt: RecordFilter, password_env: str | None = None) -> Iterator[Record]:
    """As :func:`export`, from the PostgreSQL ledger at ``url``: a read-only transaction read through a
    server-side cursor (the database is not changed, nor migrated). ConfigError (without the password)
    when it cannot be read or holds no ledger."""
    target = ledger_pg.open_target(url, password_env, "--ledger-url")
    try:
        conn = target.connect(read_only=True)
        try:
            if not target.table_exists(conn):
                raise ConfigError(f"--ledger-url: {target.display} holds no qtrap ledger ({ledger_pg.TABLE})")
            where, params = _where(filt, _COLUMNS, _PG_FIELDS)
            cur = conn.cursor(name="qtrap_export")
            cur.itersize = 2_000
            sql = f"SELECT record FROM {ledger_pg.TABLE} WHERE {where} ORDER BY start_unix_s, id"
            try:
                cur.execute(sql.replace("?", "%s"), params)
            except BaseException:
                _close_quietly(cur)
                raise
        except BaseException:
            _close_quietly(conn)
            raise
    except psycopg.Error as e:
        raise ConfigError(f"--ledger-url: cannot read {target.display}: {target.scrub(str(e))}") from None
    return _pg_rows(conn, cur, target)


def _pg_rows(
    conn: psycopg.Connection[Any], cur: psycopg.ServerCursor[Any], target: ledger_pg.PgTarget
) -> Iterator[Record]:
    try:
        for (text,) in cur:
            yield _load(text)
    except psycopg.Error as e:
        raise ConfigError(f"--ledger-url: reading {target.display} failed: {target.scrub(str(e))}") from None
    finally:
        _close_quietly(cur)  # before its connection (a server-side cursor closes on it)
        _close_quietly(conn)


def _start(rec: Record) -> float:
    v = rec.get("start_unix_s")
    if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v:
        return float(v)
    return time.time()


def _load(text: str | bytes) -> Record:
    obj: Record = json.loads(text)
    return obj


def _close_quietly(conn: Any) -> None:
    try:
        conn.close()
    except Exception:
        log.debug("closing a ledger connection failed", exc_info=True)
