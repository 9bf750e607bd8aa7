"""Every Prometheus metric the proxy exports, defined once.

Labels are bounded: pool, backend and precision come from the configuration
(never from what a client sends), status from a fixed vocabulary, and no
request or chain id is ever a label. Tests pass a fresh ``CollectorRegistry``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from qtrap_proxy.timeline import Timeline

STATUSES = (
    "ok",
    "upstream_error",
    "upstream_unreachable",
    "upstream_timeout",
    "stream_broken",
    "client_disconnected",
    "bad_request",
    "not_found",
    "too_large",
    "internal_error",
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_UNROUTED = ""  # label value for requests rejected before a backend was chosen


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
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
        self._children: dict[tuple[str, str, str], BackendMetrics] = {}

    def child(self, pool: str | None, backend: str | None, precision: str | None) -> BackendMetrics:
        """The metric children of one (pool, backend, precision), bound once and reused."""
        key = (pool or _UNROUTED, backend or _UNROUTED, precision or _UNROUTED)
        bm = self._children.get(key)
        if bm is None:
            bm = self._children[key] = BackendMetrics(self, *key)
        return bm


class BackendMetrics:
    """Pre-bound label children: ``labels()`` costs a lock and a lookup, so it is done once."""

    __slots__ = ("completion", "duration", "inflight", "prompt", "requests", "routed", "ttft")

    def __init__(self, m: Metrics, pool: str, backend: str, precision: str) -> None:
        lv = (pool, backend, precision)
        self.routed = backend != _UNROUTED
        self.inflight = m.inflight.labels(*lv)
        self.prompt = m.tokens.labels(*lv, "prompt")
        self.completion = m.tokens.labels(*lv, "completion")
        self.ttft = m.ttft.labels(*lv)
        self.duration = m.duration.labels(*lv)
        self.requests = {status: m.requests.labels(*lv, status) for status in STATUSES}

    def finished(self, tl: Timeline, *, was_inflight: bool) -> None:
        """Account one finished request (called once, at its end: never per chunk)."""
        if was_inflight:
            self.inflight.dec()
        self.requests[tl.status].inc()
        if tl.prompt_tokens:
            self.prompt.inc(tl.prompt_tokens)
        if tl.completion_tokens:
            self.completion.inc(tl.completion_tokens)
        if self.routed:
            ttft = tl.ttft_s
            if ttft is not None:
                self.ttft.observe(ttft)
            e2e = tl.e2e_s
            if e2e is not None:
                self.duration.observe(e2e)
