"""The proxy's shared state: backends, router, metrics and the recent request records."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any

from prometheus_client import CollectorRegistry

from qtrap_proxy.config import ProxyConfig
from qtrap_proxy.metrics import Metrics
from qtrap_proxy.routing import Router, RoutingPolicy
from qtrap_proxy.timeline import Timeline
from qtrap_proxy.upstream import Backend, Health

log = logging.getLogger("qtrap.proxy")

# Response headers every relayed answer carries.
H_REQUEST_ID = b"x-qtrap-request-id"
H_BACKEND = b"x-qtrap-backend"
H_PRECISION = b"x-qtrap-precision"


class Proxy:
    def __init__(
        self,
        config: ProxyConfig,
        registry: CollectorRegistry | None = None,
        policy: RoutingPolicy | None = None,
        keep_records: int = 10_000,
    ) -> None:
        self.config = config
        self.backends = [Backend(b) for b in config.backends]
        self.router = Router(config, self.backends, policy)
        self.metrics = Metrics(registry)
        self.started_unix_s = int(time.time())
        for b in self.backends:
            b.metrics = self.metrics.child(b.pool, b.name, b.precision)
        self._recent: OrderedDict[str, Timeline] = OrderedDict()
        self._keep = keep_records

    async def close(self) -> None:
        await asyncio.gather(*(b.close() for b in self.backends))

    # -- request lifecycle -------------------------------------------------
    def begin(self, tl: Timeline, backend: Backend) -> None:
        tl.pool, tl.precision, tl.backend = backend.pool, backend.precision, backend.name
        backend.metrics.inflight.inc()

    def end(self, tl: Timeline, *, was_inflight: bool) -> None:
        """A request has finished (any outcome): account it once."""
        try:
            self.metrics.child(tl.pool, tl.backend, tl.precision).finished(tl, was_inflight=was_inflight)
            self._recent[tl.request_id] = tl
            if len(self._recent) > self._keep:
                self._recent.popitem(last=False)
        except Exception:  # accounting must never take a request down
            log.exception("accounting failed for request %s", tl.request_id)

    def record(self, request_id: str) -> dict[str, Any] | None:
        tl = self._recent.get(request_id)
        if tl is None:
            return None
        return {
            **tl.record(),
            "energy_j": None,
            "energy_null_reason": "no energy meter in this version of the proxy",
        }

    @staticmethod
    def response_headers(tl: Timeline) -> list[tuple[bytes, bytes]]:
        h = [(H_REQUEST_ID, tl.request_id.encode())]
        if tl.backend is not None:
            h.append((H_BACKEND, tl.backend.encode()))
        if tl.precision is not None:
            h.append((H_PRECISION, tl.precision.encode()))
        return h

    # -- health ------------------------------------------------------------
    async def health(self) -> tuple[int, dict[str, Any]]:
        timeout = self.config.server.health_timeout_s
        results: list[Health] = await asyncio.gather(*(b.probe(timeout) for b in self.backends))
        pools_up: dict[str, bool] = {}
        out = []
        for b, h in zip(self.backends, results, strict=True):
            self.metrics.backend_up.labels(b.name).set(1 if h.ok else 0)
            pools_up[b.pool] = pools_up.get(b.pool, False) or h.ok
            out.append(
                {
                    "name": b.name,
                    "pool": b.pool,
                    "precision": b.precision,
                    "kind": b.kind,
                    "url": b.cfg.url,
                    "ok": h.ok,
                    "http_status": h.status,
                    "latency_s": h.latency_s,
                    "error": h.error,
                }
            )
        if all(h.ok for h in results):
            status = "ok"
        elif all(pools_up.values()):
            status = "degraded"
        else:
            status = "down"
        code = 503 if status == "down" else 200
        return code, {"status": status, "pools": pools_up, "backends": out}

    def models(self) -> dict[str, Any]:
        data = []
        for pool, precisions in self.router.pools.items():
            data.append({"id": pool, "object": "model", "created": self.started_unix_s, "owned_by": "qtrap"})
            for precision in precisions:
                data.append(
                    {
                        "id": f"{pool}@{precision}",
                        "object": "model",
                        "created": self.started_unix_s,
                        "owned_by": "qtrap",
                        "root": pool,
                    }
                )
        return {"object": "list", "data": data}
