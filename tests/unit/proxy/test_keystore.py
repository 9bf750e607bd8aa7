from __future__ import annotations

import datetime as dt
import hashlib
import os
import sqlite3
import stat
from pathlib import Path

import pytest

from qtrap_proxy.errors import KeyStoreError
from qtrap_proxy.keystore import (
    KEY_ID,
    KeyStore,
    check_key_id,
    check_name,
    check_pools,
    hash_secret,
    parse_expiry,
)


def test_a_key_is_stored_as_the_sha256_of_its_secret_and_never_in_clear(tmp_path: Path) -> None:
    path = tmp_path / "keys.sqlite"
    store = KeyStore(str(path))
    key, secret = store.create("ci", pools=["p", "q", "p"], expires_unix_s=None)
    store.close()
    assert secret.startswith("qk-") and len(secret) >= 3 + 43  # 32 random bytes, URL-safe base64
    assert KEY_ID.fullmatch(key.id) and key.pools == ("p", "q") and key.name == "ci"
    rows = sqlite3.connect(path).execute("SELECT id, sha256 FROM keys").fetchall()
    assert rows == [(key.id, hashlib.sha256(secret.encode()).hexdigest())]
    for f in tmp_path.iterdir():  # the database and its WAL: no secret anywhere
        assert secret.encode() not in f.read_bytes()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_secrets_and_ids_are_random(tmp_path: Path) -> None:
    store = KeyStore(str(tmp_path / "k.sqlite"))
    made = [store.create() for _ in range(20)]
    assert len({k.id for k, _ in made}) == 20 and len({s for _, s in made}) == 20
    assert {k.id for k in store.all_keys()} == {k.id for k, _ in made}


def test_lookup_by_hash_list_revoke_and_state(tmp_path: Path) -> None:
    store = KeyStore(str(tmp_path / "k.sqlite"))
    a, a_secret = store.create("a")
    b, _ = store.create("b", expires_unix_s=1_000.0)
    assert store.by_hash()[hash_secret(a_secret)] == a
    assert [k.id for k in store.all_keys()] == [a.id, b.id]
    assert a.state(2_000.0) == "active" and b.state(999.0) == "active" and b.state(1_000.0) == "expired"
    revoked, changed = store.revoke(a.id)
    assert changed and revoked.revoked_unix_s is not None and revoked.state(0.0) == "revoked"
    again, changed = store.revoke(a.id)
    assert not changed and again.revoked_unix_s == revoked.revoked_unix_s
    with pytest.raises(KeyStoreError, match="no key key_000000000000"):
        store.revoke("key_000000000000")
    with pytest.raises(KeyStoreError, match="key id"):
        store.revoke("key_' OR 1=1 --")
    # a second connection (the CLI beside a running proxy) sees the change
    assert KeyStore(str(tmp_path / "k.sqlite"), create=False).get(a.id) == revoked


def test_a_key_allows_its_pools_or_every_pool(tmp_path: Path) -> None:
    store = KeyStore(str(tmp_path / "k.sqlite"))
    limited = store.create(pools=["p"])[0]
    assert limited.allows("p") and not limited.allows("q")
    assert store.create()[0].allows("anything")


def test_a_missing_store_is_an_error_unless_created(tmp_path: Path) -> None:
    with pytest.raises(KeyStoreError, match="no key store"):
        KeyStore(str(tmp_path / "none.sqlite"), create=False)
    KeyStore(str(tmp_path / "sub" / "dir" / "k.sqlite"))  # parents made
    (tmp_path / "junk.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(KeyStoreError, match="cannot open key store"):
        KeyStore(str(tmp_path / "junk.sqlite"))


@pytest.mark.parametrize("name", ["a", "ci-runner_2.0", "x" * 64])
def test_good_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "x" * 65, "a b", 'a"b', "é", "a\nb", "{a}"])
def test_bad_names(name: str) -> None:
    with pytest.raises(KeyStoreError, match="key name"):
        check_name(name)


def test_key_ids_and_pools_are_checked() -> None:
    assert check_key_id("key_0123456789ab") == "key_0123456789ab"
    for bad in ("key_0123456789AB", "key_0123456789abc", "0123456789ab", ""):
        with pytest.raises(KeyStoreError):
            check_key_id(bad)
    assert check_pools(["a", "b", "a"]) == ("a", "b")
    for bad in ("", "p@int4", "a,b", "x" * 257, "a\tb"):
        with pytest.raises(KeyStoreError, match="pool"):
            check_pools([bad])


def test_expiry_durations_and_dates() -> None:
    now = 1_800_000_000.0
    assert parse_expiry("30d", now) == now + 30 * 86400
    assert parse_expiry("12h", now) == now + 12 * 3600
    assert parse_expiry("90m", now) == now + 90 * 60
    assert parse_expiry("2w", now) == now + 14 * 86400
    assert parse_expiry("3600s", now) == now + 3600
    assert parse_expiry("2030-01-01", now) == dt.datetime(2030, 1, 1, tzinfo=dt.UTC).timestamp()
    assert (
        parse_expiry("2030-01-01T12:00:00+02:00", now)
        == dt.datetime(2030, 1, 1, 10, tzinfo=dt.UTC).timestamp()
    )
    for bad in ("0d", "2020-01-01", "soon", "30 days", "-1d", "1y", "9999999d"):
        with pytest.raises(KeyStoreError, match="expiry"):
            parse_expiry(bad, now)
