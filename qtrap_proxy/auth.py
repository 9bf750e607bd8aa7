"""Who may call what (``auth.enabled``): client keys on the serving routes, the admin key on ``/qtrap/v1/*``.

:class:`AuthGate` sits in front of every route (inside the Guard, so the header and body limits come
first) and maps each request's path to the role it needs (:func:`role_of`):

* open: ``GET /health`` (and ``/health/live``, ``/health/ready``), ``GET /openapi.json`` (the routes' description, no data), and ``GET /metrics`` unless ``auth.protect_metrics``;
* client: the relay routes (``POST /v1/chat/completions``, ``/v1/completions``, TGI's ``/generate``,
  ``/generate_stream``, ``/``) take a client key only; the admin key is refused there (403), so that
  the one secret that reads everything is not spread into client applications;
* owned: ``/qtrap/v1/requests/{id}``, ``/qtrap/v1/chains/{id}``, ``/qtrap/v1/chains/{id}/score``,
  ``/qtrap/v1/keys/{id}/usage``, the records query ``/qtrap/v1/requests`` and the usage sums
  ``/qtrap/v1/usage`` take the admin key or a client key, which the handler limits to what the key owns
  (404 for another key's records, so ids cannot be probed; the query and the sums are limited to the
  key's own records, and their ``key=`` filter naming another key is a 403);
* admin: everything else under ``/qtrap/`` (the energy report, the key list), and ``/metrics`` when
  protected;
* any key: every other path (``GET /v1/models``, shown with the key's pools only; unknown paths).

A key is sent as ``Authorization: Bearer <key>``. Missing, unknown, expired or revoked: 401 with
``WWW-Authenticate: Bearer``; a valid key on a route its role does not allow: 403. Both in OpenAI's
error shape (TGI's shape on TGI's routes, as their other errors), counted in
``qtrap_refused_requests_total{reason=unauthorized|forbidden}``. A key outside its pools' allow-list
is refused by the relay (403, with a record and its key id) once the pool is resolved.

The admin key is compared in constant time (SHA-256 digests with ``hmac.compare_digest``); client
secrets are looked up by their SHA-256 (keystore.py). The request then goes on without its
``Authorization`` header, so no route, log or backend sees the client's secret; the checked
:class:`Principal` is in the scope (:func:`principal_of`).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import os
import re
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from starlette.types import ASGIApp

from qtrap_common.asgi import Receive, Scope, Send
from qtrap_proxy.config import AuthConfig
from qtrap_proxy.errors import ConfigError, Forbidden, KeyStoreError, QtrapError, Unauthorized
from qtrap_proxy.keystore import ApiKey, KeyStore, hash_secret

log = logging.getLogger("qtrap.auth")

SCOPE_PRINCIPAL = "qtrap.principal"
MIN_ADMIN_KEY_CHARS = 32
MAX_TOKEN_CHARS = 512  # longer bearer tokens are no key of ours: refused without hashing them

_AUTHORIZATION = b"authorization"
_JSON = (b"content-type", b"application/json")
_OWNED = re.compile(r"/qtrap/v1/(?:requests(?:/[^/]+)?|usage|chains/[^/]+(?:/score)?|keys/[^/]+/usage)")


class Role(enum.Enum):
    OPEN = "open"
    CLIENT = "client"  # a client key
    ANY = "any"  # a client key or the admin key (owned routes limit a client key to what it owns)
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request is from: a client key, or the admin (``key`` None)."""

    key: ApiKey | None

    @property
    def admin(self) -> bool:
        return self.key is None

    @property
    def key_id(self) -> str | None:
        return None if self.key is None else self.key.id

    def may_use(self, pool: str) -> bool:
        return self.key is None or self.key.allows(pool)

    def may_see(self, key_id: str | None) -> bool:
        """Whether this principal may read what the key ``key_id`` did (admin: everything)."""
        return self.key is None or key_id == self.key.id


ADMIN = Principal(None)


def principal_of(scope: Scope) -> Principal | None:
    """The request's checked principal; None when auth is off."""
    p = scope.get(SCOPE_PRINCIPAL)
    return p if isinstance(p, Principal) else None


def role_of(path: str, method: str, serving: Collection[str], protect_metrics: bool) -> Role:
    if path in ("/health", "/health/live", "/health/ready", "/openapi.json"):
        return Role.OPEN
    if path == "/metrics":
        return Role.ADMIN if protect_metrics else Role.OPEN
    if method == "POST" and path in serving:
        return Role.CLIENT
    if path.startswith("/qtrap/"):
        return Role.ANY if _OWNED.fullmatch(path) else Role.ADMIN
    return Role.ANY


def admin_digest(cfg: AuthConfig, environ: Mapping[str, str] | None = None) -> bytes:
    """The admin key's SHA-256: from ``auth.admin_key_sha256`` and/or the variable ``auth.admin_key_env``
    (both given: they must agree). ConfigError when neither is set or the key is too short."""
    env = os.environ if environ is None else environ
    value = env.get(cfg.admin_key_env)
    from_env: bytes | None = None
    if value:
        if len(value) < MIN_ADMIN_KEY_CHARS:
            raise ConfigError(
                f"auth: the admin key in ${cfg.admin_key_env} has {len(value)} characters; at least "
                f"{MIN_ADMIN_KEY_CHARS} are needed (`qtrap-proxy keys admin` prints a random one)"
            )
        from_env = hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()
    from_cfg = None if cfg.admin_key_sha256 is None else bytes.fromhex(cfg.admin_key_sha256)
    if from_env is not None and from_cfg is not None and not hmac.compare_digest(from_env, from_cfg):
        raise ConfigError(f"auth: the admin key in ${cfg.admin_key_env} does not match auth.admin_key_sha256")
    digest = from_env or from_cfg
    if digest is None:
        raise ConfigError(
            f"auth.enabled: no admin key; set ${cfg.admin_key_env} or auth.admin_key_sha256 "
            "(`qtrap-proxy keys admin` prints a random key and its digest)"
        )
    return digest


