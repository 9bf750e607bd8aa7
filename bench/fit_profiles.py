"""Fit qtrap_sim's GPU profiles to calibration files written by bench/gpu/calibrate.py.

    .venv/bin/python bench/fit_profiles.py docs/calibration/h100-qwen3-0.6b.json \
        docs/calibration/h100-qwen3-8b.json --gpu h100 --out qtrap_sim/profiles/h100.json

Per (model shape, kernel) it fits the step-time model

    t(rows) = t0 + smoothmax_p(A, B * rows) + C * rows

(t0: fixed per-step overhead; A: streaming the weights once; B: compute per row;
C: per-row dequantisation / activation quantisation; p: sharpness of the
memory-to-compute transition), by least squares on log time, and the energy model

    E(rows) = P_idle * t(rows) + e0 + e1 * rows

(e0: energy of moving the weights once per step; e1: energy per row through the
GEMMs, dequantisation included), by weighted linear least squares on J/token.
Kernels whose measurements the smooth model cannot follow (bitsandbytes switches
algorithms with batch size; its int8 path is bound by host launches) keep a
per-batch correction table, so the simulator reproduces the measurements; the
parametric error is reported separately. Attention (BF16 SDPA decode) is fitted
per layer as a0 + a1 * (sum of context tokens), energy P_idle * t + ea * ctx.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import least_squares


def _time_model(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    t0, a, b, c, p = x
    return t0 + (a**p + (b * rows) ** p) ** (1.0 / p) + c * rows


def fit_kernel(points: list[dict[str, Any]], idle_w: float) -> dict[str, Any]:
    rows = np.array([p["batch"] for p in points], float)
    t = np.array([p["step_s"] for p in points])
    e = np.array([p["step_j"] for p in points])
    best = None
    for p0 in (2.0, 4.0, 8.0):
        x0 = [t[0] * 0.1, t[0] * 0.8, t[-1] / rows[-1] * 0.5, t[-1] / rows[-1] * 0.1, p0]
        r = least_squares(
            lambda x: np.log(_time_model(x, rows)) - np.log(t), x0, bounds=([0, 0, 0, 0, 1], [1, 1, 1, 1, 20])
        )
        if best is None or r.cost < best.cost:
            best = r
    assert best is not None
    x = best.x
    tp = _time_model(x, rows)
    design = np.stack([np.ones_like(rows), rows], 1)
    w = 1.0 / e
    coef, *_ = np.linalg.lstsq(design * w[:, None], (e - idle_w * t) * w, rcond=None)
    coef = np.maximum(coef, 0.0)
    ep = idle_w * tp + design @ coef
    t_ratio, e_ratio = t / tp, e / ep
    param_t_err = float(np.abs(1 / t_ratio - 1).max())
    param_e_err = float(np.abs(1 / e_ratio - 1).max())
    needs_table = param_t_err > 0.10 or param_e_err > 0.10
    return {
        "time": {
            "t0_s": x[0],
            "weights_s": x[1],
            "compute_s_per_row": x[2],
            "quant_s_per_row": x[3],
            "p": x[4],
        },
        "energy": {"step_j": coef[0], "row_j": coef[1]},
        "correction": {
            "batches": rows.astype(int).tolist(),
            "time": t_ratio.round(5).tolist() if needs_table else [1.0] * len(rows),
            "energy": e_ratio.round(5).tolist() if needs_table else [1.0] * len(rows),
        },
        "fit_error": {
            "parametric_time_max": round(param_t_err, 4),
            "parametric_j_per_token_max": round(param_e_err, 4),
        },
        "measured": [
            {"batch": int(r), "step_s": float(tt), "step_j": float(ee)}
            for r, tt, ee in zip(rows, t, e, strict=True)
        ],
    }


def fit_attention(points: list[dict[str, Any]], layers: int, idle_w: float) -> dict[str, Any]:
    ok = [p for p in points if "step_s" in p and p.get("step_j") is not None]
    ctx = np.array([p["batch"] * p["context"] for p in ok], float)
    t = np.array([p["step_s"] for p in ok])
    e = np.array([p["step_j"] for p in ok])
    design = np.stack([np.ones_like(ctx), ctx], 1)
    w = 1.0 / t
    (a0, a1), *_ = np.linalg.lstsq(design * w[:, None], t * w, rcond=None)
    ea = float(max(0.0, np.linalg.lstsq(ctx[:, None] / e[:, None], (e - idle_w * t) / e, rcond=None)[0][0]))
    tp = a0 + a1 * ctx
    return {
        "layers": layers,
        "a0_s": float(max(a0, 0.0)),
        "a1_s_per_ctx_token": float(max(a1, 0.0)),
        "e_j_per_ctx_token": ea,
        "fit_error": {"time_max": round(float(np.abs(tp / t - 1).max()), 4)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--gpu", default="h100")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    profile: dict[str, Any] = {"schema_version": 1, "gpu": args.gpu, "sources": [], "models": {}}
    idles = []
    for f in args.files:
        data = json.loads(Path(f).read_text())
        idle = float(data["idle_power_w"])
        idles.append(idle)
        profile["sources"].append(
            {"file": f, "gpu": data["host"]["gpu"], "created_utc": data["created_utc"], "idle_power_w": idle}
        )
        for model, m in data["models"].items():
            entry: dict[str, Any] = {"shape": m["shape"], "kernels": {}}
            for kind, k in m["kernels"].items():
                if k.get("error") or not k["points"]:
                    continue
                entry["kernels"][kind] = {
                    "bits": k["bits"],
                    "linear_bytes": k["linear_bytes"],
                    "lm_head_bytes": k["lm_head_bytes"],
                    **fit_kernel(k["points"], idle),
                }
            entry["attention"] = fit_attention(m["attention"], m["shape"]["layers"], idle)
            profile["models"][model] = entry
            for kind, k in entry["kernels"].items():
                fe = k["fit_error"]
                print(
                    f"{model:11} {kind:14} parametric max error: time {fe['parametric_time_max'] * 100:5.1f}%, "
                    f"J/token {fe['parametric_j_per_token_max'] * 100:5.1f}%"
                    f"{'  (correction table)' if any(v != 1.0 for v in k['correction']['time']) else ''}"
                )
            print(
                f"{model:11} attention      time max error {entry['attention']['fit_error']['time_max'] * 100:.1f}%"
            )
    profile["idle_power_w"] = round(sum(idles) / len(idles), 2)
    Path(args.out).write_text(json.dumps(profile, indent=1, default=lambda v: float(v)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
