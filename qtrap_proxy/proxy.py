"""The proxy's shared state: backends, router, metrics, energy attribution and the request records.

A request's record lives in three places over its life: while in flight or waiting
for its final energy figure, it is built on demand from its Tracked account
(``final: false``, a provisional figure); once final it is queued for the ledger
and, when the ledger has committed it, kept in a small cache of recent finals
(``final: true``); older records are read back from the ledger.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from typing import Any

from prometheus_client import CollectorRegistry

from qtrap_common import wire
from qtrap_proxy.auth import KeyRing, Principal, admin_digest
from qtrap_proxy.config import ProxyConfig
from qtrap_proxy.energy import reasons
from qtrap_proxy.energy.attribution import Tracked
from qtrap_proxy.energy.collector import EnergyCollector
from qtrap_proxy.energy.service import EnergyService
from qtrap_proxy.errors import ConfigError, Forbidden, KeyStoreError
from qtrap_proxy.keystore import KeyStore
from qtrap_proxy.ledger import Ledger, UsageRow
from qtrap_proxy.metrics import Metrics, hop_label
from qtrap_proxy.record import build_record, chain_summary
from qtrap_proxy.routing import Router, RoutingPolicy
from qtrap_proxy.timeline import Timeline
from qtrap_proxy.upstream import Backend, Health

log = logging.getLogger("qtrap.proxy")

# Response headers every relayed answer carries.
H_REQUEST_ID = wire.B_RESP_REQUEST_ID
H_BACKEND = wire.B_RESP_BACKEND
H_PRECISION = wire.B_RESP_PRECISION


class Proxy:
    def __init__(
        self,
        config: ProxyConfig,
        registry: CollectorRegistry | None = None,
        policy: RoutingPolicy | None = None,
        keep_records: int = 2_000,
    ) -> None:
        self.config = config
        self.backends = [Backend(b) for b in config.backends]
        self.router = Router(config, self.backends, policy)
        self.metrics = Metrics(registry, auth=config.auth.enabled, key_metrics=config.auth.key_metrics)
        self.started_unix_s = int(time.time())
        for b in self.backends:
            b.metrics = self.metrics.child(b.pool, b.name, b.precision)
        self._finals: OrderedDict[str, dict[str, Any]] = OrderedDict()  # recent durable finals
        self._committing: dict[str, dict[str, Any]] = {}  # final, queued for the ledger
        self._keep = keep_records
        self._scored: OrderedDict[str, None] = OrderedDict()  # chains already scored
        # auth (auth.py): the admin key's digest and the client keys; None while auth is off
        self.admin_sha256: bytes | None = None
        self.key_ring: KeyRing | None = None
        if config.auth.enabled:
            self.admin_sha256 = admin_digest(config.auth)
            try:
                self.key_ring = KeyRing(KeyStore(config.keys_path), config.auth.refresh_s)
            except KeyStoreError as e:
                raise ConfigError(f"auth.keys_path: {e}") from e
        self.ledger = Ledger(config.ledger.path, config.ledger.retention_days, config.ledger.batch_s)
        self.energy = EnergyService(config, self.backends, self._on_final)
        self.metrics.registry.register(EnergyCollector(self.energy))
        self.metrics.register_ledger(self.ledger)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.hop_regex = re.compile(config.meter.hop_split_regex)
        self._health_last: tuple[float, list[Health]] | None = None  # (monotonic, the backends' probes)
        self._health_probe: asyncio.Future[list[Health]] | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.ledger.start(self._on_durable, self._on_dropped)
        self.energy.start()

    # -- request lifecycle -------------------------------------------------
    def begin(self, tl: Timeline, backend: Backend, hop_split: bool = False) -> None:
        tl.pool, tl.precision, tl.backend = backend.pool, backend.precision, backend.name
        backend.metrics.inflight.inc()
        self.energy.begin(tl, backend, hop_split)

    def end(self, tl: Timeline, *, was_inflight: bool) -> None:
        """A request has finished (any outcome): account it once."""
        try:
            self.metrics.child(tl.pool, tl.backend, tl.precision).finished(tl, was_inflight=was_inflight)
            self.metrics.key_finished(tl)
            tr = self.energy.account(tl.request_id)
            if tr is None:  # rejected before reaching a backend: nothing to measure
                self.energy.reject(tl, reasons.REJECTED)
            else:
                self.energy.end(tr)
        except Exception:  # accounting must never take a request down
            log.exception("accounting failed for request %s", tl.request_id)

    def _on_final(self, tr: Tracked) -> None:
        rec = build_record(tr, final=True, meter=self.energy.kind, devices=self.energy.backend_devices_of(tr))
        self.metrics.energy_final(tr, rec)
        self._committing[rec["id"]] = rec
        self.ledger.put(rec)

    def _on_durable(self, records: list[dict[str, Any]]) -> None:
        """Called by the ledger's writer thread once records are committed."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._durable, records)

    def _on_dropped(self, records: list[dict[str, Any]]) -> None:
        """Called by the ledger's writer thread for records it gave up (counted and logged there)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._dropped, records)

    def _dropped(self, records: list[dict[str, Any]]) -> None:
        for rec in records:
            self._committing.pop(str(rec.get("id")), None)

    def _durable(self, records: list[dict[str, Any]]) -> None:
        for rec in records:
            self._committing.pop(rec["id"], None)
            self._finals[rec["id"]] = rec
        while len(self._finals) > self._keep:
            self._finals.popitem(last=False)

    def record(self, request_id: str) -> dict[str, Any] | None:
        rec = self._finals.get(request_id)
        if rec is not None:
            return rec
        rec = self._committing.get(request_id)
        if rec is not None:  # final figure, not yet durable: it turns final once committed
            return {**rec, "final": False}
        tr = self.energy.account(request_id)
        if tr is not None:
            return build_record(
                tr,
                final=False,
                meter=self.energy.kind,
                devices=self.energy.backend_devices_of(tr),
                provisional_j=self.energy.provisional_j(tr),
            )
        return self.ledger.get(request_id)

    def _chain_records(self, chain_id: str) -> list[dict[str, Any]]:
        """Every record of a chain, by hop and start."""
        recs = {r["id"]: r for r in self.ledger.chain(chain_id)}
        for source in (self._committing.values(), self._finals.values()):
            recs.update({r["id"]: r for r in source if r.get("chain_id") == chain_id})
        for tr in self.energy.open_accounts(chain_id=chain_id):
            recs[tr.tl.request_id] = self.record(tr.tl.request_id) or {}
        return sorted(recs.values(), key=lambda r: (r.get("hop") or 0, r["start_unix_s"]))

    def chain(self, chain_id: str, who: Principal | None = None) -> dict[str, Any] | None:
        """A chain's summary; for a client key (``who``) only that key's records of it. None if none."""
        recs = self._chain_records(chain_id)
        if who is not None:
            recs = [r for r in recs if who.may_see(r.get("key_id"))]
        return chain_summary(chain_id, recs) if recs else None

    def score_chain(
        self, chain_id: str, correct: bool, hops: int | None, who: Principal | None = None
    ) -> dict[str, Any] | None:
        """Count a client's verdict on a chain's final answer (once per chain); None if the chain is unknown
        (to ``who``). With auth on only the chain's owner, the key of its first record, or the admin may
        score it: another key that has records in the chain gets Forbidden, one that has none None."""
        recs = self._chain_records(chain_id)
        if who is not None and not who.admin:
            if not any(who.may_see(r.get("key_id")) for r in recs):
                return None
            owner = min(recs, key=lambda r: r["start_unix_s"]).get("key_id")
            if not who.may_see(owner):
                raise Forbidden(f"chain {chain_id!r} belongs to another API key; only its owner may score it")
        if not recs:
            return None
        last = recs[-1]
        n = hops if hops is not None else len(recs)
        first = chain_id not in self._scored
        if first:
            self._scored[chain_id] = None
            if len(self._scored) > 10 * self._keep:
                self._scored.popitem(last=False)
            self.metrics.chains_scored.labels(
                last.get("pool") or "",
                last.get("precision") or "",
                hop_label(n),
                "correct" if correct else "wrong",
            ).inc()
        return {
            "chain_id": chain_id,
            "counted": first,
            "correct": correct,
            "hops": n,
            "pool": last.get("pool"),
            "precision": last.get("precision"),
        }

    def provisional_j(self, tl: Timeline) -> float | None:
        tr = self.energy.account(tl.request_id)
        return None if tr is None else self.energy.provisional_j(tr)

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
        """The backends' probes (at most ``server.health_cache_s`` old) and the ledger's state (now)."""
        results = await self._probes()
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
                    "url": b.cfg.display_url,
                    "ok": h.ok,
                    "http_status": h.status,
                    "latency_s": h.latency_s,
                    "error": h.error,
                }
            )
        ledger = self.ledger.state()
        if all(h.ok for h in results) and ledger["status"] == "ok":
            status = "ok"
        elif all(pools_up.values()):
            status = "degraded"  # a backend down, or records not being persisted: still serving
        else:
            status = "down"
        code = 503 if status == "down" else 200  # only the pools take the proxy out of a load balancer
        return code, {"status": status, "pools": pools_up, "backends": out, "ledger": ledger}

    def models(self, who: Principal | None = None) -> dict[str, Any]:
        """The pools and ``pool@precision`` ids, in OpenAI's list format (a client key: its pools only)."""
        data = []
        for pool, precisions in self.router.pools.items():
            if who is not None and not who.may_use(pool):
                continue
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

    # -- bounded reads (issue 13) -----------------------------------------------
    async def _probes(self) -> list[Health]:
        """Every backend's probe, at most ``server.health_cache_s`` old; callers that arrive while a
        probe runs share it, so a flood of /health calls probes each backend once per period."""
        last = self._health_last
        if last is not None and time.monotonic() - last[0] < self.config.server.health_cache_s:
            return last[1]
        if self._health_probe is None:
            self._health_probe = asyncio.ensure_future(self._probe_backends())
        return await asyncio.shield(self._health_probe)

    async def _probe_backends(self) -> list[Health]:
        try:
            timeout = self.config.server.health_timeout_s
            results: list[Health] = await asyncio.gather(*(b.probe(timeout) for b in self.backends))
            self._health_last = (time.monotonic(), results)
            return results
        finally:
            self._health_probe = None

    def chain_page(
        self, chain_id: str, offset: int, limit: int, who: Principal | None = None
    ) -> dict[str, Any] | None:
        """:meth:`chain` with its ``records`` and ``hops`` cut to ``limit`` from ``offset`` (totals stay
        the chain's); ``next_offset`` is null on the last page."""
        rec = self.chain(chain_id, who)
        if rec is None:
            return None
        total = len(rec["records"])
        end = offset + limit
        return {
            **rec,
            "records": rec["records"][offset:end],
            "hops": rec["hops"][offset:end],
            "offset": offset,
            "limit": limit,
            "next_offset": end if end < total else None,
        }

    # -- per-key usage (issue 13) ------------------------------------------------
    def key_usage(self, key_id: str, since_unix_s: float, until_unix_s: float) -> dict[str, Any] | None:
        """What one client key used from the ledger's final records that started in [since, until):
        requests, tokens, attributed and idle energy, by precision; None for a key the store does not
        hold. Energy sums cover the requests whose energy is known; the others are counted, never as 0 J."""
        if self.key_ring is None:
            return None
        key = self.key_ring.get(key_id)
        if key is None:
            return None
        rows = self.ledger.key_usage(key_id, since_unix_s, until_unix_s)
        by_precision = [{"precision": row.precision, **_usage([row])} for row in rows]
        pending = sum(1 for _ in self.energy.open_accounts(key_id=key_id))
        pending += sum(1 for r in self._committing.values() if r.get("key_id") == key_id)
        return {
            "key_id": key.id,
            "name": key.name,
            "since_unix_s": since_unix_s,
            "until_unix_s": until_unix_s,
            **_usage(rows),
            "by_precision": by_precision,
            "not_final_requests": pending,
            "note": "sums over the final records in the ledger; requests in flight or waiting for their final "
            "energy figure (not_final_requests, now) count once they are final",
        }


