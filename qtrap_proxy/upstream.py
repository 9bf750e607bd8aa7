"""Upstream backends: one pooled aiohttp session per backend.

aiohttp was chosen over httpx for the upstream leg because its connection pool
costs less per request at high concurrency (see docs/benchmarks.md for the
proxy-overhead figures measured with it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp

from qtrap_common import wire
from qtrap_proxy.config import BackendConfig
from qtrap_proxy.errors import UpstreamConnectError, UpstreamTimeout
from qtrap_proxy.metrics import BackendMetrics
from qtrap_proxy.redact import redact_urls_in, scrub_addresses

log = logging.getLogger("qtrap.upstream")


@dataclass(slots=True)
class Health:
    ok: bool
    status: int | None
    latency_s: float | None
    error: str | None


class Backend:
    """A configured backend and its connection pool."""

    def __init__(self, cfg: BackendConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.pool = cfg.pool
        self.precision = cfg.precision
        self.kind = cfg.kind
        self._session: aiohttp.ClientSession | None = None
        self.metrics: BackendMetrics  # bound by the Proxy that owns this backend
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=cfg.timeouts.connect_s, sock_read=cfg.timeouts.read_s
        )
        self._headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        if cfg.api_key is not None:
            self._headers["Authorization"] = f"Bearer {cfg.api_key.get_secret_value()}"

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self.cfg.max_connections, limit_per_host=0, ttl_dns_cache=300, keepalive_timeout=60
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def headers(self, request_id: str, client_auth: str | None) -> dict[str, str]:
        h = dict(self._headers)
        h[wire.REQUEST_ID] = request_id
        if client_auth is not None and "Authorization" not in h:
            h["Authorization"] = client_auth
        return h

    @asynccontextmanager
    async def post(
        self, path: str, body: bytes, request_id: str, client_auth: str | None
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """POST to the backend; connection problems before a response become Upstream* errors."""
        try:
            resp = await self.session.post(
                self.cfg.url + path, data=body, headers=self.headers(request_id, client_auth)
            )
        except (TimeoutError, aiohttp.ServerTimeoutError) as e:
            raise UpstreamTimeout(f"backend {self.name} did not answer in time", backend=self.name) from e
        except aiohttp.ClientError as e:
            log.warning("backend %s (%s) is unreachable: %s", self.name, self.cfg.display_url,
                        redact_urls_in(_describe(e)))  # fmt: skip
            raise UpstreamConnectError(
                f"backend {self.name} is unreachable: {self._public(_describe(e))}", backend=self.name
            ) from e
        try:
            yield resp
        except BaseException:
            resp.close()  # drop the connection: the backend sees the abort and stops generating
            raise
        else:
            resp.release()

    async def probe(self, timeout_s: float) -> Health:
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(timeout_s):
                async with self.session.get(
                    self.cfg.url + self.cfg.effective_health_path, headers=self.headers("health", None)
                ) as resp:
                    await resp.read()
                    ok = resp.status == 200
                    return Health(
                        ok, resp.status, time.monotonic() - t0, None if ok else f"HTTP {resp.status}"
                    )
        except TimeoutError:
            return Health(False, None, None, f"no answer within {timeout_s:g} s")
        except aiohttp.ClientError as e:
            return Health(False, None, None, self._public(_describe(e)))

    def _public(self, reason: str) -> str:
        """A reason as clients and /health may see it (qtrap_proxy/redact.py)."""
        return redact_urls_in(reason) if self.cfg.expose_address else scrub_addresses(reason)


def _describe(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
