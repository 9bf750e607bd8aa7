"""Kernel-level calibration probe: decode-step time and NVML energy per precision and batch size.

Runs on a GPU machine (written for an H100). For each model shape (random weights
shaped like Qwen3-0.6B and Qwen3-8B) and each weight format / kernel:

  bf16          torch linear in BF16 (the baseline)
  int4_tinygemm weight-only INT4, torch._weight_int4pack_mm (fused dequant in the GEMM)
  fp8_w8a8      FP8 weights and activations, torch._scaled_mm (dynamic per-tensor activation scale)
  int8_w8a8     INT8 weights and activations, torch._int_mm (dynamic per-row activation scale)
  int8_dequant  INT8 weights dequantised to BF16 every step, then a BF16 GEMM (the naive path)
  bnb_nf4       bitsandbytes Linear4bit (NF4)
  bnb_nf4_serve bitsandbytes Linear4bit as `transformers serve --quantization bnb-4bit` builds it: NF4 with
                double quantisation and transformers' default float32 compute dtype
  bnb_int8      bitsandbytes Linear8bitLt (LLM.int8)

it builds one decode step (per layer: RMSNorm, q/k/v/o projections, SwiGLU MLP; then
the BF16 LM head), captures it in a CUDA graph where the kernel allows, replays it for
``--window-s`` seconds per batch size, and reads NVML's total-energy counter at its
update instants (it moves about every 100 ms on an H100), subtracting idle power for
the tail between the end of the work and the counter's next update. Attention is
probed separately (BF16 SDPA decode, per layer, at several context lengths).

Writes one JSON file (``--out``); see docs/calibration.md for the format and how
qtrap_sim fits its profiles to it.

    python3 bench/gpu/calibrate.py --models qwen3-0.6b --out calib-0.6b.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

SHAPES: dict[str, dict[str, int]] = {
    # from the models' public config.json files
    "qwen3-0.6b": {
        "hidden": 1024,
        "inter": 3072,
        "layers": 28,
        "heads": 16,
        "kv_heads": 8,
        "head_dim": 128,
        "vocab": 151936,
    },
    "qwen3-8b": {
        "hidden": 4096,
        "inter": 12288,
        "layers": 36,
        "heads": 32,
        "kv_heads": 8,
        "head_dim": 128,
        "vocab": 151936,
    },
    "smoke": {
        "hidden": 256,
        "inter": 512,
        "layers": 2,
        "heads": 4,
        "kv_heads": 2,
        "head_dim": 64,
        "vocab": 1024,
    },
}
KERNELS = (
    "bf16", "int4_tinygemm", "fp8_w8a8", "int8_w8a8", "int8_dequant", "bnb_nf4", "bnb_nf4_serve", "bnb_int8",
)  # fmt: skip
# bitsandbytes' LLM.int8 path synchronises with the host (outlier columns): it cannot be captured
# in a CUDA graph, and a failed capture leaves the CUDA generator unusable, so it runs eagerly.
NO_GRAPH = frozenset({"bnb_int8"})
BITS = {
    "bf16": 16,
    "int4_tinygemm": 4,
    "fp8_w8a8": 8,
    "int8_w8a8": 8,
    "int8_dequant": 8,
    "bnb_nf4": 4,
    "bnb_nf4_serve": 4,
    "bnb_int8": 8,
}


# ---------------------------------------------------------------------------- energy meter
class Meter:
    """NVML total-energy counter (mJ) read at its update instants; None where NVML is missing."""

    def __init__(self, index: int) -> None:
        self.handle: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.read()
        except Exception as e:  # no NVML: timing only
            print(f"calibrate: no NVML energy ({e}); energy will be null", file=sys.stderr)
            self.handle = None

    def read(self) -> int:
        return int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))

    def next_update(self, timeout_s: float = 0.5) -> tuple[float, int]:
        """Block until the counter moves; return (time of the move, new value in mJ)."""
        c0 = self.read()
        deadline = time.perf_counter() + timeout_s
        while True:
            c = self.read()
            now = time.perf_counter()
            if c != c0 or now > deadline:
                return now, c
            time.sleep(0.0005)

    def power_w(self) -> float:
        return float(self.nvml.nvmlDeviceGetPowerUsage(self.handle)) / 1000.0


# ---------------------------------------------------------------------------- kernels
def _pad_rows(x: torch.Tensor, multiple: int, minimum: int = 0) -> torch.Tensor:
    m = x.shape[0]
    target = max(minimum, math.ceil(m / multiple) * multiple)
    return x if target == m else F.pad(x, (0, 0, 0, target - m))


class Linear:
    """One projection in a given weight format. ``__call__(x[m, k]) -> y[m, n]`` in BF16."""

    def __init__(self, kind: str, n: int, k: int, device: torch.device) -> None:
        self.kind, self.n, self.k = kind, n, k
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * (1.0 / math.sqrt(k))
        if kind == "bf16":
            self.w = w
        elif kind == "int4_tinygemm":
            group = 128
            q = torch.randint(0, 16, (n, k), device=device, dtype=torch.int32)
            packed = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
            self.w = torch._convert_weight_to_int4pack(packed, 8)
            scale = torch.rand(k // group, n, 1, device=device, dtype=torch.bfloat16) * 0.01
            zero = torch.zeros(k // group, n, 1, device=device, dtype=torch.bfloat16)
            self.sz = torch.cat([scale, zero], dim=2).contiguous()
            self.group = group
        elif kind == "fp8_w8a8":
            self.scale_w = (w.abs().max().float() / 448.0).reshape(())
            self.w = (w.float() / self.scale_w).to(torch.float8_e4m3fn)
        elif kind in ("int8_w8a8", "int8_dequant"):
            s = w.abs().amax(dim=1, keepdim=True).float() / 127.0
            self.w = (w.float() / s).round().clamp(-128, 127).to(torch.int8)
            self.scale_w = s.reshape(1, n)  # per output channel
            self.scale_col = s.to(torch.bfloat16)  # [n, 1] for the dequant path
        elif kind in ("bnb_nf4", "bnb_nf4_serve", "bnb_int8"):
            import bitsandbytes as bnb

            if kind == "bnb_nf4":
                mod = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
                mod.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4")
            elif kind == "bnb_nf4_serve":  # BitsAndBytesConfig(load_in_4bit, nf4, double quant), as serve's
                mod = bnb.nn.Linear4bit(
                    k, n, bias=False, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4"
                )
                mod.weight = bnb.nn.Params4bit(
                    w.cpu(), requires_grad=False, compress_statistics=True, quant_type="nf4"
                )
            else:
                mod = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=6.0)
                mod.weight = bnb.nn.Int8Params(w.cpu(), requires_grad=False, has_fp16_weights=False)
            self.mod = mod.to(device)
        else:
            raise ValueError(kind)
        del w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        kind = self.kind
        if kind == "bf16":
            return F.linear(x, self.w)
        if kind == "int4_tinygemm":
            return torch._weight_int4pack_mm(x, self.w, self.group, self.sz)
        if kind == "fp8_w8a8":
            m = x.shape[0]
            xp = _pad_rows(x, 16)
            sa = (xp.abs().max().float() / 448.0).clamp(min=1e-12)
            xq = (xp.float() / sa).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
            y = torch._scaled_mm(xq, self.w.t(), scale_a=sa, scale_b=self.scale_w, out_dtype=torch.bfloat16)
            return y[:m]
        if kind == "int8_w8a8":
            m = x.shape[0]
            xp = _pad_rows(x, 8, minimum=32)  # torch._int_mm wants more than 16 rows
            sa = xp.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-8) / 127.0
            xq = (xp.float() / sa).round().clamp(-128, 127).to(torch.int8)
            acc = torch._int_mm(xq, self.w.t())
            return (acc.float() * sa * self.scale_w).to(torch.bfloat16)[:m]
        if kind == "int8_dequant":
            return F.linear(x, self.w.to(torch.bfloat16) * self.scale_col)
        return self.mod(x)  # type: ignore[no-any-return]


@dataclass
class Stack:
    """The linear part of a decode step for one model shape and one weight format."""

    layers: list[dict[str, Linear]]
    lm_head: torch.Tensor
    hidden: int

    def step(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden
        for lay in self.layers:
            xn = F.rms_norm(x, (h,))
            q = lay["q"](xn)
            lay["k"](xn)
            lay["v"](xn)
            o = lay["o"](q)
            xn = F.rms_norm(x + o, (h,))
            g = lay["gate"](xn)
            u = lay["up"](xn)
            x = x + o + lay["down"](F.silu(g) * u)
        return F.linear(F.rms_norm(x, (h,)), self.lm_head)


def build_stack(kind: str, shape: dict[str, int], device: torch.device) -> Stack:
    h, i, hd = shape["hidden"], shape["inter"], shape["head_dim"]
    qd, kvd = shape["heads"] * hd, shape["kv_heads"] * hd
    layers = []
    for _ in range(shape["layers"]):
        layers.append(
            {
                "q": Linear(kind, qd, h, device),
                "k": Linear(kind, kvd, h, device),
                "v": Linear(kind, kvd, h, device),
                "o": Linear(kind, h, qd, device),
                "gate": Linear(kind, i, h, device),
                "up": Linear(kind, i, h, device),
                "down": Linear(kind, h, i, device),
            }
        )
    lm_head = torch.randn(shape["vocab"], h, device=device, dtype=torch.bfloat16) * (1.0 / math.sqrt(h))
    return Stack(layers, lm_head, h)


def weight_bytes(kind: str, shape: dict[str, int]) -> dict[str, float]:
    h, i, hd = shape["hidden"], shape["inter"], shape["head_dim"]
    qd, kvd = shape["heads"] * hd, shape["kv_heads"] * hd
    params = shape["layers"] * (h * qd + 2 * h * kvd + qd * h + 3 * h * i)
    return {
        "linear_params": params,
        "linear_bytes": params * BITS[kind] / 8,
        "lm_head_bytes": shape["vocab"] * h * 2,
    }


# ---------------------------------------------------------------------------- measurement
def measure(
    fn: Callable[[], Any], meter: Meter | None, window_s: float, idle_w: float | None, use_graph: bool
) -> dict[str, Any]:
    """Time (and meter) repeated calls of ``fn`` for about ``window_s`` seconds."""
    run: Callable[[], Any] = fn
    graph_used = False
    if use_graph and torch.cuda.is_available():
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            run = g.replay
            graph_used = True
        except Exception as e:  # some kernels cannot be captured: time them eagerly
            print(f"    graph capture failed ({type(e).__name__}: {str(e)[:120]}); eager", flush=True)
            torch.cuda.synchronize()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(3):
        run()
    sync()
    t0 = time.perf_counter()
    for _ in range(5):
        run()
    sync()
    est = max((time.perf_counter() - t0) / 5, 1e-6)
    iters = max(10, int(window_s / est))
    res: dict[str, Any] = {"graph": graph_used, "iters": iters}
    if meter is not None and meter.handle is not None:
        u0, c0 = meter.next_update()
        t_start = time.perf_counter()
        for _ in range(iters):
            run()
        sync()
        t_end = time.perf_counter()
        u1, c1 = meter.next_update()
        tail_s = max(0.0, u1 - t_end)
        lead_s = max(0.0, t_start - u0)
        energy_j = (c1 - c0) / 1000.0 - (idle_w or 0.0) * (tail_s + lead_s)
        res.update(
            step_s=(t_end - t_start) / iters,
            step_j=energy_j / iters,
            window_s=t_end - t_start,
            avg_power_w=energy_j / (t_end - t_start),
            tail_s=tail_s,
        )
    else:
        t_start = time.perf_counter()
        for _ in range(iters):
            run()
        sync()
        t_end = time.perf_counter()
        res.update(step_s=(t_end - t_start) / iters, step_j=None, window_s=t_end - t_start, avg_power_w=None)
    return res


def idle_power(meter: Meter | None, seconds: float = 2.0) -> float | None:
    if meter is None or meter.handle is None:
        return None
    torch.cuda.synchronize()
    time.sleep(0.5)
    u0, c0 = meter.next_update()
    time.sleep(seconds)
    u1, c1 = meter.next_update()
    return (c1 - c0) / 1000.0 / (u1 - u0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen3-0.6b,qwen3-8b")
    ap.add_argument("--kernels", default=",".join(KERNELS))
    ap.add_argument("--batches", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--contexts", default="512,2048", help="context lengths for the attention probe")
    ap.add_argument("--window-s", type=float, default=1.5, help="measurement window per point")
    ap.add_argument("--device-index", type=int, default=0)
    ap.add_argument("--no-graph", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    device = torch.device(f"cuda:{args.device_index}" if torch.cuda.is_available() else "cpu")
    meter = Meter(args.device_index) if device.type == "cuda" else None
    batches = [int(b) for b in args.batches.split(",")]
    out: dict[str, Any] = {
        "schema_version": 1,
        "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "host": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "driver": _driver(meter),
        },
        "method": {
            "window_s": args.window_s,
            "cuda_graph": not args.no_graph,
            "energy": "NVML nvmlDeviceGetTotalEnergyConsumption at update instants, idle-corrected tail",
        },
        "idle_power_w": idle_power(meter),
        "models": {},
    }
    print(f"calibrate: {out['host']}, idle {out['idle_power_w']} W", flush=True)
    torch.manual_seed(0)
    for model in args.models.split(","):
        shape = SHAPES[model]
        mres: dict[str, Any] = {"shape": shape, "kernels": {}, "attention": []}
        out["models"][model] = mres
        for kind in args.kernels.split(","):
            print(f"{model} {kind}", flush=True)
            entry: dict[str, Any] = {"bits": BITS[kind], **weight_bytes(kind, shape), "points": []}
            mres["kernels"][kind] = entry
            try:
                stack = build_stack(kind, shape, device)
                for b in batches:
                    x = torch.randn(b, shape["hidden"], device=device, dtype=torch.bfloat16)
                    r = measure(
                        lambda x=x, stack=stack: stack.step(x),
                        meter,
                        args.window_s,
                        out["idle_power_w"],
                        not args.no_graph and kind not in NO_GRAPH,
                    )
                    r["batch"] = b
                    if r["step_j"] is not None:
                        r["j_per_token"] = r["step_j"] / b
                    entry["points"].append(r)
                    print(
                        f"  b={b:>3} step {r['step_s'] * 1e3:8.3f} ms  "
                        f"energy {r['step_j'] if r['step_j'] is None else round(r['step_j'], 4)} J "
                        f"graph={r['graph']}",
                        flush=True,
                    )
            except Exception as e:
                entry["error"] = f"{type(e).__name__}: {e}"[:500]
                traceback.print_exc()
            finally:
                stack = None
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            _save(args.out, out)
        # attention: one layer's BF16 decode attention over a KV cache
        for ctx in [int(c) for c in args.contexts.split(",")]:
            for b in batches:
                try:
                    q = torch.randn(
                        b, shape["heads"], 1, shape["head_dim"], device=device, dtype=torch.bfloat16
                    )
                    kv = torch.randn(
                        b, shape["kv_heads"], ctx, shape["head_dim"], device=device, dtype=torch.bfloat16
                    )
                    r = measure(
                        lambda q=q, kv=kv: F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True),
                        meter,
                        min(args.window_s, 0.6),
                        out["idle_power_w"],
                        not args.no_graph,
                    )
                    r.update(batch=b, context=ctx)
                    mres["attention"].append(r)
                    del q, kv
                except Exception as e:
                    mres["attention"].append(
                        {"batch": b, "context": ctx, "error": f"{type(e).__name__}: {e}"[:500]}
                    )
            print(f"  attention ctx={ctx} done", flush=True)
        _save(args.out, out)
    print(f"calibrate: wrote {args.out}", flush=True)


def _driver(meter: Meter | None) -> str | None:
    if meter is None or meter.handle is None:
        return None
    v = meter.nvml.nvmlSystemGetDriverVersion()
    return v.decode() if isinstance(v, bytes) else str(v)


def _save(path: str, obj: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


if __name__ == "__main__":
    main()
