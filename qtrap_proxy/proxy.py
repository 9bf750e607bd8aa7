"""The composition root: builds the proxy's parts and wires them, and begins and ends each request.

Parts: the backends and their router, the metrics, auth's key ring, the ledger, the energy service
(energy/service.py), the record store (records.py) it hands each final account to, and the energy
and ledger collectors in the metrics registry. The HTTP edge (admin.py, app.py) and the relay routes
reach the parts through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from qtrap_common import wire
from qtrap_proxy.auth import KeyRing, admin_digest
from qtrap_proxy.carbon import Carbon
from qtrap_proxy.config import ProxyConfig
from qtrap_proxy.cost import CostPolicy
from qtrap_proxy.costseed import Seed, read_seed
from qtrap_proxy.energy import reasons
from qtrap_proxy.energy.collector import EnergyCollector
from qtrap_proxy.energy.service import EnergyService
from qtrap_proxy.errors import ConfigError, KeyStoreError
from qtrap_proxy.keystore import KeyStore
from qtrap_proxy.ledger import Ledger
from qtrap_proxy.metrics import Metrics
from qtrap_proxy.otel import OtelExport
from qtrap_proxy.otlp import OtlpReceiver
from qtrap_proxy.probes import BackendProbes
from qtrap_proxy.records import RecordStore
from qtrap_proxy.routing import Router, RoutingPolicy
from qtrap_proxy.timeline import Timeline
from qtrap_proxy.upstream import Backend

log = logging.getLogger("qtrap.proxy")

# Response headers every relayed answer carries.
H_REQUEST_ID = wire.B_RESP_REQUEST_ID
H_CLIENT_REQUEST_ID = wire.B_REQUEST_ID  # the client's X-Request-Id echoed, else the proxy's id
H_BACKEND = wire.B_RESP_BACKEND
H_PRECISION = wire.B_RESP_PRECISION
H_ROUTE = wire.B_RESP_ROUTE


@dataclass(frozen=True, slots=True)
class AnswerEnergy:
    """A request's energy as its answer is sent: the provisional figure, or null and why.

    ``joules`` is never 0 for unknown: it is None with ``reason``. ``provisional`` is True while the final
    figure (the record's, once the meter has read past the request's end) may still differ, False when it
    is already known that the final figure will be null (no meter, no devices, a meter gap)."""

    joules: float | None
    reason: str | None
    provisional: bool


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
        self._by_name = {b.name: b for b in self.backends}
        self.router = Router(config, self.backends, policy)
        # routing by cost (cost.py): the pools with `routing: cost`, None when there are none
        self.cost: CostPolicy | None = None
        if any(pc.routing == "cost" for pc in config.pools.values()):
            self.cost = CostPolicy(config, self.router.pools, _seeds(config))
            self.router.pool_policy = self.cost
        self._probing: asyncio.Task[None] | None = None
        self.metrics = Metrics(registry, auth=config.auth.enabled, key_metrics=config.auth.key_metrics)
        self.started_unix_s = int(time.time())
        for b in self.backends:
            b.metrics = self.metrics.child(b.pool, b.name, b.precision)
        # auth (auth.py): the admin key's digest and the client keys; None while auth is off
        self.admin_sha256: bytes | None = None
        self.key_ring: KeyRing | None = None
        if config.auth.enabled:
            self.admin_sha256 = admin_digest(config.auth)
            try:
                self.key_ring = KeyRing(KeyStore(config.keys_path), config.auth.refresh_s)
            except KeyStoreError as e:
                raise ConfigError(f"auth.keys_path: {e}") from e
        lc = config.ledger
        self.ledger = Ledger(lc.path, lc.retention_days, lc.batch_s, url=lc.url, password_env=lc.password_env)
        # the energy service hands each final account to the record store (constructed next)
        self.energy = EnergyService(config, self.backends, lambda tr: self.records.commit(tr))
        # carbon intensity, PUE and price (carbon.py): each final record's co2e_g and cost
        self.carbon = Carbon(config.carbon, config.pricing)
        self.records = RecordStore(
            self.energy, self.ledger, self.metrics, self.key_ring, keep_records, self.carbon
        )
        # OpenTelemetry out (otel.py): one span per request, made when its record is final
        self.otel: OtelExport | None = None
        if config.otel_export.enabled:
            self.otel = OtelExport(config.otel_export, config.backends)
            self.records.final_listeners.append(self.otel.on_final)
        if self.cost is not None:  # the cost model learns from meter intervals, records and chain scores
            self.energy.observe_intervals(self.cost.observe_interval)
            self.records.final_listeners.append(self.cost.observe)
            self.records.score_listeners.append(self.cost.scored)
        self.metrics.registry.register(EnergyCollector(self.energy))
        self.metrics.register_ledger(self.ledger)
        self.hop_regex = re.compile(config.meter.hop_split_regex)
        self.probes = BackendProbes(self.backends, config.server)  # GET /health's, cached
        # engine facts over OTLP/HTTP (otlp.py): the spans go to the energy service
        self.otlp: OtlpReceiver | None = None
        if config.otlp_receiver.enabled:
            self.otlp = OtlpReceiver(config.otlp_receiver, self.energy.on_facts)
            self.metrics.register_otlp(self.otlp)

    async def start(self) -> None:
        if self.otlp is not None:
            try:
                await self.otlp.start()
            except OSError as e:
                rc = self.config.otlp_receiver
                raise ConfigError(
                    f"otlp_receiver: cannot listen on {rc.host}:{rc.port}: {e.strerror or e}"
                ) from e
            log.info("OTLP/HTTP trace receiver at %s", self.otlp.endpoint)
        self.records.start()
        self.energy.start()
        if self.carbon.polling:
            self.carbon.start()
        probe_s = min(
            (
                pc.cost.probe_s
                for pc in self.config.pools.values()
                if pc.routing == "cost" and pc.cost.probe_s > 0
            ),
            default=0.0,
        )
        if probe_s > 0:
            self._probing = asyncio.create_task(self._probe_every(probe_s), name="qtrap-cost-probes")

    async def _probe_every(self, period_s: float) -> None:
        """Routing by cost: keep the backends' health verdicts fresh (probes.py sets them)."""
        while True:
            try:
                await self.probes.results()
            except Exception:  # a probe never raises; this loop must not die if one does
                log.exception("probing the backends failed")
            await asyncio.sleep(period_s)

    async def stop_probing(self) -> None:
        task, self._probing = self._probing, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- request lifecycle -------------------------------------------------
    def begin(self, tl: Timeline, backend: Backend, hop_split: bool = False) -> None:
        tl.pool, tl.precision, tl.backend = backend.pool, backend.precision, backend.name
        backend.inflight += 1
        tl.load = backend.inflight
        backend.metrics.inflight.inc()
        if tl.route_reason is not None:
            self.metrics.route_decision(backend.pool, backend.precision, tl.route_reason)
        self.energy.begin(tl, backend, hop_split)

    def end(self, tl: Timeline, *, was_inflight: bool) -> None:
        """A request has finished (any outcome): account it once."""
        try:
            if was_inflight and tl.backend is not None:
                backend = self._by_name[tl.backend]
                backend.inflight -= 1
                if tl.status == "upstream_unreachable" and self.cost is not None:
                    self.cost.unreachable(backend)
            self.metrics.child(tl.pool, tl.backend, tl.precision).finished(tl, was_inflight=was_inflight)
            self.metrics.key_finished(tl)
            tr = self.energy.account(tl.request_id)
            if tr is None:  # rejected before reaching a backend: nothing to measure
                self.energy.reject(tl, reasons.REJECTED)
            else:
                self.energy.end(tr)
        except Exception:  # accounting must never take a request down
            log.exception("accounting failed for request %s", tl.request_id)

    def answer_energy(self, tl: Timeline) -> AnswerEnergy:
        """The figure an answer carries (``usage.energy_j``, the provisional-energy header)."""
        tr = self.energy.account(tl.request_id)
        if tr is None:
            return AnswerEnergy(None, reasons.REJECTED, False)
        if not tr.energy_known or tr.devices == 0:
            return AnswerEnergy(None, tr.unknown_reason or reasons.NO_METER, False)
        j = self.energy.provisional_j(tr)
        if j is None or j <= 0:  # nothing read yet: unknown, never 0
            return AnswerEnergy(None, reasons.NOT_MEASURED_YET, True)
        return AnswerEnergy(j, None, True)

    @staticmethod
    def response_headers(tl: Timeline) -> list[tuple[bytes, bytes]]:
        h = [
            (H_REQUEST_ID, tl.request_id.encode()),
            (H_CLIENT_REQUEST_ID, (tl.client_request_id or tl.request_id).encode()),
        ]
        if tl.backend is not None:
            h.append((H_BACKEND, tl.backend.encode()))
        if tl.precision is not None:
            h.append((H_PRECISION, tl.precision.encode()))
            if tl.route_reason is not None:
                h.append(
                    (H_ROUTE, f"{tl.routing}; precision={tl.precision}; reason={tl.route_reason}".encode())
                )
        return h


def _seeds(config: ProxyConfig) -> dict[str, Seed]:
    """The seed reports of the cost pools that name one (ConfigError naming the key if one is bad)."""
    seeds = {}
    for name, pc in config.pools.items():
        if pc.routing == "cost" and pc.cost.seed_report is not None:
            try:
                seeds[name] = read_seed(pc.cost.seed_report)
            except ConfigError as e:
                raise ConfigError(f"pools.{name}.cost.seed_report: {e}") from e
    return seeds
