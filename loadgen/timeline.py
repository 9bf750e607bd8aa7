"""A schedule run's figures: per time window and for the whole run (``ScheduleRun`` in loadgen/schema.py).

Energy is the fleet's: the sum over every device the proxy meters of its energy counter (``metered_j`` of
``GET /qtrap/v1/energy``), read before the run, every window and after the drain, and interpolated
linearly in time to the window edges. Idle devices and idle time count: this is what the fleet drew while
it served the schedule, whatever the routing. docs/methodology.md ("Schedules") defines each figure.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from loadgen.analysis import Bootstrap, _ci, _counter_j
from loadgen.scheduled import ScheduleResult

QS = (50, 90, 99)


def _fleet_series(snapshots: Sequence[dict[str, Any] | None]) -> tuple[list[str], list[tuple[float, float]]]:
    """(devices, [(t, summed counter)]) over the snapshots holding every device of the first and last."""
    snaps = [s for s in snapshots if s is not None and s.get("devices")]
    if len(snaps) < 2:
        return [], []
    devices = sorted(set(snaps[0]["devices"]) & set(snaps[-1]["devices"]))
    series = []
    for s in snaps:
        if all(d in s["devices"] for d in devices):
            try:
                series.append((float(s["t"]), sum(_counter_j(s["devices"][d]) for d in devices)))
            except (KeyError, TypeError, ValueError):
                continue
    return devices, series


def _at(series: list[tuple[float, float]], t: float) -> float | None:
    """The fleet counter at ``t`` by linear interpolation; None outside the readings."""
    if not series or t < series[0][0] - 1e-6 or t > series[-1][0] + 1e-6:
        return None
    for (t0, e0), (t1, e1) in itertools.pairwise(series):
        if t0 <= t <= t1:
            return e0 if t1 == t0 else e0 + (e1 - e0) * (t - t0) / (t1 - t0)
    return series[0][1] if t <= series[0][0] else series[-1][1]


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return max(0.0, min(a1, b1) - max(a0, b0))


def _latency(values: list[float], boot: int, rng: np.random.Generator) -> dict[str, Any]:
    out: dict[str, Any] = {}
    arr = np.asarray(values, dtype=float)
    reps = None
    if len(arr) >= 10 and boot >= 10:
        b = max(10, min(boot, int(2e7 // len(arr))))  # bounded memory for long runs
        reps = np.percentile(arr[rng.integers(0, len(arr), size=(b, len(arr)))], QS, axis=1)
    for i, q in enumerate(QS):
        out[f"p{q}"] = float(np.percentile(arr, q)) if len(arr) else None
        out[f"p{q}_ci"] = _ci(reps[i]) if reps is not None else None
    return out


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarise(
    result: ScheduleResult,
    snapshots: Sequence[dict[str, Any] | None],
    *,
    model: str,
    window_s: float,
    scored: bool = True,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """``ScheduleRun``'s fields from a run and the energy snapshots taken during it."""
    plan = result.plan
    t0, t_sched, t_end = result.t0, result.t_sched_end or result.t_end, result.t_end
    chains = result.run.chains
    exchanges = [e for c in chains for e in c.exchanges]
    devices, series = _fleet_series(snapshots)
    null_reason = (
        None
        if series
        else "the proxy's GET /qtrap/v1/energy gave no device counters (no meter, or it did not answer)"
    )
    windows = []
    n = max(1, math.ceil((t_end - t0) / window_s - 1e-9))
    for k in range(n):
        a, b = t0 + k * window_s, min(t0 + (k + 1) * window_s, t_end)
        span = max(b - a, 1e-9)
        ended = [e for e in exchanges if a <= e.t_end < b or (k == n - 1 and e.t_end == b)]
        tokens = 0.0
        for e in exchanges:
            if e.status != "ok" or e.t_first is None:
                continue
            width = e.t_end - e.t_first
            toks = e.completion_tokens or 0
            tokens += toks * (
                _overlap(e.t_first, e.t_end, a, b) / width if width > 0 else float(a <= e.t_end < b)
            )
        ea, eb = _at(series, a), _at(series, b)
        energy = eb - ea if ea is not None and eb is not None else None
        done = [c for c in chains if c.t_end and (a <= c.t_end < b or (k == n - 1 and c.t_end == b))]
        correct = sum(1 for c in done if c.score is not None and c.score.strict) if scored else None
        s0, s1 = min(a, t_sched) - t0, min(b, t_sched) - t0
        offered = plan.schedule.mean(s0, s1) * (s1 - s0) / span if s1 > s0 else 0.0
        windows.append(
            {
                "t_start_s": a - t0,
                "t_end_s": b - t0,
                "offered": offered,
                "chains_in_flight": sum(_overlap(c.t_start, c.t_end or t_end, a, b) for c in chains) / span,
                "requests_in_flight": sum(_overlap(e.t_send, e.t_end, a, b) for e in exchanges) / span,
                "requests_started": sum(1 for e in exchanges if a <= e.t_send < b),
                "requests_ended": len(ended),
                "errors": sum(1 for e in ended if e.status != "ok"),
                "tokens": tokens,
                "tokens_per_s": tokens / span,
                "energy_j": energy,
                "energy_null_reason": None
                if energy is not None
                else (null_reason or "no counter reading spans the window"),
                "j_per_token": _div(energy, tokens),
                "chains_ended": len(done),
                "correct": correct,
                "j_per_correct": _div(energy, correct),
            }
        )
    ok = [e for e in exchanges if e.status == "ok"]
    chains_ok = [c for c in chains if c.ok]
    tokens_total = sum(e.completion_tokens or 0 for e in ok)
    fleet = series[-1][1] - series[0][1] if series else None
    by_device: dict[str, float] = {}
    firsts = [s for s in snapshots if s is not None and s.get("devices")]
    if series:
        for d in devices:
            by_device[d] = _counter_j(firsts[-1]["devices"][d]) - _counter_j(firsts[0]["devices"][d])
    attributed, unknown = 0.0, 0
    for e in ok:
        rec = e.record or {}
        if rec.get("final") and rec.get("energy_j") is not None:
            attributed += float(rec["energy_j"])
        else:
            unknown += 1
    correct_total = sum(1 for c in chains_ok if c.score is not None and c.score.strict) if scored else None
    acc = _div(float(correct_total), len(chains_ok)) if correct_total is not None else None
    acc_ci = jpc_ci = None
    if scored and chains_ok:
        rows = np.asarray([[float(bool(c.score and c.score.strict))] for c in chains_ok])
        reps = Bootstrap(bootstrap, seed).resample(f"schedule:{plan.label}", [rows])[:, 0]
        acc_ci = _ci(reps / len(chains_ok))
        if fleet is not None:
            with np.errstate(divide="ignore"):
                jpc = np.where(reps > 0, fleet / np.where(reps > 0, reps, 1.0), np.inf)
            jpc_ci = _ci(jpc) if np.isfinite(jpc).mean() >= 0.95 else None
    precision_requests: dict[str, int] = {}
    for e in ok:
        p = (e.record or {}).get("precision") or e.precision or "unknown"
        precision_requests[p] = precision_requests.get(p, 0) + 1
    rng = np.random.default_rng([seed, 17])
    duration = t_end - t0
    totals = {
        "duration_s": duration,
        "schedule_s": t_sched - t0,
        "chains": len(chains),
        "chains_ok": len(chains_ok),
        "correct": correct_total,
        "accuracy": acc,
        "accuracy_ci": acc_ci,
        "requests": len(exchanges),
        "errors": len(exchanges) - len(ok),
        "tokens": tokens_total,
        "tokens_per_s": _div(float(tokens_total), duration),
        "fleet_energy_j": fleet,
        "fleet_energy_null_reason": null_reason,
        "energy_by_device": by_device,
        "attributed_energy_j": attributed if ok and unknown < len(ok) else None,
        "energy_unknown_requests": unknown,
        "j_per_token": _div(fleet, tokens_total),
        "j_per_correct": _div(fleet, correct_total),
        "j_per_correct_ci": jpc_ci,
        "ttft_s": _latency([e.ttft_s for e in ok if e.ttft_s is not None], bootstrap, rng),
        "e2e_s": _latency([e.e2e_s for e in ok], bootstrap, rng),
        "precision_requests": dict(sorted(precision_requests.items())),
        "precision_share": {p: c / len(ok) for p, c in sorted(precision_requests.items())},
    }
    return {
        "label": plan.label,
        "model": model,
        "schedule": plan.schedule.spec,
        "unit": plan.unit,
        "arrivals": None if plan.unit == "concurrency" else plan.arrivals,
        "window_s": window_s,
        "interrupted": result.run.interrupted,
        "windows": windows,
        "totals": totals,
    }
