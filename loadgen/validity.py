"""Validity checks of a finished run: what in report.json may not mean what it says.

Each failed check is a ``ReportWarning`` with a stable ``code`` (docs/methodology.md, "Validity checks"):

* ``short_window`` (warning): a level's steady-state window, in its shortest repeat, lasted less than
  ``min_window_s`` (``--min-window-s``; default ``min_window_updates`` (10) updates of the meter's energy
  counter, its update period as the proxy saw it, else 0.1 s each): energy over a few counter steps is
  mostly the steps' rounding.
* ``few_chains`` (warning): fewer than ``min_chains`` (``--min-chains``, default 30) measured chains at a
  level, summed over repeats.
* ``bstar_undetermined`` (warning): B* (or its absence) is not settled by the bootstrap
  (``analysis.undetermined``: fewer than 90% of the replicates cross, or the interval touches the edge of
  the swept range; or no crossing while more than 10% of replicates cross); the report gives no number.
* ``ratio_spans_one`` (warning): at some levels the 95% interval of the quantized / baseline ratio holds 1:
  there the two precisions are not told apart.
* ``attribution_mismatch`` (warning): the attributed J/token (the proxy's per-request records) and the
  measured J/token (the device counters over the window) differ by more than 5% of the measured.
* ``errors`` (warning): more than 1% of a level's requests failed.
* ``simulated`` (info): the backends are simulated (qtrap-sim): the figures model a GPU, they do not
  measure one.
"""

from __future__ import annotations

from dataclasses import dataclass

from loadgen.analysis import MIN_BSTAR_COVERAGE
from loadgen.schema import Checks, Report, ReportWarning

WINDOW_UPDATES = 10  # meter updates a steady-state window should span
TYPICAL_UPDATE_S = 0.1  # an NVML / dcgm-exporter energy counter's step when the meter's is not known
MIN_CHAINS = 30
MAX_ATTRIBUTION_GAP = 0.05
MAX_ERROR_RATE = 0.01


@dataclass(frozen=True, slots=True)
class Thresholds:
    min_window_s: float | None = None  # None: WINDOW_UPDATES meter updates
    min_chains: int = MIN_CHAINS
    min_window_updates: int = WINDOW_UPDATES
    max_attribution_gap: float = MAX_ATTRIBUTION_GAP
    max_error_rate: float = MAX_ERROR_RATE


def checks(report: Report, t: Thresholds) -> Checks:
    """The thresholds as applied to this report (the window's from its meter's update period)."""
    if t.min_window_s is not None:
        window, source = t.min_window_s, "--min-window-s"
    else:
        period = report.context.meter.update_period_s if report.context is not None else None
        if period:
            window = t.min_window_updates * period
            source = f"{t.min_window_updates} meter updates of {period:.3g} s (the proxy's counters)"
        else:
            window = t.min_window_updates * TYPICAL_UPDATE_S
            source = (
                f"{t.min_window_updates} x {TYPICAL_UPDATE_S:g} s (a typical NVML/DCGM counter step; "
                "the meter's update period is not known)"
            )
    return Checks(
        min_window_s=window,
        min_window_s_source=source,
        min_window_updates=t.min_window_updates,
        min_chains=t.min_chains,
        min_bstar_coverage=MIN_BSTAR_COVERAGE,
        max_attribution_gap=t.max_attribution_gap,
        max_error_rate=t.max_error_rate,
    )


def _w(
    code: str, message: str, where: dict[str, object] | None = None, level: str = "warning"
) -> ReportWarning:
    return ReportWarning.model_validate({"code": code, "level": level, "message": message, **(where or {})})


def validate(report: Report, c: Checks) -> list[ReportWarning]:
    """Every failed check, in a stable order: per level, then per crossover, then the run."""
    out: list[ReportWarning] = []
    for lv in report.levels:
        at: dict[str, object] = {"precision": lv.precision, "concurrency": lv.concurrency}
        name = f"{lv.precision} at concurrency {lv.concurrency}"
        spans = [w1 - w0 for w0, w1 in lv.windows_monotonic_s]
        shortest = min(spans) if spans else (lv.window_s if lv.repeats <= 1 else 0.0)
        if shortest < c.min_window_s:
            out.append(
                _w(
                    "short_window",
                    f"{name}: steady-state window of {shortest:.2f} s"
                    + (" (its shortest repeat)" if len(spans) > 1 else "")
                    + f", shorter than {c.min_window_s:.2f} s ({c.min_window_s_source}): "
                    "run more chains (--num-chains) or longer (--duration)",
                    at,
                )
            )
        if lv.chains < c.min_chains:
            out.append(
                _w(
                    "few_chains",
                    f"{name}: {lv.chains} measured chains, fewer than {c.min_chains}: "
                    "the intervals rest on too few independent units",
                    at,
                )
            )
        if lv.j_per_token is not None and lv.measured_j_per_token:
            gap = abs(lv.j_per_token - lv.measured_j_per_token) / lv.measured_j_per_token
            if gap > c.max_attribution_gap:
                out.append(
                    _w(
                        "attribution_mismatch",
                        f"{name}: attributed J/token {lv.j_per_token:.4g} and measured "
                        f"{lv.measured_j_per_token:.4g} differ by {gap:.1%} (more than "
                        f"{c.max_attribution_gap:.0%}): something else ran on the devices, or the window "
                        "is too short for the counters",
                        at,
                    )
                )
        if lv.requests and lv.errors / lv.requests > c.max_error_rate:
            kinds = ", ".join(f"{k} {n}" for k, n in sorted(lv.error_kinds.items()))
            out.append(
                _w(
                    "errors",
                    f"{name}: {lv.errors} of {lv.requests} requests failed "
                    f"({lv.errors / lv.requests:.1%}, more than {c.max_error_rate:.0%}): {kinds}",
                    at,
                )
            )
    for cx in report.crossovers:
        where: dict[str, object] = {"precision": cx.precision, "metric": cx.metric}
        if cx.status == "not_determined":
            point = "" if cx.b_star_point is None else f" (point estimate {cx.b_star_point:.3g})"
            out.append(
                _w(
                    "bstar_undetermined",
                    f"B* of {cx.precision} vs {cx.baseline} on {cx.metric}: not determined{point}: "
                    f"{cx.undetermined_reason}",
                    where,
                )
            )
        spanning = [
            conc
            for conc, ci in zip(cx.concurrency, cx.ratio_ci or [None] * len(cx.concurrency), strict=True)
            if ci is not None and ci[0] <= 1.0 <= ci[1]
        ]
        if spanning:
            out.append(
                _w(
                    "ratio_spans_one",
                    f"{cx.precision} / {cx.baseline} {cx.metric}: the 95% interval of the ratio holds 1 at "
                    f"concurrency {', '.join(map(str, spanning))}: there the two are not told apart",
                    where,
                )
            )
    ctx = report.context
    if ctx is not None and (ctx.embedded or any(b.simulated for b in ctx.backends)):
        sims = [b.name for b in ctx.backends if b.simulated]
        out.append(
            _w(
                "simulated",
                "simulated backends (qtrap-sim"
                + (f": {', '.join(sims)}" if sims else "")
                + "): the figures model a GPU, they do not measure one",
                level="info",
            )
        )
    return out


def has_warnings(report: Report) -> bool:
    """Whether any warning of level ``warning`` was raised (``--strict``)."""
    return any(w.level == "warning" for w in report.warnings)
