"""The composition root: builds the proxy's parts and wires them, and begins and ends each request.

Parts: the backends and their router, the metrics, auth's key ring, the ledger, the energy service
(energy/service.py), the record store (records.py) it hands each final account to, and the energy
and ledger collectors in the metrics registry. The HTTP edge (admin.py, app.py) and the relay routes
reach the parts through it.
"""

from __future__ import annotations

import logging
import re
import time

from prometheus_client import CollectorRegistry

from qtrap_common import wire
from qtrap_proxy.auth import KeyRing, admin_digest
from qtrap_proxy.config import ProxyConfig
from qtrap_proxy.energy import reasons
from qtrap_proxy.energy.collector import EnergyCollector
from qtrap_proxy.energy.service import EnergyService
from qtrap_proxy.errors import ConfigError, KeyStoreError
from qtrap_proxy.keystore import KeyStore
from qtrap_proxy.ledger import Ledger
from qtrap_proxy.metrics import Metrics
from qtrap_proxy.otlp import OtlpReceiver
from qtrap_proxy.probes import BackendProbes
from qtrap_proxy.records import RecordStore
from qtrap_proxy.routing import Router, RoutingPolicy
from qtrap_proxy.timeline import Timeline
from qtrap_proxy.upstream import Backend

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
        # the energy service hands each final account to the record store (constructed next)
        self.energy = EnergyService(config, self.backends, lambda tr: self.records.commit(tr))
        self.records = RecordStore(self.energy, self.ledger, self.metrics, self.key_ring, keep_records)
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
