"""Prometheus recording rules for the ratios the dashboards show, defined once.

``python grafana/generate.py`` writes them to ``deploy/prometheus/rules/qtrap-recording.yml``;
the dashboards (:mod:`qtrap_proxy.grafana.dashboards`) refer to them by the names below.

Definitions (every figure is per ``pool`` and ``precision``, summed over backends and proxy
replicas):

* **J/token** = rate of attributed energy (``qtrap_energy_joules_total``, final figures) /
  rate of completion tokens, over 5 minutes. Energy includes prefill and, with the proxy's
  ``full`` policy, the idle power drawn while requests were in flight, as loadgen's J/token does.
* **J per correct answer** = rate of attributed energy / rate of chains scored correct
  (``qtrap_chains_scored_total{result="correct"}``, reported by loadgen). It charges the pool's
  whole energy to the scored chains, so it means what loadgen's figure means only while the
  pool's traffic is the scored chains.
* **Baseline** of a pool: its ``fp16`` precision, else ``bf16``, else ``fp32`` (loadgen's order),
  among the precisions the pool has served (``qtrap_requests_total``).
* **Ratio to baseline** = a precision's figure / its pool's baseline's figure over the same
  5 minutes, for every precision but the baseline. Each precision is measured at the load it
  served in those 5 minutes.
* **Casting-overhead ratio** = (J/token / baseline J/token) / (bits / baseline bits): what a
  precision costs per token relative to the ideal scaling with its weight width. Bits come from a
  static table of precision labels (``qtrap_common.precision.BITS``); other labels get no casting-overhead series.
* **By in-flight level** (the B* rules): the busy-time average of requests in flight over 1
  minute (``qtrap_inflight_requests`` averaged over the samples where it is above 0) is binned
  into powers of two (label ``inflight`` = ``001`` for [0, 1.41), ``002`` for [1.41, 2.83), ...,
  ``512+``); over the last 30 minutes the 1-minute energy, token and correct-chain rates that fall in
  a bin are summed, giving J/token and J per correct answer per precision and in-flight level, and
  their ratio to the baseline at the same level. Only the samples where a precision is busy count,
  so a precision measured at one load after another (loadgen sweeps levels one at a time) is
  compared with its baseline at the same in-flight level even when the two never ran together.
* **B\\*** (``qtrap:j_per_token:bstar_30m``, ``qtrap:j_per_correct:bstar_30m``): where the
  ratio by in-flight level crosses 1, interpolated linearly in log(in-flight) and log(ratio)
  between the two levels on either side, as loadgen interpolates between concurrency levels.
  ``direction="below"``: the precision is cheaper below B*; ``"above"``: cheaper above it.
  Defined only when the ratio crosses 1 once in the observed levels: the levels on the cheaper
  side all lie on one side of the levels on the dearer side. A precision cheaper (or dearer) at
  every observed level, or one whose ratio crosses 1 several times, has no series. The in-flight
  level used for the interpolation is each bin's measured average, not its nominal value.
"""

from __future__ import annotations

from typing import Any

from qtrap_common.precision import BASELINES, BITS

# -- names the dashboards and alerts use -------------------------------------------------------

POOL_BASELINE = "qtrap:pool_baseline:info"
PRECISION_BITS = "qtrap:precision_bits:static"
ENERGY_RATE = "qtrap:energy_joules:rate5m"
TOKENS_RATE = "qtrap:completion_tokens:rate5m"
CORRECT_RATE = "qtrap:chains_correct:rate5m"
SCORED_RATE = "qtrap:chains_scored:rate5m"
ACCURACY = "qtrap:chain_accuracy:ratio_rate5m"
INFLIGHT_AVG = "qtrap:inflight_requests:avg5m"
J_PER_TOKEN = "qtrap:j_per_token:rate5m"
J_PER_CORRECT = "qtrap:j_per_correct:rate5m"
J_PER_TOKEN_BASELINE = "qtrap:j_per_token_baseline:rate5m"
J_PER_CORRECT_BASELINE = "qtrap:j_per_correct_baseline:rate5m"
J_PER_TOKEN_RATIO = "qtrap:j_per_token:ratio_to_baseline"
J_PER_CORRECT_RATIO = "qtrap:j_per_correct:ratio_to_baseline"
CASTING_OVERHEAD = "qtrap:casting_overhead:ratio"

ENERGY_RATE_1M = "qtrap:energy_joules:rate1m"
TOKENS_RATE_1M = "qtrap:completion_tokens:rate1m"
CORRECT_RATE_1M = "qtrap:chains_correct:rate1m"
BUSY_INFLIGHT = "qtrap:inflight_requests:busy_avg1m"
INFLIGHT_BY_LEVEL = "qtrap:inflight_requests:by_inflight_30m"


def by_inflight(what: str) -> str:
    """J/token or J per correct answer by in-flight level (``what``: ``j_per_token``|``j_per_correct``)."""
    return f"qtrap:{what}:by_inflight_30m"


