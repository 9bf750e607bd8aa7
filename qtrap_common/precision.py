"""Precision labels: how many bits a weight has, and which labels are the unquantized baselines.

Used by loadgen (the casting-overhead ratio divides by the bit-width ratio; B* compares every other
precision with the first baseline present) and by the proxy's Prometheus rules (a static series of
bit widths, a pool's baseline). Labels are matched lower-case; a label not listed has no bit width,
so it gets no casting-overhead figure rather than a guessed one.
"""

from __future__ import annotations

from typing import Final

BITS: Final[dict[str, int]] = {
    "fp32": 32, "bf16": 16, "fp16": 16, "fp8": 8, "int8": 8, "w8a8": 8, "w8a8-fp8": 8, "int8-dequant": 8,
    "bnb-int8": 8, "bnb-8bit": 8, "llm-int8": 8, "int4": 4, "awq": 4, "gptq": 4, "w4a16": 4, "nf4": 4,
    "bnb-nf4": 4, "bnb-4bit": 4, "fp4": 4, "nvfp4": 4,
}  # fmt: skip

# Baselines in order of preference: the first one a pool or a run serves is what others compare with.
BASELINES: Final[tuple[str, ...]] = ("fp16", "bf16", "fp32")


def bits(precision: str) -> int | None:
    """Bit width of a precision label, or None for a label not known here."""
    return BITS.get(precision.lower())


def baseline_of(precisions: list[str] | tuple[str, ...]) -> str | None:
    """The first of :data:`BASELINES` among ``precisions``, or None."""
    return next((b for b in BASELINES if b in precisions), None)
