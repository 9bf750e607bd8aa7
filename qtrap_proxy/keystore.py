"""Client API keys, stored hashed in their own SQLite file (``auth.keys_path``).

A key is a random secret (``qk-`` + 32 random bytes, URL-safe base64) that the operator hands to one
client; only its SHA-256 is stored, next to a public id (``key_`` + 12 hex digits) that records, URLs,
metrics and the CLI use, an optional name, a pool allow-list (empty: every pool), an optional expiry
and the creation and revocation times. The secret is shown once, by ``qtrap-proxy keys create``.

A fast hash is right here (docs/security.md): the secrets carry 256 random bits, so nobody can search
them from a stolen hash however fast the hash is; slow password hashes (bcrypt, argon2) defend guessable
human passwords and would only add milliseconds to every request.

The file is separate from the ledger, so the ledger can be shared or exported without it, and is
created readable by its owner only. Several processes may use it at once (WAL): the CLI writes, a
running proxy reads it again every ``auth.refresh_s`` (auth.py's ``KeyRing``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from qtrap_proxy.errors import KeyStoreError

SECRET_PREFIX = "qk-"  # client keys
ADMIN_PREFIX = "qa-"  # admin keys made by `qtrap-proxy keys admin` (any string of 32+ characters will do)
SECRET_BYTES = 32
KEY_ID = re.compile(r"key_[0-9a-f]{12}")
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_POOLS = 256  # pools in one key's allow-list
MAX_POOL_CHARS = 256
_DURATION = re.compile(r"([0-9]{1,6})([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

State = Literal["active", "expired", "revoked"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
  id TEXT PRIMARY KEY,
  sha256 TEXT NOT NULL UNIQUE,
  name TEXT,
  pools TEXT NOT NULL,
  created_unix_s REAL NOT NULL,
  expires_unix_s REAL,
  revoked_unix_s REAL
);
"""
_COLUMNS = "id, sha256, name, pools, created_unix_s, expires_unix_s, revoked_unix_s"


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A client key as stored (never its secret)."""

    id: str
    name: str | None
    pools: tuple[str, ...]  # empty: every pool
    created_unix_s: float
    expires_unix_s: float | None = None
    revoked_unix_s: float | None = None

    @property
    def label(self) -> str:
        """The key's metric label: its name, else its id."""
        return self.name or self.id

    def state(self, now_unix_s: float) -> State:
        if self.revoked_unix_s is not None:
            return "revoked"
        if self.expires_unix_s is not None and now_unix_s >= self.expires_unix_s:
            return "expired"
        return "active"

    def allows(self, pool: str) -> bool:
        return not self.pools or pool in self.pools

    def public(self, now_unix_s: float | None = None) -> dict[str, Any]:
        """What the admin API and ``keys list`` show of a key."""
        return {
            "id": self.id,
            "name": self.name,
            "pools": list(self.pools),
            "created_unix_s": self.created_unix_s,
            "expires_unix_s": self.expires_unix_s,
            "revoked_unix_s": self.revoked_unix_s,
            "state": self.state(time.time() if now_unix_s is None else now_unix_s),
        }


def hash_secret(secret: str) -> str:
    """The stored form of a secret: SHA-256 of its UTF-8 bytes, hex."""
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def new_secret(prefix: str = SECRET_PREFIX) -> str:
    """A new secret: the prefix (so that a leaked one can be recognised) and 256 random bits."""
    return prefix + secrets.token_urlsafe(SECRET_BYTES)


def new_key_id() -> str:
    return "key_" + secrets.token_hex(6)


def check_key_id(value: str) -> str:
    if isinstance(value, str) and KEY_ID.fullmatch(value):
        return value
    raise KeyStoreError(f"a key id is 'key_' and 12 lower-case hex digits, got {_show(value)}")


def check_name(value: str) -> str:
    if isinstance(value, str) and NAME.fullmatch(value):
        return value
    raise KeyStoreError(f"a key name is 1 to 64 characters of A-Z a-z 0-9 _ . -, got {_show(value)}")