def by_inflight_ratio(what: str) -> str:
    return f"qtrap:{what}:by_inflight_ratio_to_baseline_30m"


def bstar(what: str) -> str:
    return f"qtrap:{what}:bstar_30m"


def bstar_part(what: str, part: str) -> str:
    """Intermediate B* series: ``lower``/``upper`` in-flight level and ``lower_ratio``/``upper_ratio``."""
    return f"qtrap:{what}:bstar_{part}_30m"


METRICS = ("j_per_token", "j_per_correct")

# -- in-flight levels ----------------------------------------------------------------------------

LEVELS = tuple(2**i for i in range(10))  # 1 .. 512
LOAD_WINDOW = "30m"


def level_label(i: int) -> str:
    return f"{LEVELS[i]:03d}" + ("+" if i == len(LEVELS) - 1 else "")


def level_bounds(i: int) -> tuple[float, float | None]:
    """[lower, upper) of level ``i``: geometric, centred on 2**i; the first starts at 0, the last is open."""
    lo = 0.0 if i == 0 else round(2 ** (i - 0.5), 4)
    hi = None if i == len(LEVELS) - 1 else round(2 ** (i + 0.5), 4)
    return lo, hi


def _in_level(i: int) -> str:
    lo, hi = level_bounds(i)
    return f"{BUSY_INFLIGHT} >= {lo:g}" + (f" < {hi:g}" if hi is not None else "")


# -- helpers -------------------------------------------------------------------------------------

_BASE_PRECISION = f'label_replace({POOL_BASELINE}, "precision", "$1", "baseline", "(.+)")'


def _or(terms: list[str]) -> str:
    return "\n  or\n".join(terms)


def _per_level(body: str) -> str:
    """``body`` (with ``{sel}`` for the in-level selector) for every in-flight level, labelled ``inflight``."""
    return _or(
        [
            f'label_replace(\n  {body.format(sel=_in_level(i))},\n  "inflight", "{level_label(i)}", "", ""\n)'
            for i in range(len(LEVELS))
        ]
    )


def _ratio_to_baseline(series: str, extra_on: str = "") -> str:
    """``series`` of every non-baseline precision / its pool's baseline's ``series`` (same ``extra_on`` labels)."""
    on = f"pool{extra_on}"
    return (
        f"(\n  {series}\n  unless on(pool, precision) {_BASE_PRECISION}\n)\n"
        f"/ on({on}) group_left(baseline)\n"
        f"max by ({on}, baseline) (\n  {series}\n  * on(pool, precision) group_left(baseline) {_BASE_PRECISION}\n)"
    )


def _bits_rule() -> str:
    return _or([f'label_replace(vector({bits}), "precision", "{p}", "", "")' for p, bits in BITS.items()])


def _baseline_rule() -> str:
    return "\n  or on(pool)\n".join(
        f'label_replace(group by (pool) (qtrap_requests_total{{precision="{b}"}}), "baseline", "{b}", "", "")'
        for b in BASELINES
    )


def _bstar_rules(what: str) -> list[dict[str, str]]:
    ratio = by_inflight_ratio(what)
    lower, upper = bstar_part(what, "lower"), bstar_part(what, "upper")
    keep = "pool, precision, baseline"
    # direction "below": cheaper (ratio < 1) at the low levels, dearer (ratio > 1) at the high ones
    sides = {"below": ("<", ">"), "above": (">", "<")}

    def level_where(agg: str, cmp: str) -> str:
        return f"{agg} by ({keep}) (\n  ({ratio} {cmp} 1) * 0\n  + on(pool, precision, inflight) group_left() {INFLIGHT_BY_LEVEL}\n)"

    def labelled(d: str, expr: str) -> str:
        return f'label_replace(\n{expr},\n"direction", "{d}", "", "")'

    def ratio_at(bound: str, d: str) -> str:
        return labelled(
            d,
            f"max by ({keep}) (\n  {ratio}\n  and on(pool, precision, inflight)\n"
            f'  ({INFLIGHT_BY_LEVEL} == on(pool, precision) group_left() {bound}{{direction="{d}"}})\n)',
        )

    return [
        {"record": lower, "expr": _or([labelled(d, level_where("max", lt)) for d, (lt, _) in sides.items()])},
        {"record": upper, "expr": _or([labelled(d, level_where("min", gt)) for d, (_, gt) in sides.items()])},
        {"record": bstar_part(what, "lower_ratio"), "expr": _or([ratio_at(lower, d) for d in sides])},
        {"record": bstar_part(what, "upper_ratio"), "expr": _or([ratio_at(upper, d) for d in sides])},
        {
            "record": bstar(what),
            "expr": (
                f"exp(\n  ln({lower})\n  + (ln({upper}) - ln({lower}))\n"
                f"  * ln({bstar_part(what, 'lower_ratio')})\n"
                f"  / (ln({bstar_part(what, 'lower_ratio')}) - ln({bstar_part(what, 'upper_ratio')}))\n)\n"
                f"and ({lower} < {upper})"
            ),
        },
    ]


