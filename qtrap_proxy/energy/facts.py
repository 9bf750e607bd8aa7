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
