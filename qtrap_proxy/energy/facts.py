"""What an engine says about one request: its own timing, on its own clock.

Two sources fill :class:`EngineFacts`:

* ``otlp``: vLLM's ``llm_request`` span (vLLM 0.26.0, ``vllm/v1/engine/output_processor.py``
  ``do_tracing``), received by the proxy's OTLP/HTTP receiver (``qtrap_proxy/otlp.py``). The span
  starts at the request's arrival in vLLM's API server (its wall clock) and carries durations
  measured on the engine core's monotonic clock: ``gen_ai.latency.time_in_queue`` (scheduled -
  queued), ``time_in_model_prefill`` (first token - scheduled), ``time_in_model_decode`` (last token
  - first token), ``time_in_model_inference`` (last token - scheduled), ``time_to_first_token`` (first
  token - arrival, seen by the front end) and ``e2e``; ``gen_ai.usage.prompt_tokens`` and
  ``completion_tokens``; ``gen_ai.request.id``. Its parent is the span id the proxy sent upstream in
  ``traceparent``, which joins it to the request.
* ``headers``: TGI's answer headers on a non-streaming request (``x-queue-time``,
  ``x-inference-time``, ``x-time-per-token`` in milliseconds, ``x-prompt-tokens``,
  ``x-generated-tokens``); durations only, anchored at the moment the proxy received the answer.

Every figure is optional: an engine may leave any of them out, and a value that is not finite,
negative or absurdly large is dropped by the parser, never passed on.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

FactsSource = Literal["otlp", "headers"]

# durations and token counts beyond these are not believed (a day; a billion tokens)
MAX_SECONDS = 86_400.0
MAX_TOKENS = 1_000_000_000


@dataclass(slots=True, frozen=True)
class EngineFacts:
    """One request's timing as its engine reports it (seconds; ``*_unix_s`` on the engine's wall clock)."""

    source: FactsSource
    trace_id: str | None = None  # 32 lowercase hex digits
    parent_span_id: str | None = None  # 16 lowercase hex digits: the proxy's span id for the request
    request_id: str | None = None  # gen_ai.request.id, bounded printable ASCII
    service: str | None = None  # the resource's service.name, bounded printable ASCII
    arrival_unix_s: float | None = None  # the span's start: arrival at the engine's API server
    end_unix_s: float | None = None  # the span's end (when it was recorded)
    queue_s: float | None = None
    ttft_s: float | None = None
    prefill_s: float | None = None
    decode_s: float | None = None
    inference_s: float | None = None
    e2e_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


def finite_seconds(v: object) -> float | None:
    """A duration or timestamp difference as a float in [0, MAX_SECONDS], else None."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return f if 0.0 <= f <= MAX_SECONDS else None  # NaN fails both comparisons


def token_count(v: object) -> int | None:
    """A token count as an int in [0, MAX_TOKENS], else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int):
        return None
    return v if 0 <= v <= MAX_TOKENS else None


@dataclass(slots=True)
class EngineTimes:
    """A request's phases as its engine reports them, on the proxy's monotonic clock (what attribution
    works on). ``first_token`` is None where the engine does not separate prefill from decode (TGI's
    headers): the request's rows are then spread over [prefill_start, last_token]."""

    source: FactsSource
    queued: float | None  # entered the engine's queue (no work while queued)
    prefill_start: float  # first scheduled: its prompt's rows run from here
    first_token: float | None  # end of its prefill
    last_token: float  # its last token
    prompt_tokens: int | None
    completion_tokens: int | None
    clock_error_s: float  # bound on how far these instants may be off (the clock offset's half width)


class ClockOffset:
    """The offset of an engine's wall clock from the proxy's (engine - proxy), from hard bounds.

    A request the proxy sent at proxy time ``s`` and saw end at ``e`` arrived at the engine at engine time
    ``A`` and finished there at ``A + d``; since it arrived after it was sent and finished before the
    proxy saw the end, the offset lies in ``[A + d - e, A - s]`` (and ``[A + ttft - c, ...]`` with ``c``
    its first chunk). Intersecting the bounds of recent requests narrows the offset to the least overhead
    any of them had between proxy and engine; the estimate is the middle, its error at most half the
    width. Bounds that no longer intersect (a clock stepped) restart the window from the newest request.
    """

    WINDOW = 256

    def __init__(self) -> None:
        # sliding-window max of the lower bounds and min of the upper bounds (monotonic queues of
        # (sample number, bound)): O(1) amortised per request
        self._lo: deque[tuple[int, float]] = deque()
        self._hi: deque[tuple[int, float]] = deque()
        self.samples = 0
        self.restarts = 0

    def add(self, lo: float, hi: float) -> None:
        if hi < lo:  # one request's own bounds crossing: its figures and the proxy's disagree; keep both
            lo, hi = hi, lo
        n = self.samples
        self.samples += 1
        self._push(lo, hi, n)
        if self._lo[0][1] > self._hi[0][1]:  # no offset fits every recent request: a clock stepped
            self.restarts += 1
            self._lo.clear()
            self._hi.clear()
            self._push(lo, hi, n)

    def _push(self, lo: float, hi: float, n: int) -> None:
        while self._lo and self._lo[-1][1] <= lo:
            self._lo.pop()
        self._lo.append((n, lo))
        while self._hi and self._hi[-1][1] >= hi:
            self._hi.pop()
        self._hi.append((n, hi))
        oldest = n - self.WINDOW + 1
        while self._lo[0][0] < oldest:
            self._lo.popleft()
        while self._hi[0][0] < oldest:
            self._hi.popleft()

    def estimate(self) -> tuple[float, float] | None:
        """(offset, half width) in seconds, or None before any request gave bounds."""
        if not self._lo:
            return None
        lo, hi = self._lo[0][1], self._hi[0][1]
        return (lo + hi) / 2, (hi - lo) / 2


