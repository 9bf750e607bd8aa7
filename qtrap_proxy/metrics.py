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

    def started(self, pool: str, backend: str, precision: str) -> None:
        self.inflight.labels(pool, backend, precision).inc()

    def finished(self, tl: Timeline, *, was_inflight: bool) -> None:
        """Account one finished request (called once, at its end: never per chunk)."""
        pool = tl.pool or _UNROUTED
        backend = tl.backend or _UNROUTED
        precision = tl.precision or _UNROUTED
        if was_inflight:
            self.inflight.labels(pool, backend, precision).dec()
        self.requests.labels(pool, backend, precision, tl.status).inc()
        if tl.prompt_tokens:
            self.tokens.labels(pool, backend, precision, "prompt").inc(tl.prompt_tokens)
        if tl.completion_tokens:
            self.tokens.labels(pool, backend, precision, "completion").inc(tl.completion_tokens)
        if tl.backend is not None:
            ttft = tl.ttft_s
            if ttft is not None:
                self.ttft.labels(pool, backend, precision).observe(ttft)
            e2e = tl.e2e_s
            if e2e is not None:
                self.duration.labels(pool, backend, precision).observe(e2e)