def recording_rules() -> dict[str, Any]:
    """The rule file's content (``groups``), in evaluation order within each group."""
    energy = [
        {"record": POOL_BASELINE, "expr": _baseline_rule()},
        {"record": PRECISION_BITS, "expr": _bits_rule()},
        {"record": ENERGY_RATE, "expr": "sum by (pool, precision) (rate(qtrap_energy_joules_total[5m]))"},
        {
            "record": TOKENS_RATE,
            "expr": 'sum by (pool, precision) (rate(qtrap_tokens_total{kind="completion"}[5m]))',
        },
        {
            "record": CORRECT_RATE,
            "expr": 'sum by (pool, precision) (rate(qtrap_chains_scored_total{result="correct"}[5m]))',
        },
        {"record": SCORED_RATE, "expr": "sum by (pool, precision) (rate(qtrap_chains_scored_total[5m]))"},
        {"record": ACCURACY, "expr": f"{CORRECT_RATE} / ({SCORED_RATE} > 0)"},
        {
            "record": INFLIGHT_AVG,
            "expr": "sum by (pool, precision) (avg_over_time(qtrap_inflight_requests[5m]))",
        },
        {"record": J_PER_TOKEN, "expr": f"{ENERGY_RATE} / ({TOKENS_RATE} > 0)"},
        {"record": J_PER_CORRECT, "expr": f"{ENERGY_RATE} / ({CORRECT_RATE} > 0)"},
        {
            "record": J_PER_TOKEN_BASELINE,
            "expr": f"max by (pool, baseline) (\n  {J_PER_TOKEN}\n  * on(pool, precision) group_left(baseline) {_BASE_PRECISION}\n)",
        },
        {
            "record": J_PER_CORRECT_BASELINE,
            "expr": f"max by (pool, baseline) (\n  {J_PER_CORRECT}\n  * on(pool, precision) group_left(baseline) {_BASE_PRECISION}\n)",
        },
        {
            "record": J_PER_TOKEN_RATIO,
            "expr": f"(\n  {J_PER_TOKEN}\n  unless on(pool, precision) {_BASE_PRECISION}\n)\n/ on(pool) group_left(baseline) {J_PER_TOKEN_BASELINE}",
        },
        {
            "record": J_PER_CORRECT_RATIO,
            "expr": f"(\n  {J_PER_CORRECT}\n  unless on(pool, precision) {_BASE_PRECISION}\n)\n/ on(pool) group_left(baseline) {J_PER_CORRECT_BASELINE}",
        },
        {
            "record": CASTING_OVERHEAD,
            "expr": (
                f"(\n  {J_PER_TOKEN_RATIO}\n  / on(precision) group_left() {PRECISION_BITS}\n)\n"
                f"* on(baseline) group_left()\n"
                f'label_replace({PRECISION_BITS}, "baseline", "$1", "precision", "(.+)")'
            ),
        },
    ]
    sel = "{sel}"
    load: list[dict[str, str]] = [
        {"record": ENERGY_RATE_1M, "expr": "sum by (pool, precision) (rate(qtrap_energy_joules_total[1m]))"},
        {
            "record": TOKENS_RATE_1M,
            "expr": 'sum by (pool, precision) (rate(qtrap_tokens_total{kind="completion"}[1m]))',
        },
        {
            "record": CORRECT_RATE_1M,
            "expr": 'sum by (pool, precision) (rate(qtrap_chains_scored_total{result="correct"}[1m]))',
        },
        {
            "record": BUSY_INFLIGHT,
            "expr": "avg_over_time((sum by (pool, precision) (qtrap_inflight_requests) > 0)[1m:])",
        },
        {
            "record": INFLIGHT_BY_LEVEL,
            "expr": _per_level(f"avg_over_time(({sel})[{LOAD_WINDOW}:])"),
        },
    ]
    sums = {}
    for name, rate in (("energy", ENERGY_RATE_1M), ("tokens", TOKENS_RATE_1M), ("correct", CORRECT_RATE_1M)):
        record = f"qtrap:{rate.split(':')[1]}:by_inflight_sum_30m"
        sums[name] = record
        load.append(
            {
                "record": record,
                "expr": _per_level(
                    f"sum_over_time(({rate} and on(pool, precision) ({sel}))[{LOAD_WINDOW}:])"
                ),
            }
        )
    for what, denominator in (("j_per_token", sums["tokens"]), ("j_per_correct", sums["correct"])):
        load.append({"record": by_inflight(what), "expr": f"{sums['energy']} / ({denominator} > 0)"})
        load.append(
            {"record": by_inflight_ratio(what), "expr": _ratio_to_baseline(by_inflight(what), ", inflight")}
        )
        load.extend(_bstar_rules(what))
    return {
        "groups": [
            {"name": "qtrap-energy", "rules": energy},
            {"name": "qtrap-load", "rules": load},
        ]
    }


def record_names() -> list[str]:
    return [r["record"] for g in recording_rules()["groups"] for r in g["rules"]]
