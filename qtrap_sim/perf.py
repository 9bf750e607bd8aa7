"""Performance and power models of the simulated GPU.

A model answers one question: what does one engine step cost, in time and in
energy, given how many rows go through the linear layers (one per decoding
sequence, one per prompt token being prefilled) and how many context tokens the
attention reads? It also says which part of that energy is the marginal cost of
each row and each context token, so the engine can give every request its true
share (the rest is shared equally by the requests in the step).

``CalibratedPerf`` is fitted to kernel measurements on a real GPU
(``bench/gpu/calibrate.py`` -> ``bench/fit_profiles.py`` -> ``profiles/<gpu>.json``):

    t_lin(rows) = k_t(rows) * (t0 + smoothmax_p(A, B*rows) + C*rows)
    t_att(ctx)  = layers * a0 + layers * a1 * ctx                 (when anything runs)
    E(rows,ctx) = k_e(rows) * (P_idle*t_par + e0 + e1*rows) + P_idle*t_att + ea*layers*ctx

(t_par: the bracket of t_lin, before the correction)

t0 is the fixed per-step overhead, A the time to stream the weights once, B the
compute per row (FLOPs per token), C the per-row dequantisation or activation
quantisation, a1/ea the attention cost per context token, P_idle the idle power;
power (E/t) rises with utilisation because e0 and e1*rows grow faster than time
once the weights are amortised. k_t and k_e are per-batch corrections (1 unless
the kernel's measurements leave the smooth model by more than 10%).
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class StepCost:
    time_s: float
    energy_j: float
    row_j: float  # marginal energy of one more row through the linear layers (the time it adds included)
    ctx_j: float  # marginal energy of one more context token read by attention (likewise)


class PerfModel(Protocol):
    @property
    def idle_power_w(self) -> float: ...

    def step(self, rows: int, ctx_tokens: int) -> StepCost:
        """Cost of one step with ``rows`` rows through the linears and ``ctx_tokens`` attention reads."""
        ...


@dataclass(frozen=True, slots=True)
class LinearPerf:
    """A simple model for tests and what-ifs: fixed step cost plus a cost per row, constant busy power."""

    base_s: float = 0.010
    per_seq_s: float = 0.00002
    per_prefill_token_s: float = 0.000005
    idle_power_w: float = 120.0
    busy_power_w: float = 400.0

    def step(self, rows: int, ctx_tokens: int) -> StepCost:
        t = self.base_s + self.per_seq_s * rows
        return StepCost(t, self.busy_power_w * t, self.busy_power_w * self.per_seq_s, 0.0)


# precision labels (as in proxy configs) -> calibrated kernel
KERNEL_OF_PRECISION = {
    "bf16": "bf16",
    "fp16": "bf16",
    "int4": "int4_tinygemm",
    "awq": "int4_tinygemm",
    "gptq": "int4_tinygemm",
    "w4a16": "int4_tinygemm",
    "fp8": "fp8_w8a8",
    "w8a8-fp8": "fp8_w8a8",
    "int8": "int8_w8a8",
    "w8a8": "int8_w8a8",
    "int8-dequant": "int8_dequant",
    "nf4": "bnb_nf4",
    "bnb-4bit": "bnb_nf4",
    "bnb-8bit": "bnb_int8",
    "llm-int8": "bnb_int8",
}


class ProfileError(ValueError):
    pass


def kernel_of(gpu: str, precision: str) -> str | None:
    """The kernel a precision label runs on a GPU profile: the profile's own ``precisions`` table (an H200
    profile calibrated to vLLM maps ``int4`` to vLLM's W4A16 kernel) over ``KERNEL_OF_PRECISION``."""
    try:
        own = load_profile(gpu).get("precisions", {})
    except ProfileError:
        own = {}
    label = precision.lower()
    return own.get(label) or KERNEL_OF_PRECISION.get(label)


def precision_labels(gpu: str) -> dict[str, str]:
    """Every precision label a GPU profile knows, with its kernel (those whose kernel it has)."""
    prof = load_profile(gpu)
    have = {k for m in prof["models"].values() for k in m["kernels"]}
    table = {**KERNEL_OF_PRECISION, **prof.get("precisions", {})}
    return {label: k for label, k in sorted(table.items()) if k in have}