class KeyRing:
    """The key store's keys by secret digest. Every ``refresh_s`` (on the next request after that) the
    store is asked whether it changed (SQLite's ``data_version``, microseconds) and only then read again
    (about 3 ms per 1,000 keys on the 2-core development machine), so a key created or revoked with the
    CLI counts within ``refresh_s``. A store that cannot be read keeps the last keys read (logged);
    expiry is checked at every request."""

    def __init__(
        self, store: KeyStore, refresh_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.store = store
        self.refresh_s = refresh_s
        self._clock = clock
        self._version = store.version()
        self._by_hash = store.by_hash()  # raises at start-up: a proxy that cannot read its keys won't start
        self._by_id = {k.id: k for k in self._by_hash.values()}
        self._loaded = clock()
        self.reload_errors = 0

    def _fresh(self) -> None:
        now = self._clock()
        if now - self._loaded < self.refresh_s:
            return
        self._loaded = now
        try:
            version = self.store.version()
            if version == self._version:
                return
            by_hash = self.store.by_hash()
            self._version = version
        except KeyStoreError as e:
            self.reload_errors += 1
            log.error("keeping the keys read before: %s", e)
            return
        self._by_hash = by_hash
        self._by_id = {k.id: k for k in by_hash.values()}

    def lookup(self, secret: str) -> ApiKey | None:
        self._fresh()
        return self._by_hash.get(hash_secret(secret))

    def get(self, key_id: str) -> ApiKey | None:
        self._fresh()
        return self._by_id.get(key_id)

    def all_keys(self) -> list[ApiKey]:
        self._fresh()
        return sorted(self._by_id.values(), key=lambda k: (k.created_unix_s, k.id))


def bearer(scope: Scope) -> str | None:
    """The token of the first ``Authorization: Bearer <token>`` header, or None."""
    for name, value in scope["headers"]:
        if name == _AUTHORIZATION:
            text: str = value.decode("latin-1")
            scheme, _, token = text.strip().partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                return None
            return token
    return None


class AuthGate:
    """ASGI middleware: the key a path needs (:func:`role_of`), checked before any route runs."""

    def __init__(
        self,
        app: ASGIApp,
        cfg: AuthConfig,
        ring: KeyRing,
        admin_sha256: bytes,
        serving: Collection[str],
        tgi_paths: Collection[str] = (),
        on_refuse: Callable[[str], None] | None = None,
    ) -> None:
        self.app = app
        self.ring = ring
        self.admin_sha256 = admin_sha256
        self.protect_metrics = cfg.protect_metrics
        self.serving = frozenset(serving)
        self.tgi_paths = frozenset(tgi_paths)
        self.on_refuse = on_refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        role = role_of(path, scope["method"], self.serving, self.protect_metrics)
        if role is Role.OPEN:
            await self.app(scope, receive, send)
            return
        try:
            who = self.authenticate(bearer(scope), role)
        except QtrapError as e:
            if self.on_refuse is not None:
                self.on_refuse(e.label)
            await self._refuse(send, e, tgi=scope["method"] == "POST" and path in self.tgi_paths)
            return
        headers = [(k, v) for k, v in scope["headers"] if k != _AUTHORIZATION]
        await self.app({**scope, "headers": headers, SCOPE_PRINCIPAL: who}, receive, send)

    def authenticate(self, token: str | None, role: Role) -> Principal:
        """The principal of a bearer token, allowed ``role``; Unauthorized (401) or Forbidden (403)."""
        if token is None:
            raise Unauthorized(
                "this route needs an API key: send the header 'Authorization: Bearer <key>'",
                code="missing_api_key",
            )
        if len(token) > MAX_TOKEN_CHARS:
            raise Unauthorized("invalid API key")
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        if hmac.compare_digest(digest, self.admin_sha256):
            if role is Role.CLIENT:
                raise Forbidden("the admin key is for /qtrap/v1/*; serving routes take a client key")
            return ADMIN
        key = self.ring.lookup(token)
        if key is None:
            raise Unauthorized("invalid API key")
        state = key.state(time.time())
        if state == "revoked":
            raise Unauthorized(f"API key {key.id} has been revoked", code="revoked_api_key")
        if state == "expired":
            raise Unauthorized(f"API key {key.id} has expired", code="expired_api_key")
        if role is Role.ADMIN:
            raise Forbidden("this route needs the admin key")
        return Principal(key)

    @staticmethod
    async def _refuse(send: Send, e: QtrapError, *, tgi: bool) -> None:
        body = e.tgi_body() if tgi else e.openai_body()
        headers = [_JSON, (b"content-length", str(len(body)).encode())]
        if e.status == 401:
            error = "" if e.code == "missing_api_key" else ', error="invalid_token"'
            headers.append((b"www-authenticate", f'Bearer realm="qtrap"{error}'.encode()))
        await send({"type": "http.response.start", "status": e.status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
