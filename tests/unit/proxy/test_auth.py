from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import pytest

from qtrap_proxy.auth import ADMIN, AuthGate, KeyRing, Principal, Role, admin_digest, bearer, role_of
from qtrap_proxy.config import AuthConfig
from qtrap_proxy.errors import ConfigError, Forbidden, Unauthorized
from qtrap_proxy.keystore import KeyStore

SERVING = ("/v1/chat/completions", "/v1/completions", "/generate", "/generate_stream", "/")
ADMIN_KEY = "qa-" + "z" * 40


@pytest.mark.parametrize(
    ("method", "path", "protect", "role"),
    [
        ("GET", "/health", True, Role.OPEN),
        ("GET", "/openapi.json", True, Role.OPEN),
        ("GET", "/metrics", False, Role.OPEN),
        ("GET", "/metrics", True, Role.ADMIN),
        ("POST", "/v1/chat/completions", False, Role.CLIENT),
        ("POST", "/generate_stream", False, Role.CLIENT),
        ("POST", "/", False, Role.CLIENT),
        ("GET", "/", False, Role.ANY),  # not the TGI route: an unknown path, still behind a key
        ("GET", "/v1/models", False, Role.ANY),
        ("GET", "/nowhere", False, Role.ANY),
        ("GET", "/qtrap/v1/requests/abc", False, Role.ANY),
        ("GET", "/qtrap/v1/requests", False, Role.ANY),  # the records query: limited to the key's own
        ("GET", "/qtrap/v1/usage", False, Role.ANY),
        ("GET", "/qtrap/v1/usage/x", False, Role.ADMIN),
        ("GET", "/qtrap/v1/chains/c-1", False, Role.ANY),
        ("POST", "/qtrap/v1/chains/c-1/score", False, Role.ANY),
        ("GET", "/qtrap/v1/keys/key_0123456789ab/usage", False, Role.ANY),
        ("GET", "/qtrap/v1/energy", False, Role.ADMIN),
        ("GET", "/qtrap/v1/keys", False, Role.ADMIN),
        ("GET", "/qtrap/v1/requests/a/b", False, Role.ADMIN),
        ("GET", "/qtrap/v2/anything", False, Role.ADMIN),
    ],
)
def test_every_path_needs_a_role(method: str, path: str, protect: bool, role: Role) -> None:
    assert role_of(path, method, SERVING, protect) is role


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_the_admin_key_comes_from_the_environment_or_its_digest() -> None:
    want = hashlib.sha256(ADMIN_KEY.encode()).digest()
    assert admin_digest(AuthConfig(enabled=True), {"QTRAP_ADMIN_KEY": ADMIN_KEY}) == want
    assert admin_digest(AuthConfig(enabled=True, admin_key_env="MY_KEY"), {"MY_KEY": ADMIN_KEY}) == want
    assert admin_digest(AuthConfig(enabled=True, admin_key_sha256=_sha(ADMIN_KEY).upper()), {}) == want
    both = AuthConfig(enabled=True, admin_key_sha256=_sha(ADMIN_KEY))
    assert admin_digest(both, {"QTRAP_ADMIN_KEY": ADMIN_KEY}) == want
    with pytest.raises(ConfigError, match="does not match"):
        admin_digest(both, {"QTRAP_ADMIN_KEY": ADMIN_KEY + "x"})
    with pytest.raises(ConfigError, match=r"no admin key; set \$QTRAP_ADMIN_KEY or auth.admin_key_sha256"):
        admin_digest(AuthConfig(enabled=True), {})
    with pytest.raises(ConfigError, match="at least 32"):
        admin_digest(AuthConfig(enabled=True), {"QTRAP_ADMIN_KEY": "short"})


