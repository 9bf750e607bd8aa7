"""Upstream backends: a configured backend and the transport to it (``qtrap_proxy/transport.py``).

Which HTTP client carries the requests is the transport's business; here a backend
builds its requests' headers, sends them, and probes its health.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from qtrap_common import wire
from qtrap_proxy.config import BackendConfig
from qtrap_proxy.errors import UpstreamError, UpstreamTimeout
from qtrap_proxy.metrics import BackendMetrics
from qtrap_proxy.transport import Transport, UpstreamResponse, make_transport


@dataclass(slots=True)
class Health:
    ok: bool
    status: int | None
    latency_s: float | None
    error: str | None


class Backend:
    """A configured backend and its transport (connection pool)."""

    def __init__(self, cfg: BackendConfig, transport: Transport | None = None) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.pool = cfg.pool
        self.precision = cfg.precision
        self.kind = cfg.kind
        self.transport = make_transport(cfg) if transport is None else transport
        self.metrics: BackendMetrics  # bound by the Proxy that owns this backend
        # routing state (qtrap_proxy/cost.py), kept as plain values: read on every cost decision
        self.inflight = 0  # requests in flight (Proxy.begin/end)
        self.probe_ok = True  # the last health probe's verdict (probes.py)
        self.down_until = 0.0  # monotonic: unreachable until then (a request failed to connect)
        self._headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        if cfg.api_key is not None:
            self._headers["Authorization"] = f"Bearer {cfg.api_key.get_secret_value()}"

    async def close(self) -> None:
        await self.transport.aclose()

    def headers(
        self,
        request_id: str,
        client_auth: str | None,
        traceparent: str | None = None,
        tracestate: str | None = None,
        forwarded: list[tuple[str, str]] | None = None,
    ) -> dict[str, str]:
        h = dict(self._headers)
        if forwarded:  # the client's headers of server.forward_headers: never over the proxy's own
            for name, value in forwarded:
                h.setdefault(name, value)
        h[wire.REQUEST_ID] = request_id
        if traceparent is not None:
            h[wire.TRACEPARENT] = traceparent
            if tracestate is not None:
                h[wire.TRACESTATE] = tracestate
        if client_auth is not None and "Authorization" not in h:
            h["Authorization"] = client_auth
        return h

    def post(
        self,
        path: str,
        body: bytes,
        request_id: str,
        client_auth: str | None,
        traceparent: str | None = None,
        tracestate: str | None = None,
        forwarded: list[tuple[str, str]] | None = None,
    ) -> AbstractAsyncContextManager[UpstreamResponse]:
        """POST to the backend: the answer, once its head has arrived (see ``Transport.request``).

        Raises UpstreamConnectError or UpstreamTimeout before the head, UpstreamTimeout or UpstreamBroken
        while the body is read."""
        return self.transport.request(
            "POST", path, self.headers(request_id, client_auth, traceparent, tracestate, forwarded), body
        )

    async def get_json(self, path: str, timeout_s: float) -> tuple[int | None, Any, str | None]:
        """``GET path`` on the backend: (HTTP status, the JSON body or None, an error in words or None)."""
        try:
            async with asyncio.timeout(timeout_s):
                async with self.transport.request("GET", path, self.headers("info", None)) as resp:
                    raw = await resp.read()
        except (TimeoutError, UpstreamTimeout):
            return None, None, f"no answer within {timeout_s:g} s"
        except UpstreamError as e:
            return None, None, e.reason
        try:
            return resp.status, json.loads(raw), None
        except (ValueError, UnicodeDecodeError):
            return resp.status, None, f"HTTP {resp.status}: not JSON"

    async def probe(self, timeout_s: float) -> Health:
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(timeout_s):
                async with self.transport.request(
                    "GET", self.cfg.effective_health_path, self.headers("health", None)
                ) as resp:
                    await resp.read()
                    ok = resp.status == 200
                    return Health(
                        ok, resp.status, time.monotonic() - t0, None if ok else f"HTTP {resp.status}"
                    )
        except (TimeoutError, UpstreamTimeout):
            return Health(False, None, None, f"no answer within {timeout_s:g} s")
        except UpstreamError as e:
            return Health(False, None, None, e.reason)
