"""The durable per-request ledger: SQLite in WAL mode, written in batches off the request path.

Final records are queued; a writer thread commits them in batches (at most
``batch_s`` apart) and then reports them durable, so a record the admin API calls
final survives a SIGKILL of the proxy. ``synchronous=NORMAL`` in WAL mode keeps
committed transactions across a process crash (not across a power cut).
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qtrap_proxy.errors import ConfigError

log = logging.getLogger("qtrap.ledger")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
  id TEXT PRIMARY KEY,
  chain_id TEXT,
  hop INTEGER,
  start_unix_s REAL NOT NULL,
  record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_chain ON requests (chain_id) WHERE chain_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS requests_start ON requests (start_unix_s);
"""

Durable = Callable[[list[dict[str, Any]]], None]


class Ledger:
    def __init__(self, path: str, retention_days: float | None = None, batch_s: float = 0.05) -> None:
        self.path = path
        self.retention_s = retention_days * 86400 if retention_days else None
        self.batch_s = batch_s
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
            conn.commit()
            conn.close()
        except (sqlite3.Error, OSError) as e:
            raise ConfigError(f"ledger.path: cannot open SQLite ledger {path!r}: {e}") from e
        self._reader = sqlite3.connect(path, check_same_thread=False)
        self._reader.execute("PRAGMA query_only=ON")
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._on_durable: Durable | None = None
        self.written = 0
        self.write_errors = 0

    def start(self, on_durable: Durable) -> None:
        self._on_durable = on_durable
        self._thread = threading.Thread(target=self._writer, name="qtrap-ledger", daemon=True)
        self._thread.start()

    def put(self, record: dict[str, Any]) -> None:
        """Queue a final record (never blocks the request path)."""
        self._queue.put(record)

    def close(self) -> None:
        """Flush what is queued and stop the writer."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None
        self._reader.close()

    # -- reads (event-loop thread; WAL lets them run beside the writer) ---------------
    def get(self, request_id: str) -> dict[str, Any] | None:
        row = self._reader.execute("SELECT record FROM requests WHERE id = ?", (request_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def chain(self, chain_id: str) -> list[dict[str, Any]]:
        rows = self._reader.execute(
            "SELECT record FROM requests WHERE chain_id = ? ORDER BY hop, start_unix_s", (chain_id,)
        ).fetchall()
        return [json.loads(r[0]) for r in rows]

    def count(self) -> int:
        return int(self._reader.execute("SELECT count(*) FROM requests").fetchone()[0])

    # -- the writer thread ----------------------------------------------------------
    def _writer(self) -> None:
        conn = sqlite3.connect(self.path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        last_prune = 0.0
        backlog: list[dict[str, Any]] = []
        stop = False
        while not stop:
            try:
                first = self._queue.get(timeout=1.0)
            except queue.Empty:
                first = {}
            if first is None:
                stop = True
            elif first:
                backlog.append(first)
                deadline = time.monotonic() + self.batch_s
                while len(backlog) < 1000 and (remaining := deadline - time.monotonic()) > 0:
                    try:
                        item = self._queue.get(timeout=remaining)
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    backlog.append(item)
            tries = 3 if stop else 1
            while backlog and tries > 0:
                tries -= 1
                if self._commit(conn, backlog):
                    done, backlog = backlog, []
                    if self._on_durable is not None:
                        try:
                            self._on_durable(done)
                        except Exception:
                            log.exception("ledger durable callback failed")
            if self.retention_s and time.monotonic() - last_prune > 60:
                last_prune = time.monotonic()
                self._prune(conn)
        conn.close()

    def _commit(self, conn: sqlite3.Connection, records: list[dict[str, Any]]) -> bool:
        rows = [
            (r["id"], r.get("chain_id"), r.get("hop"), r.get("start_unix_s") or time.time(), json.dumps(r))
            for r in records
        ]
        try:
            with conn:
                conn.executemany(
                    "INSERT OR REPLACE INTO requests (id, chain_id, hop, start_unix_s, record) VALUES (?, ?, ?, ?, ?)",
                    rows,
                )
            self.written += len(rows)
            return True
        except sqlite3.Error as e:  # disk full, locked, ...: keep the records and try again
            self.write_errors += 1
            log.error("ledger write failed (%s); %d records kept for the next try", e, len(rows))
            time.sleep(0.5)
            return False

    def _prune(self, conn: sqlite3.Connection) -> None:
        assert self.retention_s is not None
        try:
            with conn:
                conn.execute("DELETE FROM requests WHERE start_unix_s < ?", (time.time() - self.retention_s,))
        except sqlite3.Error as e:
            log.error("ledger retention pass failed: %s", e)