def test_bearer_tokens() -> None:
    def scope(*headers: tuple[bytes, bytes]) -> dict[str, Any]:
        return {"headers": list(headers)}

    assert bearer(scope((b"authorization", b"Bearer qk-1"))) == "qk-1"
    assert bearer(scope((b"authorization", b"bearer   qk-1  "))) == "qk-1"
    assert bearer(scope((b"authorization", b"Basic qk-1"))) is None
    assert bearer(scope((b"authorization", b"Bearer"))) is None
    assert bearer(scope((b"x-api-key", b"qk-1"))) is None
    assert bearer(scope()) is None


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_the_key_ring_sees_new_and_revoked_keys_after_refresh_s(tmp_path: Path) -> None:
    store = KeyStore(str(tmp_path / "k.sqlite"))
    cli = KeyStore(str(tmp_path / "k.sqlite"))  # another process's connection, as the CLI's
    a, a_secret = store.create("a")
    clock = Clock()
    ring = KeyRing(store, refresh_s=5.0, clock=clock)
    b, b_secret = cli.create("b")
    cli.revoke(a.id)
    clock.t = 4.9
    assert ring.lookup(b_secret) is None and ring.lookup(a_secret) == a  # not read again yet
    clock.t = 5.0
    assert ring.lookup(b_secret) == b
    looked_up = ring.lookup(a_secret)
    assert looked_up is not None and looked_up.state(time.time()) == "revoked"
    assert ring.get(b.id) == b and [k.id for k in ring.all_keys()] == [a.id, b.id]


def test_a_key_ring_keeps_the_keys_it_has_while_the_store_cannot_be_read(tmp_path: Path) -> None:
    store = KeyStore(str(tmp_path / "k.sqlite"))
    a, a_secret = store.create("a")
    clock = Clock()
    ring = KeyRing(store, refresh_s=1.0, clock=clock)
    store.close()  # every read fails from now on
    clock.t = 2.0
    assert ring.lookup(a_secret) == a and ring.reload_errors == 1


def _gate(tmp_path: Path) -> tuple[AuthGate, dict[str, str]]:
    store = KeyStore(str(tmp_path / "k.sqlite"))
    _, ok = store.create("ok")
    gone, revoked = store.create("gone")
    store.revoke(gone.id)
    _, expired = store.create("old", expires_unix_s=time.time() - 1)
    ring = KeyRing(store, refresh_s=60)
    digest = hashlib.sha256(ADMIN_KEY.encode()).digest()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("not reached")

    gate = AuthGate(app, AuthConfig(enabled=True), ring, digest, SERVING)
    return gate, {"ok": ok, "revoked": revoked, "expired": expired}


def test_who_may_do_what(tmp_path: Path) -> None:
    gate, secrets = _gate(tmp_path)
    client = gate.authenticate(secrets["ok"], Role.CLIENT)
    assert isinstance(client, Principal) and not client.admin and client.key_id is not None
    assert gate.authenticate(secrets["ok"], Role.ANY) == client
    assert (
        gate.authenticate(ADMIN_KEY, Role.ADMIN) is ADMIN and gate.authenticate(ADMIN_KEY, Role.ANY) is ADMIN
    )
    with pytest.raises(Forbidden, match="admin key is for"):
        gate.authenticate(ADMIN_KEY, Role.CLIENT)
    with pytest.raises(Forbidden, match="needs the admin key"):
        gate.authenticate(secrets["ok"], Role.ADMIN)
    with pytest.raises(Unauthorized, match="revoked") as e:
        gate.authenticate(secrets["revoked"], Role.CLIENT)
    assert e.value.status == 401 and e.value.code == "revoked_api_key"
    with pytest.raises(Unauthorized, match="expired"):
        gate.authenticate(secrets["expired"], Role.ANY)
    for bad in (None, "qk-nope", ADMIN_KEY[:-1], "x" * 10_000):
        with pytest.raises(Unauthorized):
            gate.authenticate(bad, Role.ANY)
    assert (
        client.may_see(client.key_id) and not client.may_see("key_000000000000") and not client.may_see(None)
    )
    assert ADMIN.may_see(None) and ADMIN.may_use("any")


def test_the_key_ring_reads_the_keys_again_only_when_the_store_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = KeyStore(str(tmp_path / "k.sqlite"))
    _, secret = store.create("a")
    clock = Clock()
    ring = KeyRing(store, refresh_s=1.0, clock=clock)
    reads = 0
    real = store.by_hash

    def counted() -> dict[str, Any]:
        nonlocal reads
        reads += 1
        return real()

    monkeypatch.setattr(store, "by_hash", counted)
    for t in range(1, 6):
        clock.t = float(t)
        assert ring.lookup(secret) is not None
    assert reads == 0
    KeyStore(str(tmp_path / "k.sqlite")).create("b")
    clock.t = 10.0
    ring.lookup(secret)
    assert reads == 1
