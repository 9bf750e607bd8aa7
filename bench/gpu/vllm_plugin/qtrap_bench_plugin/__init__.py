"""A vLLM general plugin for qtrap's GPU benchmarks: random integer weights under ``--load-format dummy``.

vLLM's dummy loader ("assign random values to the weights", its own benchmarking mode) fills floating-point
parameters with uniform noise but leaves integer ones as ``torch.empty`` memory (vLLM 0.26,
``weight_utils.initialize_single_dummy_weight``), which on a fresh CUDA allocation is mostly zeros. Quantized
checkpoints keep their weights in integer tensors (compressed-tensors W8A8: ``weight`` int8; W4A16:
``weight_packed`` int32), and a GEMM over zero weights switches fewer bits and draws less power than one
over real weights: the energy of the INT8 and INT4 servers would read low. This plugin fills those weight
tensors with uniformly random bits, as a real quantized checkpoint's weights look, and leaves every other
integer tensor (shapes, group indices, zero points) alone.

vLLM loads general plugins in every process (API server, engine core, workers) from the entry point group
``vllm.general_plugins``; put this folder (which holds the entry point's dist-info) on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

_installed = False
_filled: dict[str, int] = {"tensors": 0, "elements": 0, "calls": 0}


def _fill_integer_weights(module: Any, seed: int) -> None:
    import torch

    tensors = 0
    for name, t in module.state_dict().items():
        if torch.is_floating_point(t) or t.dtype == torch.bool or t.device.type == "meta":
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in ("weight", "weight_packed", "qweight") or t.numel() == 0:
            continue
        info = torch.iinfo(t.dtype)
        gen = torch.Generator(device=t.device)
        gen.manual_seed(seed + t.numel() % 9973)
        t.random_(info.min, info.max, generator=gen)  # [min, max): every bit pattern but the largest
        tensors += 1
        _filled["elements"] += t.numel()
    _filled["tensors"] += tensors
    _filled["calls"] += 1
    if tensors and _filled["calls"] == 1:
        print(
            f"qtrap_bench_plugin: pid {os.getpid()}: random bits in {tensors} integer weight tensors "
            f"({_filled['elements']:,} elements) of {type(module).__name__}",
            file=sys.stderr,
            flush=True,
        )


def register() -> None:
    """vLLM calls this in each of its processes (maybe more than once)."""
    global _installed
    if _installed:
        return
    _installed = True
    try:
        from vllm.model_executor.model_loader import dummy_loader, weight_utils
    except Exception as e:  # a vLLM without these modules: say so, change nothing
        print(f"qtrap_bench_plugin: not installed ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
        return
    original = weight_utils.initialize_dummy_weights

    def initialize_dummy_weights(
        model: Any, model_config: Any, low: float = -1e-3, high: float = 1e-3, seed: int = 1234
    ) -> None:
        original(model, model_config, low, high, seed)
        _fill_integer_weights(model, seed)

    weight_utils.initialize_dummy_weights = initialize_dummy_weights
    dummy_loader.initialize_dummy_weights = initialize_dummy_weights  # it imported the name
    print(
        f"qtrap_bench_plugin: pid {os.getpid()}: integer weights of dummy models get random bits",
        file=sys.stderr,
        flush=True,
    )