@cache
def load_profile(gpu: str) -> dict[str, Any]:
    try:
        text = resources.files("qtrap_sim").joinpath("profiles", f"{gpu}.json").read_text()
    except FileNotFoundError:
        raise ProfileError(
            f"no calibrated profile for GPU {gpu!r} (have: {', '.join(available_gpus())})"
        ) from None
    return json.loads(text)  # type: ignore[no-any-return]


def available_gpus() -> list[str]:
    files = resources.files("qtrap_sim").joinpath("profiles").iterdir()
    return sorted(f.name.removesuffix(".json") for f in files if f.name.endswith(".json"))


def _interp_log(batches: list[int], values: list[float], x: float) -> float:
    if x <= batches[0]:
        return values[0]
    if x >= batches[-1]:
        return values[-1]
    i = bisect.bisect_right(batches, x)
    x0, x1 = math.log(batches[i - 1]), math.log(batches[i])
    f = (math.log(x) - x0) / (x1 - x0)
    return values[i - 1] + f * (values[i] - values[i - 1])


class CalibratedPerf:
    def __init__(self, gpu: str, model: str, kernel: str) -> None:
        prof = load_profile(gpu)
        m = prof["models"].get(model)
        if m is None:
            raise ProfileError(
                f"GPU profile {gpu!r} has no model {model!r} (have: {', '.join(sorted(prof['models']))})"
            )
        k = m["kernels"].get(kernel)
        if k is None:
            raise ProfileError(
                f"model {model!r} on {gpu!r} has no kernel {kernel!r} (have: {', '.join(sorted(m['kernels']))})"
            )
        self.gpu, self.model, self.kernel = gpu, model, kernel
        self.idle_power_w = float(prof["idle_power_w"])
        t = k["time"]
        self.t0, self.a, self.b, self.c, self.p = (
            t["t0_s"],
            t["weights_s"],
            t["compute_s_per_row"],
            t["quant_s_per_row"],
            t["p"],
        )
        self.e0, self.e1 = k["energy"]["step_j"], k["energy"]["row_j"]
        corr = k["correction"]
        self._cb, self._ct, self._ce = corr["batches"], corr["time"], corr["energy"]
        self._flat = all(v == 1.0 for v in self._ct) and all(v == 1.0 for v in self._ce)
        att = m["attention"]
        self.layers = att["layers"]
        self.att_fixed_s = att["a0_s"] * self.layers
        self.att_ctx_s = att["a1_s_per_ctx_token"] * self.layers
        self.att_ctx_j = att["e_j_per_ctx_token"] * self.layers
        self.measured = k["measured"]

    def linear_cost(self, rows: int) -> tuple[float, float]:
        """(time, energy) of the linear layers alone: what bench/gpu/calibrate.py measures."""
        t = self.t0 + (self.a**self.p + (self.b * rows) ** self.p) ** (1.0 / self.p) + self.c * rows
        e = self.idle_power_w * t + self.e0 + self.e1 * rows
        if self._flat:
            return float(t), float(e)
        return float(t * _interp_log(self._cb, self._ct, rows)), float(
            e * _interp_log(self._cb, self._ce, rows)
        )

    def step(self, rows: int, ctx_tokens: int) -> StepCost:
        rows = max(rows, 1)
        t_lin, e_lin = self.linear_cost(rows)
        t_att = self.att_fixed_s + self.att_ctx_s * ctx_tokens
        energy = e_lin + self.idle_power_w * t_att + self.att_ctx_j * ctx_tokens
        # marginal energies, including the idle power drawn for the time a row or a context token adds
        row_j = max(0.0, self.linear_cost(rows + 1)[1] - e_lin)
        ctx_j = self.att_ctx_j + self.idle_power_w * self.att_ctx_s
        marginal = row_j * rows + ctx_j * ctx_tokens
        if marginal > energy:  # convex stretch of the curve: marginals may not exceed the whole
            row_j, ctx_j = row_j * energy / marginal, ctx_j * energy / marginal
        return StepCost(t_lin + t_att, energy, row_j, ctx_j)
