"""Every Prometheus metric the proxy exports, defined once.

Labels are bounded: pool, backend and precision come from the configuration
(never from what a client sends), status from a fixed vocabulary, and no
request or chain id is ever a label. The per-key metrics (``auth.key_metrics``,
off by default) are labelled by the key's name (else its id): keys are created
by the operator, so they are few, and names are checked (keystore.NAME).
Tests pass a fresh ``CollectorRegistry``. The per-device energy figures are
collected where they are kept (``energy/collector.py``); the composition root
registers that collector in this registry. The OTLP trace receiver's counts (``otlp.py``) are read
at scrape time too, through the :class:`OtlpCounts` protocol (``Metrics.register_otlp``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from qtrap_common.wire import RequestRecord
from qtrap_proxy.timeline import Timeline

if TYPE_CHECKING:
    from qtrap_proxy.energy.attribution import Tracked
    from qtrap_proxy.ledger import Ledger

STATUSES = (
    "ok",
    "upstream_error",
    "upstream_unreachable",
    "upstream_timeout",
    "stream_broken",
    "client_disconnected",
    "bad_request",
    "not_found",
    "forbidden",
    "too_large",
    "internal_error",
)

REFUSALS = ("shed", "headers", "too_large", "timeout")  # qtrap_refused_requests_total's reasons
AUTH_REFUSALS = ("unauthorized", "forbidden")  # and with auth.enabled, auth.py's gate's
OTLP_REQUEST_OUTCOMES = ("ok", "bad_request", "too_large", "unsupported")  # qtrap_otlp_requests_total
OTLP_SPAN_OUTCOMES = ("llm_request", "ignored", "rejected")  # qtrap_otlp_spans_total
_ENERGY_BUCKETS = (0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100, 300, 1000, 3000)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
_MAX_HOP_LABEL = 16
_ITL_SAMPLES = 32
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_UNROUTED = ""  # label value for requests rejected before a backend was chosen


def hop_label(hop: int) -> str:
    """Bounded label value for a hop index or a hop count."""
    return str(hop) if hop <= _MAX_HOP_LABEL else f"{_MAX_HOP_LABEL + 1}+"


class Metrics:
    def __init__(
        self, registry: CollectorRegistry | None = None, *, auth: bool = False, key_metrics: bool = False
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        labels = ("pool", "backend", "precision")
        self.requests = Counter(
            "qtrap_requests", "Requests answered, by outcome", (*labels, "status"), registry=r
        )
        self.tokens = Counter(
            "qtrap_tokens", "Tokens processed (kind=prompt|completion)", (*labels, "kind"), registry=r
        )
        self.inflight = Gauge("qtrap_inflight_requests", "Requests in flight", labels, registry=r)
        self.ttft = Histogram(
            "qtrap_time_to_first_token_seconds",
            "Time from request arrival to the first streamed content chunk",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "qtrap_request_duration_seconds",
            "Time from request arrival to the end of the response",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.backend_up = Gauge(
            "qtrap_backend_up", "1 if the backend's last health probe succeeded", ("backend",), registry=r
        )
        self.itl = Histogram(
            "qtrap_inter_token_latency_seconds",
            "Time between streamed chunks of one request",
            labels,
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.energy = Counter(
            "qtrap_energy_joules",
            "GPU energy attributed to finished requests (final figures)",
            labels,
            registry=r,
        )
        self.request_energy = Histogram(
            "qtrap_request_energy_joules",
            "Attributed energy per request (final figures)",
            labels,
            buckets=_ENERGY_BUCKETS,
            registry=r,
        )
        self.hop_energy = Histogram(
            "qtrap_hop_energy_joules",
            f"Attributed energy per reasoning hop (hop label 1..{_MAX_HOP_LABEL}, then {_MAX_HOP_LABEL + 1}+)",
            ("pool", "precision", "hop"),
            buckets=_ENERGY_BUCKETS,
            registry=r,
        )
        self.energy_unknown = Counter(
            "qtrap_energy_unknown_requests",
            "Finished requests whose energy could not be measured",
            labels,
            registry=r,
        )
        # carbon and cost of the final figures (carbon.py): GPU energy x carbon.pue x intensity or price;
        # requests whose figure is unknown add nothing (their records say why)
        self.co2e = Counter(
            "qtrap_co2e_grams",
            "gCO2e of the GPU energy attributed to finished requests, times the PUE (final figures)",
            labels,
            registry=r,
        )
        self.energy_cost = Counter(
            "qtrap_energy_cost",
            "Cost of the GPU energy attributed to finished requests, times the PUE, in the currency label",
            (*labels, "currency"),
            registry=r,
        )
        # answered by the limits in front of the routes (guard.py), before any route or backend: no pool
        # or backend to label them with, so not in qtrap_requests_total
        self.refused = Counter(
            "qtrap_refused_requests",
            "Requests refused by the proxy's limits or its API-key check before routing "
            "(reason=shed|headers|too_large|timeout|unauthorized|forbidden)",
            ("reason",),
            registry=r,
        )
        for reason in REFUSALS + (AUTH_REFUSALS if auth else ()):
            self.refused.labels(reason)
        self.chains_scored = Counter(
            "qtrap_chains_scored",
            "Chains whose final answer a client scored (POST /qtrap/v1/chains/{id}/score), by result "
            f"(correct|wrong) and hops (1..{_MAX_HOP_LABEL}, then {_MAX_HOP_LABEL + 1}+)",
            ("pool", "precision", "hops", "result"),
            registry=r,
        )
        self.route_decisions = Counter(
            "qtrap_route_decisions",
            "Backends chosen for requests, by pool, precision and reason "
            "(pinned|cheapest|explore|sticky|ramp|fallback|no_data|round_robin)",
            ("pool", "precision", "reason"),
            registry=r,
        )
        self._decisions: dict[tuple[str, str, str], Any] = {}
        self._children: dict[tuple[str, str, str], BackendMetrics] = {}
        self.key_requests: Counter | None = None
        self.key_energy: Counter | None = None
        if auth and key_metrics:
            self.key_requests = Counter(
                "qtrap_key_requests",
                "Requests answered for each client key (auth.key_metrics), by the key's name (else its id)",
                ("key",),
                registry=r,
            )
            self.key_energy = Counter(
                "qtrap_key_energy_joules",
                "GPU energy attributed to each client key's finished requests (final figures; requests "
                "of unknown energy add nothing, see qtrap_energy_unknown_requests_total)",
                ("key",),
                registry=r,
            )

    def key_finished(self, tl: Timeline) -> None:
        """Count a finished request for its key (auth.key_metrics)."""
        if self.key_requests is not None and tl.key_label is not None:
            self.key_requests.labels(tl.key_label).inc()

    def route_decision(self, pool: str, precision: str, reason: str) -> None:
        """Count a routing decision (pool and precision from the configuration, reason from a fixed set)."""
        key = (pool, precision, reason)
        child = self._decisions.get(key)
        if child is None:
            child = self._decisions[key] = self.route_decisions.labels(*key)
        child.inc()

    def register_ledger(self, ledger: Ledger) -> None:
        """The ledger's state, read at scrape time."""
        self.registry.register(_LedgerCollector(ledger))

    def register_otlp(self, counts: OtlpCounts) -> None:
        """The OTLP trace receiver's counts (``otlp.OtlpReceiver``), read at scrape time."""
        self.registry.register(_OtlpCollector(counts))

    def energy_final(self, tr: Tracked, rec: RequestRecord) -> None:
        tl = tr.tl
        if tl.backend is None:
            return
        bm = self.child(tl.pool, tl.backend, tl.precision)
        energy = rec["energy_j"]
        co2e, cost = rec.get("co2e_g"), rec.get("cost")
        if co2e is not None:
            bm.co2e.inc(co2e)
        currency = rec.get("cost_currency")
        if cost is not None and currency is not None:
            self.energy_cost.labels(
                tl.pool or _UNROUTED, tl.backend, tl.precision or _UNROUTED, currency
            ).inc(cost)
        if energy is None:
            bm.energy_unknown.inc()
        else:
            bm.energy.inc(energy)
            if self.key_energy is not None and tl.key_label is not None:
                self.key_energy.labels(tl.key_label).inc(energy)
            bm.request_energy.observe(energy)
            for hop in rec["hops"]:
                hop_j = hop["energy_j"]
                if hop_j is not None:
                    self.hop_energy.labels(
                        tl.pool or "", tl.precision or "", hop_label(hop["index"])
                    ).observe(hop_j)
        # inter-token latency: every gap of short streams, an even sample of 32 gaps of long ones
        times = tl.chunk_t
        gaps = len(times) - 1
        if gaps > 0:
            step = max(1, gaps // _ITL_SAMPLES)
            for k in range(0, gaps, step):
                bm.itl.observe(times[k + 1] - times[k])

    def child(self, pool: str | None, backend: str | None, precision: str | None) -> BackendMetrics:
        """The metric children of one (pool, backend, precision), bound once and reused."""
        key = (pool or _UNROUTED, backend or _UNROUTED, precision or _UNROUTED)
        bm = self._children.get(key)
        if bm is None:
            bm = self._children[key] = BackendMetrics(self, *key)
        return bm


class BackendMetrics:
    """Pre-bound label children: ``labels()`` costs a lock and a lookup, so it is done once."""

    __slots__ = (
        "co2e",
        "completion",
        "duration",
        "energy",
        "energy_unknown",
        "inflight",
        "itl",
        "prompt",
        "request_energy",
        "requests",
        "routed",
        "ttft",
    )

    def __init__(self, m: Metrics, pool: str, backend: str, precision: str) -> None:
        lv = (pool, backend, precision)
        self.routed = backend != _UNROUTED
        self.requests = {status: m.requests.labels(*lv, status) for status in STATUSES}
        if not self.routed:
            # requests refused before a backend was chosen: counted by status alone; binding the other
            # children would export series whose every label is empty (no tokens, latency or energy)
            return
        self.inflight = m.inflight.labels(*lv)
        self.prompt = m.tokens.labels(*lv, "prompt")
        self.completion = m.tokens.labels(*lv, "completion")
        self.ttft = m.ttft.labels(*lv)
        self.duration = m.duration.labels(*lv)
        self.itl = m.itl.labels(*lv)
        self.energy = m.energy.labels(*lv)
        self.request_energy = m.request_energy.labels(*lv)
        self.energy_unknown = m.energy_unknown.labels(*lv)
        self.co2e = m.co2e.labels(*lv)

    def finished(self, tl: Timeline, *, was_inflight: bool) -> None:
        """Account one finished request (called once, at its end: never per chunk)."""
        self.requests[tl.status].inc()
        if not self.routed:
            return
        if was_inflight:
            self.inflight.dec()
        if tl.prompt_tokens:
            self.prompt.inc(tl.prompt_tokens)
        if tl.completion_tokens:
            self.completion.inc(tl.completion_tokens)
        ttft = tl.ttft_s
        if ttft is not None:
            self.ttft.observe(ttft)
        e2e = tl.e2e_s
        if e2e is not None:
            self.duration.observe(e2e)


class _LedgerCollector(Collector):
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def collect(self) -> Iterable[Any]:
        state = self.ledger.state()
        up = GaugeMetricFamily(
            "qtrap_ledger_up",
            "1 while the ledger persists final records (its writer runs and its last commit succeeded)",
        )
        up.add_metric([], 1.0 if state["status"] == "ok" else 0.0)
        errors = CounterMetricFamily(
            "qtrap_ledger_write_errors",
            "Ledger write errors by kind: commit (a batch refused, kept and retried), record (one record "
            "stored with a note instead of as it was), writer (the writer failed or died and was restarted), "
            "dropped (records given up)",
            labels=["kind"],
        )
        for kind, n in state["write_errors"].items():
            errors.add_metric([kind], float(n))
        pending = GaugeMetricFamily(
            "qtrap_ledger_pending_records", "Final records handed to the ledger and not yet committed"
        )
        pending.add_metric([], float(state["pending"]))
        yield from (up, errors, pending)


class OtlpCounts(Protocol):
    """What the OTLP trace receiver counts (``otlp.OtlpReceiver`` has these as plain ints)."""

    @property
    def accepted(self) -> int: ...
    @property
    def bad_requests(self) -> int: ...
    @property
    def too_large(self) -> int: ...
    @property
    def unsupported(self) -> int: ...
    @property
    def llm_spans(self) -> int: ...
    @property
    def ignored_spans(self) -> int: ...
    @property
    def rejected_spans(self) -> int: ...
    @property
    def sink_errors(self) -> int: ...


class _OtlpCollector(Collector):
    def __init__(self, counts: OtlpCounts) -> None:
        self.counts = counts

    def collect(self) -> Iterable[Any]:
        c = self.counts
        requests = CounterMetricFamily(
            "qtrap_otlp_requests",
            "OTLP/HTTP export requests to the trace receiver, by answer: ok (200), bad_request (400, 408), "
            "too_large (413), unsupported (415: content type or encoding)",
            labels=["outcome"],
        )
        for outcome, n in zip(
            OTLP_REQUEST_OUTCOMES, (c.accepted, c.bad_requests, c.too_large, c.unsupported), strict=True
        ):
            requests.add_metric([outcome], float(n))
        spans = CounterMetricFamily(
            "qtrap_otlp_spans",
            "Spans in accepted export requests: llm_request (passed on as engine facts), ignored (other "
            "names), rejected (llm_request spans with no trace id, parent span id or request id)",
            labels=["outcome"],
        )
        for outcome, n in zip(
            OTLP_SPAN_OUTCOMES, (c.llm_spans, c.ignored_spans, c.rejected_spans), strict=True
        ):
            spans.add_metric([outcome], float(n))
        sink = CounterMetricFamily(
            "qtrap_otlp_sink_errors",
            "Export requests whose engine facts the proxy failed to take in (logged; answered 200)",
        )
        sink.add_metric([], float(c.sink_errors))
        yield from (requests, spans, sink)