def otlp_times(
    facts: EngineFacts,
    start: float,
    start_unix_s: float,
    end: float | None,
    first_chunk: float | None,
    clock: ClockOffset,
) -> EngineTimes | None:
    """Place an engine span's phases on the proxy's monotonic clock, after giving ``clock`` the bounds
    this request sets on the offset. ``start``/``start_unix_s``: when the proxy got the request
    (monotonic and wall); ``end``: when it saw the answer end; ``first_chunk``: a stream's first chunk.
    None where the span lacks what placing it needs (its start, its first-token time, its prefill)."""
    a_engine = facts.arrival_unix_s
    if a_engine is None:
        return None
    wall = start_unix_s - start  # proxy wall time minus monotonic time
    lows = []
    if end is not None and facts.e2e_s is not None:
        lows.append(a_engine + facts.e2e_s - (end + wall))
    if first_chunk is not None and facts.ttft_s is not None:
        lows.append(a_engine + facts.ttft_s - (first_chunk + wall))
    if lows:
        clock.add(max(lows), a_engine - start_unix_s)
    est = clock.estimate()
    if est is None:
        return None
    offset, err = est
    arrival = a_engine - offset - wall
    if facts.ttft_s is not None:
        first: float | None = arrival + facts.ttft_s
    elif facts.queue_s is not None and facts.prefill_s is not None:
        first = arrival + facts.queue_s + facts.prefill_s
    else:
        first = None
    if first is None or facts.prefill_s is None:
        return None
    if facts.decode_s is not None:
        last = first + facts.decode_s
    elif facts.e2e_s is not None:
        last = arrival + facts.e2e_s
    else:
        last = first
    hi = end if end is not None else max(last, first)

    def clamp(t: float) -> float:
        return min(max(t, start), hi)

    prefill_start = clamp(first - facts.prefill_s)
    return EngineTimes(
        source="otlp",
        queued=None if facts.queue_s is None else clamp(first - facts.prefill_s - facts.queue_s),
        prefill_start=prefill_start,
        first_token=max(prefill_start, clamp(first)),
        last_token=max(prefill_start, clamp(last)),
        prompt_tokens=facts.prompt_tokens,
        completion_tokens=facts.completion_tokens,
        clock_error_s=err,
    )


def _header_number(headers: Mapping[str, str], name: str) -> float | None:
    value = headers.get(name)
    if value is None or len(value) > 32:
        return None
    try:
        return float(value.strip())
    except ValueError:
        return None


def header_times(headers: Mapping[str, str], start: float, answer_at: float) -> EngineTimes | None:
    """TGI's timing headers on a non-streaming answer, anchored at the moment the proxy received its head
    (``answer_at``; TGI sends the whole answer once generation has ended): its inference ran for
    ``x-inference-time`` ms before that, after ``x-queue-time`` ms in the queue. TGI does not separate
    prefill from decode. None without an inference time."""
    inference_ms = _header_number(headers, "x-inference-time")
    inference = None if inference_ms is None else finite_seconds(inference_ms / 1000)
    if inference is None:
        return None
    queue_ms = _header_number(headers, "x-queue-time")
    queue = None if queue_ms is None else finite_seconds(queue_ms / 1000)
    prefill_start = max(start, answer_at - inference)
    return EngineTimes(
        source="headers",
        queued=None if queue is None else max(start, prefill_start - queue),
        prefill_start=prefill_start,
        first_token=None,
        last_token=answer_at,
        prompt_tokens=token_count(_header_number(headers, "x-prompt-tokens")),
        completion_tokens=token_count(_header_number(headers, "x-generated-tokens")),
        clock_error_s=0.001,  # whole milliseconds
    )