def _usage(rows: list[UsageRow]) -> dict[str, Any]:
    """The sums of some usage rows, as the usage API shows them (energy None when no request's is known)."""
    requests = sum(r.requests for r in rows)
    energies = [r.energy_j for r in rows if r.energy_j is not None]
    idles = [r.idle_energy_j for r in rows if r.idle_energy_j is not None]
    none = 0.0 if requests == 0 else None  # nothing used is 0 J; used but never measured is unknown
    energy = sum(energies) if energies else none
    idle = sum(idles) if idles else none
    known_tokens = sum(r.completion_tokens_energy_known for r in rows)
    total = (energy or 0.0) + (idle or 0.0)
    return {
        "requests": requests,
        "ok_requests": sum(r.ok_requests for r in rows),
        "prompt_tokens": sum(r.prompt_tokens for r in rows),
        "completion_tokens": sum(r.completion_tokens for r in rows),
        "energy_j": energy,
        "idle_energy_j": idle,
        "idle_share": idle / total if idle is not None and total > 0 else None,
        "j_per_token": energy / known_tokens if energy is not None and known_tokens else None,
        "energy_unknown_requests": sum(r.energy_unknown_requests for r in rows),
        "energy_null_reason": None if energy is not None else reasons.KEY_NONE_MEASURED,
    }