def check_pools(pools: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    for p in pools:
        if not p or len(p) > MAX_POOL_CHARS or not p.isprintable() or "@" in p or "," in p:
            raise KeyStoreError(
                f"a pool is 1 to {MAX_POOL_CHARS} printable characters without '@' or ',', got {_show(p)}"
            )
        if p not in out:
            out.append(p)
    if len(out) > MAX_POOLS:
        raise KeyStoreError(f"a key may list at most {MAX_POOLS} pools, got {len(out)}")
    return tuple(out)


def parse_expiry(text: str, now_unix_s: float | None = None) -> float:
    """``30d``, ``12h``, ``90m``, ``2w``, ``3600s`` from now, or an ISO 8601 date or time (UTC unless it
    says otherwise); it must lie in the future."""
    now = time.time() if now_unix_s is None else now_unix_s
    m = _DURATION.fullmatch(text.strip())
    if m is not None:
        seconds = int(m.group(1)) * _UNIT_S[m.group(2)]
        if seconds <= 0:
            raise KeyStoreError(f"expiry {_show(text)} is not in the future")
        return now + seconds
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise KeyStoreError(
            f"expiry must be a duration (30d, 12h, 90m, 2w, 3600s) or an ISO 8601 date, got {_show(text)}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    at = when.timestamp()
    if at <= now:
        raise KeyStoreError(f"expiry {_show(text)} is not in the future")
    return at


class KeyStore:
    """The key table of one SQLite file; every method is one short transaction."""

    def __init__(self, path: str, *, create: bool = True) -> None:
        self.path = path
        p = Path(path)
        if not p.exists():
            if not create:
                raise KeyStoreError(f"no key store at {path} (`qtrap-proxy keys create` makes one)")
            try:
                p.parent.mkdir(parents=True, exist_ok=True)
                os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o600))  # owner only, before SQLite opens it
            except OSError as e:
                raise KeyStoreError(f"cannot create key store {path}: {e.strerror or e}") from e
        try:
            self._conn = sqlite3.connect(path, timeout=5.0, check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.executescript(_SCHEMA)
        except sqlite3.Error as e:
            raise KeyStoreError(f"cannot open key store {path}: {e}") from e

    def close(self) -> None:
        self._conn.close()

    def create(
        self, name: str | None = None, pools: Iterable[str] = (), expires_unix_s: float | None = None
    ) -> tuple[ApiKey, str]:
        """A new key and its secret (the only time the secret exists outside the client)."""
        key = ApiKey(
            id=new_key_id(),
            name=None if name is None else check_name(name),
            pools=check_pools(pools),
            created_unix_s=time.time(),
            expires_unix_s=expires_unix_s,
        )
        secret = new_secret()
        try:
            with self._conn:
                self._conn.execute(
                    f"INSERT INTO keys ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        key.id,
                        hash_secret(secret),
                        key.name,
                        json.dumps(list(key.pools)),
                        key.created_unix_s,
                        key.expires_unix_s,
                        None,
                    ),
                )
        except sqlite3.Error as e:
            raise KeyStoreError(f"cannot write key store {self.path}: {e}") from e
        return key, secret

    def revoke(self, key_id: str) -> tuple[ApiKey, bool]:
        """Revoke a key; returns it and whether this call revoked it (False: it already was)."""
        check_key_id(key_id)
        try:
            with self._conn:
                cur = self._conn.execute(
                    "UPDATE keys SET revoked_unix_s = ? WHERE id = ? AND revoked_unix_s IS NULL",
                    (time.time(), key_id),
                )
                changed = cur.rowcount == 1
        except sqlite3.Error as e:
            raise KeyStoreError(f"cannot write key store {self.path}: {e}") from e
        key = self.get(key_id)
        if key is None:
            raise KeyStoreError(f"no key {key_id} in {self.path}")
        return key, changed

    def get(self, key_id: str) -> ApiKey | None:
        rows = self._select("WHERE id = ?", (key_id,))
        return rows[0][1] if rows else None

    def all_keys(self) -> list[ApiKey]:
        """Every key, oldest first."""
        return [k for _, k in self._select("ORDER BY created_unix_s, id", ())]

    def version(self) -> int:
        """A number that changes when another connection (the CLI) has changed the store since."""
        try:
            return int(self._conn.execute("PRAGMA data_version").fetchone()[0])
        except sqlite3.Error as e:
            raise KeyStoreError(f"cannot read key store {self.path}: {e}") from e

    def by_hash(self) -> dict[str, ApiKey]:
        """Every key by the SHA-256 of its secret (what a proxy looks secrets up in)."""
        return dict(self._select("", ()))

    def _select(self, where: str, params: tuple[Any, ...]) -> list[tuple[str, ApiKey]]:
        try:
            rows = self._conn.execute(f"SELECT {_COLUMNS} FROM keys {where}", params).fetchall()
        except sqlite3.Error as e:
            raise KeyStoreError(f"cannot read key store {self.path}: {e}") from e
        out = []
        for kid, digest, name, pools, created, expires, revoked in rows:
            try:
                key = ApiKey(kid, name, tuple(json.loads(pools)), created, expires, revoked)
            except (TypeError, ValueError) as e:
                raise KeyStoreError(f"key store {self.path}: key {_show(kid)} is malformed: {e}") from e
            out.append((digest, key))
        return out


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
