"""The token timeline of one request: what energy attribution consumes.

The per-chunk path only appends a float and an int to two lists; everything
derived (TTFT, durations) is computed once, when the request has ended; the
request's record is shaped from it by record.build_record.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from qtrap_proxy.limits import MAX_ERROR_CHARS, bounded

# Request ids: 128 random bits each (32 hex characters). An id is the key to a request's record on the
# admin API, so one id must not reveal others (a per-process prefix and a counter did); os.urandom costs
# about 0.5 us per id on a 2-core development machine, against about 0.2 us for the counter.
ID_BYTES = 16


def new_request_id() -> str:
    return os.urandom(ID_BYTES).hex()


@dataclass(slots=True)
class Timeline:
    """Times are ``time.monotonic()`` seconds; ``start_unix_s`` anchors them to wall time."""

    request_id: str
    route: str
    stream: bool = False
    pool: str | None = None
    precision: str | None = None
    backend: str | None = None
    chain_id: str | None = None
    hop: int | None = None
    key_id: str | None = None  # the client key's public id (auth.enabled); in the record
    key_label: str | None = None  # its metric label (name, else id); not in the record
    client_request_id: str | None = None  # the client's valid X-Request-Id (limits.check_client_request_id)
    trace_id: str | None = None  # the client's W3C trace id when it sent a valid traceparent
    client_span_id: str | None = None  # and its span id there: the parent of the proxy's span (otel.py)
    tracestate: str | None = None  # the client's tracestate (with a valid traceparent), passed on
    routing: str | None = None  # the pool's routing policy (round_robin | cost), once a backend is chosen
    route_reason: str | None = None  # why this backend (wire.ROUTE_REASONS)
    load: int = 0  # requests in flight on its backend when it began, itself included
    start: float = field(default_factory=time.monotonic)
    start_unix_s: float = field(default_factory=time.time)
    first_byte: float | None = None
    end: float | None = None
    chunk_t: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    chunk_hop: list[int] | None = None  # hop (0-based) of each chunk, with x-qtrap-hop-split
    prompt_tokens: int | None = None
    # the prompt's leading tokens the engine found in its prefix cache (vLLM's usage.prompt_tokens_details
    # .cached_tokens, with --enable-prompt-tokens-details): not prefilled, so no prefill rows
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    # True when chunk_tokens come from the backend's own counters (vLLM continuous
    # usage stats, TGI's one-token events); False when they are one-per-chunk estimates.
    tokens_exact: bool = False
    status: str = "in_flight"
    http_status: int | None = None
    error: str | None = None

    @property
    def span_id(self) -> str:
        """The request's span id (16 hex digits): the parent of the engine's span for it."""
        return self.request_id[:16]

    @property
    def traceparent(self) -> str:
        """What goes upstream: the client's trace (else one named by the request id), this request's
        span, sampled (an engine with a parent-based sampler records a span only for a sampled parent)."""
        return f"00-{self.trace_id or self.request_id}-{self.request_id[:16]}-01"

    def prefilled(self, prompt_tokens: int | None) -> int | None:
        """The prompt tokens the engine prefilled: ``prompt_tokens`` (the engine's count, else the usage's)
        less those its prefix cache held, where the usage said."""
        if prompt_tokens is None:
            return None
        cached = self.cached_tokens
        return prompt_tokens if cached is None else max(0, prompt_tokens - cached)

    def add_chunk(self, t: float, tokens: int) -> None:
        self.chunk_t.append(t)
        self.chunk_tokens.append(tokens)

    def finish(self, status: str, http_status: int, error: str | None = None) -> None:
        self.end = time.monotonic()
        self.status = status
        self.http_status = http_status
        # messages can quote what a client sent (a model name, a header): kept bounded
        self.error = None if error is None else bounded(error, MAX_ERROR_CHARS)
        if self.completion_tokens is None and self.chunk_tokens and self.tokens_exact:
            self.completion_tokens = sum(self.chunk_tokens)

    @property
    def ttft_s(self) -> float | None:
        """Time to the first content chunk (streams) or to the response (non-streaming)."""
        if self.chunk_t:
            return self.chunk_t[0] - self.start
        return None

    @property
    def e2e_s(self) -> float | None:
        return None if self.end is None else self.end - self.start
