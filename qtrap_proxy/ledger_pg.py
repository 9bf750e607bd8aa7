"""The fleet ledger's PostgreSQL side (``ledger.url``): connections, credentials, schema migrations.

Several proxy replicas write one ledger in PostgreSQL; ledger.py keeps the one writer, its batching and
fault rules, and the queries, over either database. This module holds what only PostgreSQL needs:

* the URL (``postgresql://user@host:port/db``) and its password, from the URL or the environment variable
  ``ledger.password_env`` (libpq's own ``PGPASSWORD`` and ``~/.pgpass`` work too); a password never
  appears in a log line or an error (:func:`redact`, :meth:`PgTarget.scrub`);
* connections with bounded waits: ``connect_timeout``, TCP keepalives and a ``statement_timeout``, so
  that a database that is down or hangs costs the writer a retry, never a stuck thread;
* the schema, as numbered migrations recorded in ``qtrap_schema_migrations`` and applied at start in one
  transaction under an advisory lock, so replicas starting together apply each migration once. A
  database migrated by a newer qtrap is used as it is (a rolling upgrade runs both versions at once).
  A schema already up to date is only read, so a user without ``CREATE`` can run the proxies once an
  owner has started one.

The ``requests`` table (``qtrap_requests``) has SQLite's columns and, since PostgreSQL cannot read every
record's text as JSON (NaN, ``\\u0000``), the fields the usage sums and filters read as columns of their
own, taken from the record when it is written (:func:`facets`).
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

from qtrap_proxy.errors import ConfigError

log = logging.getLogger("qtrap.ledger")

TABLE = "qtrap_requests"
MIGRATIONS_TABLE = "qtrap_schema_migrations"
_LOCK_KEY = 0x71747261706C6564  # pg_advisory_xact_lock's key: "qtrapled"
_CONNECT_TIMEOUT_S = 5
_STATEMENT_TIMEOUT_MS = 30_000
_INT64 = 2**63

# (version, what it does, its statements): applied in order, each once, recorded in MIGRATIONS_TABLE.
# Text columns compare byte-wise (COLLATE "C"), as SQLite's do, so that pages and groups are ordered alike.
MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (
        1,
        "the requests table and its indexes",
        (
            f"""CREATE TABLE IF NOT EXISTS {TABLE} (
  id TEXT COLLATE "C" PRIMARY KEY,
  chain_id TEXT COLLATE "C",
  hop BIGINT,
  start_unix_s DOUBLE PRECISION NOT NULL,
  record TEXT NOT NULL,
  key_id TEXT COLLATE "C",
  client_request_id TEXT COLLATE "C",
  pool TEXT COLLATE "C",
  precision TEXT COLLATE "C",
  backend TEXT COLLATE "C",
  status TEXT COLLATE "C",
  prompt_tokens BIGINT,
  completion_tokens BIGINT,
  energy_j DOUBLE PRECISION,
  idle_energy_j DOUBLE PRECISION
)""",
            f"CREATE INDEX IF NOT EXISTS {TABLE}_chain ON {TABLE} (chain_id) WHERE chain_id IS NOT NULL",
            f"CREATE INDEX IF NOT EXISTS {TABLE}_start_id ON {TABLE} (start_unix_s, id)",
            f"CREATE INDEX IF NOT EXISTS {TABLE}_key ON {TABLE} (key_id, start_unix_s) WHERE key_id IS NOT NULL",
            f"CREATE INDEX IF NOT EXISTS {TABLE}_client_request_id ON {TABLE} (client_request_id, start_unix_s) "
            "WHERE client_request_id IS NOT NULL",
        ),
    ),
    (
        2,
        "each record's CO2e, cost and currency (NULL in the rows already there: unknown)",
        (
            f"ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS co2e_g DOUBLE PRECISION",
            f"ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS cost DOUBLE PRECISION",
            f'ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS cost_currency TEXT COLLATE "C"',
        ),
    ),
)
LATEST = MIGRATIONS[-1][0]

# the fields read as columns (ledger.py's usage sums and filters), in the order facets() gives them
FACETS = (
    "pool",
    "precision",
    "backend",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "energy_j",
    "idle_energy_j",
)
_TEXT_FACETS = ("pool", "precision", "backend", "status")
_INT_FACETS = ("prompt_tokens", "completion_tokens")
_FLOAT_FACETS = ("energy_j", "idle_energy_j")

# what a value PostgreSQL or the driver cannot take raises (the record, not the database)
VALUE_ERRORS: tuple[type[BaseException], ...] = (psycopg.DataError, psycopg.IntegrityError)
ERRORS: tuple[type[BaseException], ...] = (psycopg.Error,)


_QUERY_PASSWORD = re.compile(r"(?i)([?&]password=)[^&]*")


def redact(url: str) -> str:
    """The URL without its password (``***`` in its place, in the user information or the query), fit
    for logs and errors."""
    try:
        url = _QUERY_PASSWORD.sub(r"\1***", url)
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)
        user = netloc[0].split(":", 1)[0]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))
    except ValueError:
        return "<a PostgreSQL URL that cannot be parsed>"


def check_url(url: str) -> str:
    """The URL if it is a PostgreSQL URL libpq can parse; ValueError (without the password) otherwise."""
    if not url.startswith(("postgresql://", "postgres://")):
        raise ValueError("must be a postgresql:// URL (postgresql://user@host:port/database)")
    try:
        psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error as e:
        raise ValueError(f"{redact(url)} is not a valid PostgreSQL URL") from e
    return url


class PgTarget:
    """Where the ledger is: the URL, and the password from the environment when the URL has none."""

    def __init__(self, url: str, password_env: str | None = None) -> None:
        check_url(url)
        self.url = url
        self.display = redact(url)
        self._kwargs: dict[str, Any] = {}
        self._secrets: list[str] = []
        url_password = psycopg.conninfo.conninfo_to_dict(url).get("password")
        if url_password:
            self._secrets.append(str(url_password))
            raw = urlsplit(url).password  # as written, percent-encoded
            if raw and raw != url_password:
                self._secrets.append(raw)
        elif password_env and os.environ.get(password_env):
            self._kwargs["password"] = os.environ[password_env]
            self._secrets.append(os.environ[password_env])

    def connect(self, *, autocommit: bool = False, read_only: bool = False) -> psycopg.Connection[Any]:
        """A connection with bounded waits (OperationalError, its text scrubbed, when it cannot be made)."""
        try:
            conn = psycopg.connect(
                self.url,
                autocommit=autocommit,
                connect_timeout=_CONNECT_TIMEOUT_S,
                keepalives=1,
                keepalives_idle=10,
                keepalives_interval=5,
                keepalives_count=3,
                options=f"-c statement_timeout={_STATEMENT_TIMEOUT_MS}",
                application_name="qtrap-proxy",
                **self._kwargs,
            )
        except psycopg.Error as e:
            raise psycopg.OperationalError(self.scrub(str(e))) from None
        if read_only:
            conn.read_only = True
        return conn

    def scrub(self, text: str) -> str:
        """``text`` without the password (a driver's message may quote the connection string)."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text.replace(self.url, self.display)

    def migrate(self) -> int:
        """Bring the schema up to date (see the module's docstring); the version it is at. Raises
        psycopg.Error (scrubbed) when the database cannot be reached or refuses."""
        with self.connect() as conn:
            try:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                    found = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (MIGRATIONS_TABLE,)).fetchone()
                    if not (found and found[0]):  # DDL only when needed: later starts need no CREATE
                        conn.execute(
                            f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (version INTEGER PRIMARY KEY, "
                            "description TEXT NOT NULL, applied_unix_s DOUBLE PRECISION NOT NULL)"
                        )
                    row = conn.execute(f"SELECT max(version) FROM {MIGRATIONS_TABLE}").fetchone()
                    current = int(row[0]) if row and row[0] is not None else 0
                    for version, what, statements in MIGRATIONS:
                        if version <= current:
                            continue
                        for sql in statements:
                            conn.execute(sql)
                        conn.execute(
                            f"INSERT INTO {MIGRATIONS_TABLE} VALUES (%s, %s, %s)",
                            (version, what, time.time()),
                        )
                        log.info("ledger %s: applied migration %d (%s)", self.display, version, what)
                        current = version
            except psycopg.Error as e:
                raise type(e)(self.scrub(str(e))) from None
        if current > LATEST:
            log.warning(
                "ledger %s: schema version %d is newer than this qtrap's (%d); using it as it is",
                self.display,
                current,
                LATEST,
            )
        return current

    def table_exists(self, conn: psycopg.Connection[Any]) -> bool:
        row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (TABLE,)).fetchone()
        return bool(row and row[0])


def open_target(url: str, password_env: str | None, what: str) -> PgTarget:
    try:
        return PgTarget(url, password_env)
    except ValueError as e:
        raise ConfigError(f"{what}: {e}") from None


def facets(rec: Mapping[str, object]) -> tuple[Any, ...]:
    """The record's fields that have columns of their own (FACETS), each None unless of the type its
    column takes: text, a 64-bit integer (not a bool), a finite number."""
    out: list[Any] = []
    for name in _TEXT_FACETS:
        v = rec.get(name)
        out.append(v if isinstance(v, str) and "\x00" not in v and _encodable(v) else None)
    for name in _INT_FACETS:
        v = rec.get(name)
        out.append(v if type(v) is int and -_INT64 <= v < _INT64 else None)
    for name in _FLOAT_FACETS:
        v = rec.get(name)
        if isinstance(v, int | float) and not isinstance(v, bool) and abs(v) < 1e308 and math.isfinite(v):
            out.append(float(v))
        else:
            out.append(None)
    return tuple(out)


def _encodable(v: str) -> bool:
    try:
        v.encode()
    except UnicodeEncodeError:
        return False
    return True
