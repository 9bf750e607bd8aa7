"""Step-time model of the simulated GPU.

This is the simple linear model: a fixed per-step overhead plus a cost per
decoding sequence and per prefill token. The calibrated per-(model, precision,
GPU) model with power replaces it behind the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class PerfModel(Protocol):
    def step_time_s(self, decode_seqs: int, prefill_tokens: int) -> float:
        """Duration of one engine step serving ``decode_seqs`` decodes and ``prefill_tokens`` prompt tokens."""
        ...


@dataclass(frozen=True, slots=True)
class LinearPerf:
    base_s: float = 0.010
    per_seq_s: float = 0.00002
    per_prefill_token_s: float = 0.000005

    def step_time_s(self, decode_seqs: int, prefill_tokens: int) -> float:
        return self.base_s + self.per_seq_s * decode_seqs + self.per_prefill_token_s * prefill_tokens
