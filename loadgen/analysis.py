"""From replayed chains and final ledger records to the figures of report.json.

Definitions (docs/methodology.md explains each):

* window requests: a level's requests that started and ended inside its steady-state
  window and have a final, known energy figure;
* J/token = sum of their energy / sum of their completion tokens;
* J/chain = sum of their energy / sum over them of 1/H (H: hops of the request's chain),
  each request being 1/H of a chain, so in steady state the denominator counts the chains
  the window completed;
* accuracy of a precision = correct / scored over its measured chains at every level (the
  answer does not depend on the load, so pooling narrows the interval; per-level accuracy is
  reported too); J per correct answer = J/chain / accuracy of the precision;
* confidence intervals: percentile bootstrap, resampling repeats and then chains within a
  repeat (chains are the independent units; hops of a chain are not), with the same
  replicate index across levels so B* gets an interval too.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loadgen.runner import LevelRun
from qtrap_common.precision import BASELINES, BITS

METRICS = ("j_per_correct", "j_per_token")
MIN_BSTAR_COVERAGE = 0.9  # B* is a number only when at least this share of replicates agrees on it
EDGE_TOLERANCE = 0.01  # an interval end within 1% of the lowest or highest swept concurrency touches the edge
MIN_MEASURED_WINDOW_S = 2.0  # shortest window (summed over repeats) for the measured J/token cross-check


@dataclass(slots=True)
class ChainObs:
    """One measured chain reduced to what the statistics need."""

    repeat: int
    hops: int
    scored: bool
    correct: bool
    correct_flexible: bool
    energy_j: float = 0.0  # of its window requests
    tokens: int = 0  # completion tokens of its window requests
    chain_frac: float = 0.0  # its window requests / hops
    index: int = 0  # position in the level's problem sequence (the same problem at every precision)


@dataclass(slots=True)
class LevelObs:
    precision: str
    concurrency: int
    chains: list[ChainObs] = field(default_factory=list)  # measured (non-warm-up) chains
    window_chains: list[ChainObs] = field(default_factory=list)  # chains with window requests (any)
    requests: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    window_s: float = 0.0
    window_requests: int = 0
    window_ended: int = 0  # successful requests that ended inside the window (requests/s)
    window_tokens_prorata: float = 0.0
    energy_unknown: int = 0
    energy_unknown_reason: str | None = None
    # the proxy's carbon and cost figures of the window requests whose energy is known (records' co2e_g,
    # cost): sums of those known, counts of those not, the most common reasons, the currencies seen
    co2e_g: float = 0.0
    co2e_known: int = 0
    co2e_unknown: int = 0
    co2e_reasons: dict[str, int] = field(default_factory=dict)
    cost: float = 0.0
    cost_known: int = 0
    cost_unknown: int = 0
    cost_reasons: dict[str, int] = field(default_factory=dict)
    currencies: set[str] = field(default_factory=set)
    measured_window_j: float | None = None
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    interrupted: bool = False
    repeats: int = 0
    by_hop: dict[int, list[float]] = field(default_factory=dict)  # hop -> [window requests, energy, tokens]
    windows: list[tuple[float, float]] = field(default_factory=list)  # (open, close), time.monotonic()
    timeline: dict[str, Any] | None = None  # the first repeat over time (level_timeline)


def observe(runs: Sequence[LevelRun], snapshots: dict[int, tuple[Any, Any]] | None = None) -> LevelObs:
    """Reduce the repeats of one (precision, concurrency) level."""
    first = runs[0]
    obs = LevelObs(first.precision, first.concurrency, repeats=len(runs))
    reasons: dict[str, int] = {}
    for run in runs:
        obs.interrupted |= run.interrupted
        w0, w1 = run.window if run.window is not None else (math.inf, -math.inf)
        obs.window_s += max(0.0, w1 - w0)
        if run.window is not None:
            obs.windows.append(run.window)
        for chain in run.chains:
            per_chain = ChainObs(
                run.repeat,
                chain.problem.hops,
                chain.ok,
                bool(chain.score and chain.score.strict),
                bool(chain.score and chain.score.flexible),
                index=chain.index,
            )
            in_window = False
            for ex in chain.exchanges:
                obs.requests += 1
                if ex.status != "ok":
                    obs.errors += 1
                    kind = (ex.error or "error").split(":")[0]
                    obs.error_kinds[kind] = obs.error_kinds.get(kind, 0) + 1
                    continue
                tokens = ex.completion_tokens or 0
                if w0 <= ex.t_end <= w1:
                    obs.window_ended += 1
                if not chain.warmup:
                    obs.tokens += tokens
                    if ex.ttft_s is not None:
                        obs.ttft.append(ex.ttft_s)
                    if ex.itl_s is not None:
                        obs.itl.append(ex.itl_s)
                    obs.e2e.append(ex.e2e_s)
                if w1 > w0 and ex.t_first is not None:
                    overlap = max(0.0, min(ex.t_end, w1) - max(ex.t_first, w0))
                    span = ex.t_end - ex.t_first
                    obs.window_tokens_prorata += tokens * (
                        overlap / span if span > 0 else float(w0 <= ex.t_end <= w1)
                    )
                if not (w0 <= ex.t_send and ex.t_end <= w1):
                    continue
                rec = ex.record or {}
                energy = rec.get("energy_j") if rec.get("final") else None
                if energy is None:
                    obs.energy_unknown += 1
                    why = rec.get("energy_null_reason") or (
                        "no final record" if rec else "no record from the proxy"
                    )
                    reasons[why] = reasons.get(why, 0) + 1
                    continue
                in_window = True
                obs.window_requests += 1
                _footprint(obs, rec)
                got = int(rec.get("completion_tokens") or tokens)
                per_chain.energy_j += float(energy)
                per_chain.tokens += got
                hop = obs.by_hop.setdefault(ex.hop, [0, 0.0, 0])
                hop[0] += 1
                hop[1] += float(energy)
                hop[2] += got
                per_chain.chain_frac += 1.0 / max(1, chain.planned)
            if not chain.warmup and (chain.ok or chain.exchanges) and not (run.interrupted and not chain.ok):
                obs.chains.append(per_chain)
            if in_window:
                obs.window_chains.append(per_chain)
    if reasons:
        obs.energy_unknown_reason = max(reasons.items(), key=lambda kv: kv[1])[0]
    if snapshots:
        total = 0.0
        devices = {
            d for run in runs for ex in run.exchanges if ex.record for d in ex.record.get("devices") or []
        }
        for run in runs:
            pair = snapshots.get(id(run))
            if pair is None or pair[0] is None or pair[1] is None or not devices:
                total = math.nan
                break
            a, b = pair
            for d in devices:
                if d not in a["devices"] or d not in b["devices"]:
                    total = math.nan
                    break
                total += _counter_j(b["devices"][d]) - _counter_j(a["devices"][d])
        obs.measured_window_j = None if math.isnan(total) else total
    first_pair = (snapshots or {}).get(id(first))
    obs.timeline = level_timeline(first, first_pair)
    return obs


TIMELINE_BINS = 80  # at most this many bins per level
_BIN_STEPS = (0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def _spread(series: list[float], t0: float, bin_s: float, a: float, b: float, amount: float) -> None:
    """Add ``amount`` spread evenly over [a, b] (seconds on the level's clock) to the bins of ``series``;
    all of it to the bin of ``b`` when the span is empty."""
    n = len(series)
    if b <= a:
        series[min(n - 1, max(0, int((b - t0) / bin_s)))] += amount
        return
    rate = amount / (b - a)
    i = max(0, int((a - t0) / bin_s))
    while i < n:
        lo, hi = t0 + i * bin_s, t0 + (i + 1) * bin_s
        if lo >= b:
            break
        series[i] += rate * max(0.0, min(b, hi) - max(a, lo))
        i += 1


def level_timeline(run: LevelRun, snapshots: tuple[Any, Any] | None) -> dict[str, Any] | None:
    """One repeat of a level over time (``Level.timeline``): requests in flight, tokens/s and the requests'
    attributed power in bins of at most ``TIMELINE_BINS`` over the level, warm-up and drain included, the
    window's edges, and the devices' mean measured power over the window (the counters' snapshots)."""
    t0 = run.t_start
    length = run.t_end - t0
    exchanges = run.exchanges
    if length <= 0 or not exchanges:
        return None
    bin_s = next((b for b in _BIN_STEPS if length / b <= TIMELINE_BINS), _BIN_STEPS[-1])
    n = max(1, math.ceil(length / bin_s))
    in_flight = [0.0] * n
    tokens = [0.0] * n
    power = [0.0] * n
    unknown = 0
    for ex in exchanges:
        _spread(in_flight, t0, bin_s, ex.t_send, ex.t_end, ex.t_end - ex.t_send)
        if ex.status != "ok":
            continue
        if ex.t_first is not None and ex.completion_tokens:
            _spread(tokens, t0, bin_s, ex.t_first, ex.t_end, float(ex.completion_tokens))
        rec = ex.record or {}
        if rec.get("final") and rec.get("energy_j") is not None:
            _spread(power, t0, bin_s, ex.t_send, ex.t_end, float(rec["energy_j"]))
        else:
            unknown += 1
    measured = None
    devices = {d for ex in exchanges if ex.record for d in ex.record.get("devices") or []}
    if run.window is not None and snapshots and snapshots[0] and snapshots[1] and devices:
        a, b = snapshots
        w = run.window[1] - run.window[0]
        if w > 0 and all(d in a["devices"] and d in b["devices"] for d in devices):
            measured = sum(_counter_j(b["devices"][d]) - _counter_j(a["devices"][d]) for d in devices) / w
    # the last bin ends with the level: its rates are over its own length
    widths = [bin_s] * (n - 1) + [max(length - (n - 1) * bin_s, 1e-9)]
    return {
        "repeat": run.repeat,
        "bin_s": bin_s,
        "t_s": [round(i * bin_s, 6) for i in range(n)],
        "window_s": None if run.window is None else [run.window[0] - t0, run.window[1] - t0],
        "in_flight": [v / w for v, w in zip(in_flight, widths, strict=True)],
        "tokens_per_s": [v / w for v, w in zip(tokens, widths, strict=True)],
        "attributed_power_w": [v / w for v, w in zip(power, widths, strict=True)],
        "energy_unknown_requests": unknown,
        "measured_power_w": measured,
    }


def _counter_j(device: dict[str, Any]) -> float:
    """The device's energy counter as the proxy last read it: ``metered_j`` (every reading, settled or not);
    ``measured_j`` (settled intervals only, seconds behind under load) from a proxy that does not report it."""
    value = device.get("metered_j", device["measured_j"])
    return float(value)


# -- statistics ------------------------------------------------------------------------------------------


def _pct(values: Sequence[float], qs: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {f"p{q:g}": None for q in qs}
    arr = np.asarray(values)
    return {f"p{q:g}": float(np.percentile(arr, q)) for q in qs}


def _tail(values: Sequence[float]) -> dict[str, float | None]:
    """p50, p90, p99 and the mean, as `vllm bench serve` and guidellm report latencies."""
    return {**_pct(values, (50, 90, 99)), "mean": float(np.mean(values)) if values else None}


Z975 = 1.959964  # the normal 97.5% quantile


def repeat_spread(values: Sequence[float | None]) -> dict[str, Any] | None:
    """A figure's per-repeat values, their sd (n - 1), range and the half-width of the normal 95% interval
    of their mean, Z975 x sd / sqrt(n); None with fewer than two known values."""
    known = [v for v in values if v is not None and math.isfinite(v)]
    if len(known) < 2:
        return None
    sd = float(np.std(known, ddof=1))
    return {
        "values": [v if v is not None and math.isfinite(v) else None for v in values],
        "sd": sd,
        "min": min(known),
        "max": max(known),
        "range": max(known) - min(known),
        "half_width": Z975 * sd / math.sqrt(len(known)),
    }


def widen(ci: list[float] | None, point: float | None, spread: dict[str, Any] | None) -> list[float] | None:
    """The rule of docs/methodology.md ("Repeats"): the bootstrap interval, stretched to cover
    point +- 1.96 x sd / sqrt(R) of the per-repeat values when the repeats disagree more than the
    bootstrap says (that interval reaches beyond the bootstrap's); unchanged otherwise."""
    if ci is None or point is None or spread is None:
        return ci
    h = spread["half_width"]
    return [min(ci[0], point - h), max(ci[1], point + h)]


class Bootstrap:
    """Replicates shared across levels: replicate b of every level uses the b-th draw of its own data."""

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.seed = seed

    def resample(self, key: str, groups: list[np.ndarray]) -> np.ndarray:
        """Column sums over a two-stage resample (repeats, then rows within each): shape (n, cols)."""
        # crc32, not hash(): str hashes change per process (PYTHONHASHSEED); one --seed, one report
        rng = np.random.default_rng([self.seed, zlib.crc32(key.encode())])
        groups = [g for g in groups if len(g)]
        if not groups:
            return np.zeros((self.n, 0))
        cols = groups[0].shape[1]
        out = np.zeros((self.n, cols))
        if len(groups) == 1:
            g = groups[0]
            idx = rng.integers(0, len(g), size=(self.n, len(g)))
            return np.asarray(g[idx].sum(axis=1))
        for b in range(self.n):
            for r in rng.integers(0, len(groups), size=len(groups)):
                g = groups[r]
                out[b] += g[rng.integers(0, len(g), size=len(g))].sum(axis=0)
        return out


def _ci(reps: np.ndarray, level: float = 0.95) -> list[float] | None:
    reps = reps[np.isfinite(reps)]
    if len(reps) < 10:
        return None
    lo, hi = np.percentile(reps, [50 * (1 - level), 100 - 50 * (1 - level)])
    return [float(lo), float(hi)]


def _safe_div(a: float, b: float) -> float | None:
    return a / b if b else None


def _by_repeat(chains: list[ChainObs], cols: Any) -> list[np.ndarray]:
    groups: dict[int, list[list[float]]] = {}
    for c in chains:
        groups.setdefault(c.repeat, []).append(cols(c))
    return [np.asarray(v, dtype=float) for _, v in sorted(groups.items())]


@dataclass(slots=True)
class Analysis:
    levels: list[dict[str, Any]]
    crossovers: list[dict[str, Any]]
    indices: list[dict[str, Any]]
    baseline: str | None
    accuracy: dict[str, dict[str, Any]]
    replicates: dict[tuple[str, int, str], np.ndarray]
    accuracy_null_reason: str | None = None  # set when answers were not scored (--no-score)


def analyse(
    observations: Sequence[LevelObs],
    *,
    baseline: str | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    index_weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3),
    accuracy_null_reason: str | None = None,
) -> Analysis:
    """The report's figures. ``accuracy_null_reason`` (``--no-score``): answers were not scored, so every
    accuracy, J per correct answer, the indices built on them and B* on J per correct answer are null
    (or left out) with that reason; J/token, B* on it and the casting overhead are unaffected."""
    boot = Bootstrap(bootstrap, seed)
    scored_run = accuracy_null_reason is None
    precisions = list(dict.fromkeys(o.precision for o in observations))
    if baseline is None:
        baseline = next((b for b in BASELINES if b in precisions), None)
    # accuracy pooled per precision, with replicates
    accuracy: dict[str, dict[str, Any]] = {}
    acc_reps: dict[str, np.ndarray] = {}
    keys_of: dict[str, list[tuple[int, int, int]]] = {}
    for p in precisions:
        keys_of[p] = [
            (o.concurrency, c.repeat, c.index)
            for o in observations
            if o.precision == p
            for c in o.chains
            if c.scored
        ]
    for p in precisions:
        chains = [c for o in observations if o.precision == p for c in o.chains if c.scored]
        n = len(chains)
        if not scored_run:
            acc_reps[p] = np.full(boot.n, np.nan)
            accuracy[p] = {
                "chains": n,
                "correct": None,
                "accuracy": None,
                "accuracy_flexible": None,
                "ci": None,
                "by_hops": {},
                "null_reason": accuracy_null_reason,
            }
            continue
        correct = sum(c.correct for c in chains)
        # paired: every precision replays the same problems in the same order, so when the scored chains
        # match, replicate b resamples the same problems for each precision (the accuracy ratio's
        # interval then reflects the difference between precisions, not the spread of problem difficulty)
        paired = baseline is not None and keys_of[p] == keys_of.get(baseline)
        reps = boot.resample(
            "acc" if paired else f"acc:{p}", _by_repeat(chains, lambda c: [1.0, float(c.correct)])
        )
        acc_reps[p] = reps[:, 1] / reps[:, 0] if reps.shape[1] else np.full(boot.n, np.nan)
        by_hops: dict[int, list[int]] = {}
        for c in chains:
            by_hops.setdefault(c.hops, [0, 0])
            by_hops[c.hops][0] += 1
            by_hops[c.hops][1] += int(c.correct)
        accuracy[p] = {
            "chains": n,
            "correct": correct,
            "accuracy": _safe_div(correct, n),
            "accuracy_flexible": _safe_div(sum(c.correct_flexible for c in chains), n),
            "ci": _ci(acc_reps[p]) if n else None,
            "by_hops": {
                str(h): {"chains": v[0], "correct": v[1], "accuracy": v[1] / v[0]}
                for h, v in sorted(by_hops.items())
            },
            "null_reason": None,
        }
    # per precision and repeat: the accuracy of that repeat's chains (J per correct answer per repeat)
    acc_by_repeat: dict[str, dict[int, float | None]] = {}
    for p in precisions:
        tally: dict[int, list[int]] = {}
        for o in observations:
            if o.precision != p:
                continue
            for c in o.chains:
                if c.scored:
                    t = tally.setdefault(c.repeat, [0, 0])
                    t[0] += 1
                    t[1] += int(c.correct)
        acc_by_repeat[p] = {r: (v[1] / v[0] if scored_run and v[0] else None) for r, v in tally.items()}
    levels: list[dict[str, Any]] = []
    replicates: dict[tuple[str, int, str], np.ndarray] = {}
    for o in observations:
        energy = sum(c.energy_j for c in o.window_chains)
        tokens = sum(c.tokens for c in o.window_chains)
        frac = sum(c.chain_frac for c in o.window_chains)
        acc_p = accuracy[o.precision]["accuracy"]
        known = o.window_requests > 0
        reps = boot.resample(
            f"lvl:{o.precision}:{o.concurrency}",
            _by_repeat(o.window_chains, lambda c: [c.energy_j, float(c.tokens), c.chain_frac]),
        )
        if known and reps.shape[1]:
            with np.errstate(divide="ignore", invalid="ignore"):
                jpt = reps[:, 0] / reps[:, 1]
                jpc = reps[:, 0] / reps[:, 2]
                jpcorr = jpc / acc_reps[o.precision]
        else:
            jpt = jpc = jpcorr = np.full(boot.n, np.nan)
        replicates[(o.precision, o.concurrency, "j_per_token")] = jpt
        replicates[(o.precision, o.concurrency, "j_per_correct")] = jpcorr
        scored = [c for c in o.chains if c.scored]
        level_hops: dict[int, list[int]] = {}
        for c in scored:
            level_hops.setdefault(c.hops, [0, 0])
            level_hops[c.hops][0] += 1
            level_hops[c.hops][1] += int(c.correct)
        j_per_chain = _safe_div(energy, frac) if known else None
        j_per_correct = (j_per_chain / acc_p) if j_per_chain is not None and acc_p else None
        spread = _repeat_figures(o, acc_by_repeat[o.precision]) if o.repeats > 1 else None
        boot_ci = {
            "j_per_token": _ci(jpt) if known else None,
            "j_per_chain": _ci(jpc) if known else None,
            "j_per_correct": _ci(jpcorr) if known else None,
        }
        ci = dict(boot_ci)
        widened = []
        if spread is not None:
            points = {"j_per_token": _safe_div(energy, tokens) if known else None, "j_per_chain": j_per_chain,
                      "j_per_correct": j_per_correct}  # fmt: skip
            for metric, point in points.items():
                ci[metric] = widen(boot_ci[metric], point, spread.get(metric))
                if ci[metric] != boot_ci[metric]:
                    widened.append(metric)
        level: dict[str, Any] = {
            "precision": o.precision,
            "concurrency": o.concurrency,
            "repeats": o.repeats,
            "chains": len(o.chains),
            "chains_ok": len(scored),
            "chains_scored": len(scored) if scored_run else 0,
            "requests": o.requests,
            "errors": o.errors,
            "error_kinds": o.error_kinds,
            "tokens": o.tokens,
            "window_s": o.window_s,
            "windows_monotonic_s": [list(w) for w in o.windows],
            "window_requests": o.window_requests,
            "energy_j": energy if known else None,
            "energy_null_reason": None
            if known
            else (o.energy_unknown_reason or "no request completed inside the steady-state window"),
            "energy_unknown_requests": o.energy_unknown,
            **_footprint_fields(o, known),
            "j_per_token": _safe_div(energy, tokens) if known else None,
            "j_per_request": energy / o.window_requests if known else None,
            "j_per_chain": j_per_chain,
            "j_per_correct": j_per_correct,
            # counters move about every 100 ms: over a window of a few periods the cross-check is noise
            "measured_j_per_token": _safe_div(o.measured_window_j, o.window_tokens_prorata)
            if o.measured_window_j is not None and o.window_s >= MIN_MEASURED_WINDOW_S
            else None,
            "energy_by_hop": {
                str(h): {
                    "requests": int(v[0]),
                    "energy_j": v[1],
                    "tokens": int(v[2]),
                    "j_per_request": v[1] / v[0],
                    "j_per_token": _safe_div(v[1], v[2]),
                }
                for h, v in sorted(o.by_hop.items())
            },
            "accuracy": _safe_div(sum(c.correct for c in scored), len(scored)) if scored_run else None,
            "accuracy_flexible": _safe_div(sum(c.correct_flexible for c in scored), len(scored))
            if scored_run
            else None,
            "accuracy_by_hops": {str(h): v[1] / v[0] for h, v in sorted(level_hops.items())}
            if scored_run
            else {},
            "accuracy_null_reason": accuracy_null_reason,
            "tokens_per_s": o.window_tokens_prorata / o.window_s if o.window_s > 0 else None,
            "requests_per_s": o.window_ended / o.window_s if o.window_s > 0 else None,
            "ttft_s": _tail(o.ttft),
            "itl_s": _tail(o.itl),
            "e2e_s": _tail(o.e2e),
            "ci": {"level": 0.95, **ci, "bootstrap": boot_ci if widened else None, "widened": widened},
            "repeat_spread": spread,
            "timeline": o.timeline,
            "interrupted": o.interrupted,
        }
        levels.append(level)
    metrics = METRICS if scored_run else ("j_per_token",)
    crossovers = [] if baseline is None else _crossovers(levels, replicates, baseline, metrics)
    indices = [] if baseline is None else _indices(levels, accuracy, baseline, index_weights)
    return Analysis(levels, crossovers, indices, baseline, accuracy, replicates, accuracy_null_reason)


def _repeat_figures(o: LevelObs, acc_by_repeat: dict[int, float | None]) -> dict[str, Any]:
    """Each repeat's J/token, J/chain and J per correct answer (its chains' accuracy at this precision
    over every level of the repeat), and their spread (``repeat_spread``)."""
    sums: dict[int, list[float]] = {}
    for c in o.window_chains:
        v = sums.setdefault(c.repeat, [0.0, 0.0, 0.0])
        v[0] += c.energy_j
        v[1] += c.tokens
        v[2] += c.chain_frac
    repeats = sorted({c.repeat for c in o.chains} | set(sums))
    jpt, jpc, jpcorr = [], [], []
    for r in repeats:
        e, t, f = sums.get(r, [0.0, 0.0, 0.0])
        jpt.append(_safe_div(e, t) if t else None)
        chain = _safe_div(e, f) if f else None
        jpc.append(chain)
        acc = acc_by_repeat.get(r)
        jpcorr.append(chain / acc if chain is not None and acc else None)
    return {
        "repeats": repeats,
        "j_per_token": repeat_spread(jpt),
        "j_per_chain": repeat_spread(jpc),
        "j_per_correct": repeat_spread(jpcorr),
    }


# -- B* --------------------------------------------------------------------------------------------------


def crossings(conc: Sequence[float], ratio: Sequence[float]) -> list[tuple[float, str]]:
    """Where ``ratio`` (quantized / baseline) crosses 1, interpolated linearly in log(concurrency) and
    log(ratio); each with its direction: ``below`` when the quantized precision is cheaper below it.
    A level whose ratio is exactly 1 between levels on either side of 1 is the crossing itself;
    touching 1 without changing side is no crossing."""
    out: list[tuple[float, str]] = []
    prev: tuple[float, float] | None = None  # last point off 1
    zero_c: float | None = None  # first level exactly at 1 since then
    for c, r in zip(conc, ratio, strict=True):
        if r is None or not math.isfinite(r) or r <= 0 or c <= 0:
            continue
        x, y = math.log(c), math.log(r)
        if y == 0.0:
            if zero_c is None:
                zero_c = c
            continue
        if prev is not None and (prev[1] < 0) != (y < 0):
            px, py = prev
            at = zero_c if zero_c is not None else math.exp(px + (x - px) * (0.0 - py) / (y - py))
            out.append((at, "below" if py < 0 else "above"))
        prev, zero_c = (x, y), None
    return out


def _crossovers(
    levels: list[dict[str, Any]],
    replicates: dict[tuple[str, int, str], np.ndarray],
    baseline: str,
    metrics: Sequence[str] = METRICS,
) -> list[dict[str, Any]]:
    base = {lv["concurrency"]: lv for lv in levels if lv["precision"] == baseline}
    out = []
    for p in dict.fromkeys(lv["precision"] for lv in levels):
        if p == baseline:
            continue
        mine = {lv["concurrency"]: lv for lv in levels if lv["precision"] == p}
        conc = sorted(set(mine) & set(base))
        for metric in metrics:
            ratio = [_ratio(mine[c][metric], base[c][metric]) for c in conc]
            found = crossings(conc, [r if r is not None else math.nan for r in ratio])
            entry: dict[str, Any] = {
                "precision": p,
                "baseline": baseline,
                "metric": metric,
                "concurrency": conc,
                "ratio": ratio,
                "b_star": found[0][0] if found else None,
                "all_crossings": [{"b_star": b, "direction": d} for b, d in found],
            }
            known = [r for r in ratio if r is not None]
            if len(known) < 2:
                entry.update(
                    direction=None,
                    note="fewer than two concurrency levels with a ratio: no B*",
                    ci_coverage=None,
                    ci=None,
                    status="too_few_levels",
                    b_star_point=None,
                    undetermined_reason=None,
                )  # the order of every crossover (schema.Crossover)
                out.append(entry)
                continue
            if found:
                b, d = found[0]
                entry["direction"] = f"{p} cheaper below B*" if d == "below" else f"{p} cheaper above B*"
                entry["note"] = f"{p}'s {metric} crosses {baseline}'s at concurrency {b:.3g}" + (
                    f" ({len(found)} crossings in the swept range)" if len(found) > 1 else ""
                )
            else:
                cheaper = all(r < 1 for r in known)
                entry["direction"] = (
                    f"{p} cheaper at every swept concurrency"
                    if cheaper
                    else f"{p} dearer at every swept concurrency"
                )
                entry["note"] = f"no crossover between concurrency {conc[0]} and {conc[-1]}"
            # bootstrap interval for B*: the first crossing in the same direction in each replicate
            reps = np.stack(
                [replicates[(p, c, metric)] / replicates[(baseline, c, metric)] for c in conc], axis=1
            )
            hits = []
            want = found[0][1] if found else None
            for row in reps:
                fs = crossings(conc, list(row))
                hit = next((b for b, d in fs if want is None or d == want), None)
                if hit is not None:
                    hits.append(hit)
            entry["ci_coverage"] = len(hits) / len(reps) if len(reps) else None
            entry["ci"] = _ci(np.asarray(hits)) if hits and found else None
            entry["ratio_ci"] = [_ci(reps[:, i]) for i in range(len(conc))]
            entry["b_star_point"] = entry["b_star"]
            why = undetermined(entry["b_star"], entry["ci_coverage"], entry["ci"], conc)
            entry["undetermined_reason"] = why
            if why is None:
                entry["status"] = "determined" if found else "none_in_range"
            else:
                entry["status"] = "not_determined"
                entry["b_star"] = None
                entry["note"] += f"; B* not determined: {why}"
            out.append(entry)
    return out


def undetermined(
    b_star: float | None, coverage: float | None, ci: list[float] | None, conc: Sequence[int]
) -> str | None:
    """Why B* (or its absence) is not settled by the bootstrap, or None when it is: a crossing whose
    replicates cross less than ``MIN_BSTAR_COVERAGE`` of the time, whose interval is unknown or touches the
    lowest or highest swept concurrency (the crossing may lie outside the range); no crossing while more
    than ``1 - MIN_BSTAR_COVERAGE`` of the replicates cross."""
    if coverage is None:
        return None
    if b_star is None:
        if coverage > 1 - MIN_BSTAR_COVERAGE:
            return f"no crossover in the point estimate, but {coverage:.0%} of bootstrap replicates cross"
        return None
    if coverage < MIN_BSTAR_COVERAGE:
        return f"only {coverage:.0%} of bootstrap replicates cross (at least {MIN_BSTAR_COVERAGE:.0%} needed)"
    if ci is None:
        return "no interval"
    lo, hi = min(conc), max(conc)
    if ci[0] <= lo * (1 + EDGE_TOLERANCE) or ci[1] >= hi * (1 - EDGE_TOLERANCE):
        return f"its interval [{ci[0]:.3g}, {ci[1]:.3g}] touches the edge of the swept range {lo}-{hi}"
    return None


def _composite(weights: Sequence[float], parts: Sequence[float | None]) -> float | None:
    total = 0.0
    for w, x in zip(weights, parts, strict=True):
        if x is None:
            return None
        total += w * x
    return total


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _indices(
    levels: list[dict[str, Any]],
    accuracy: dict[str, dict[str, Any]],
    baseline: str,
    weights: tuple[float, float, float],
) -> list[dict[str, Any]]:
    base = {lv["concurrency"]: lv for lv in levels if lv["precision"] == baseline}
    total = sum(weights) or 1.0
    w = [x / total for x in weights]
    out = []
    for lv in levels:
        p, c = lv["precision"], lv["concurrency"]
        if p == baseline or c not in base:
            continue
        b = base[c]
        bits_p, bits_b = BITS.get(p.lower()), BITS.get(baseline.lower())
        predicted = b["j_per_token"] * bits_p / bits_b if b["j_per_token"] and bits_p and bits_b else None
        trust = _ratio(accuracy[p]["accuracy"], accuracy[baseline]["accuracy"])
        sustain = _ratio(b["j_per_correct"], lv["j_per_correct"])
        economy = _ratio(lv["tokens_per_s"], b["tokens_per_s"])
        parts = (trust, sustain, economy)
        out.append(
            {
                "precision": p,
                "baseline": baseline,
                "concurrency": c,
                "bits": bits_p,
                "casting_overhead_ratio": _ratio(lv["j_per_token"], predicted),
                "trust_index": trust,
                "sustainability_index": sustain,
                "economy_index": economy,
                "weights": {"trust": w[0], "sustainability": w[1], "economy": w[2]},
                "composite_index": _composite(w, parts),
            }
        )
    return out


def _footprint(obs: LevelObs, rec: dict[str, Any]) -> None:
    """Add a window request's carbon and cost (its energy is known) to its level."""
    co2e = rec.get("co2e_g")
    if isinstance(co2e, int | float):
        obs.co2e_g += float(co2e)
        obs.co2e_known += 1
    else:
        obs.co2e_unknown += 1
        why = str(rec.get("co2e_null_reason") or "the record has no co2e_g (a proxy without carbon figures)")
        obs.co2e_reasons[why] = obs.co2e_reasons.get(why, 0) + 1
    cost, currency = rec.get("cost"), rec.get("cost_currency")
    if isinstance(cost, int | float) and isinstance(currency, str):
        obs.cost += float(cost)
        obs.cost_known += 1
        obs.currencies.add(currency)
    else:
        obs.cost_unknown += 1
        why = str(rec.get("cost_null_reason") or "the record has no cost (a proxy without cost figures)")
        obs.cost_reasons[why] = obs.cost_reasons.get(why, 0) + 1


def _footprint_fields(o: LevelObs, known: bool) -> dict[str, Any]:
    """A level's carbon and cost, beside its energy: sums over the window requests whose energy and figure
    are known (null, with the most common reason, when none is; never 0 for unknown)."""

    def reason(counts: dict[str, int], fallback: str) -> str:
        return max(counts.items(), key=lambda kv: kv[1])[0] if counts else fallback

    any_co2e = known and o.co2e_known > 0
    any_cost = known and o.cost_known > 0 and len(o.currencies) == 1
    no_energy = "no window request has a known energy figure"
    return {
        "co2e_g": o.co2e_g if any_co2e else None,
        "co2e_null_reason": None if any_co2e else (reason(o.co2e_reasons, no_energy) if known else no_energy),
        "co2e_unknown_requests": o.co2e_unknown,
        "cost": o.cost if any_cost else None,
        "cost_currency": next(iter(o.currencies)) if any_cost else None,
        "cost_null_reason": None
        if any_cost
        else (
            "costs in more than one currency"
            if len(o.currencies) > 1
            else (reason(o.cost_reasons, no_energy) if known else no_energy)
        ),
        "cost_unknown_requests": o.cost_unknown,
    }
