"""report.json, requests.csv, report.html and the terminal summary (schema: loadgen/schema.py,
docs/report-schema.md)."""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from loadgen.analysis import Analysis
from loadgen.runner import LevelRun
from loadgen.schema import GENERATOR, IGNORE_UNKNOWN, CompareRouting, Config, Energy, Report
from loadgen.schema import SCHEMA_VERSION as SCHEMA_VERSION  # defined in loadgen.schema; re-exported


class ReportError(ValueError):
    """A report file that cannot be read; one line for the CLI."""


def energy_summary(start: dict[str, Any] | None, end: dict[str, Any] | None) -> dict[str, Any]:
    """The proxy's device energy accounts (``GET /qtrap/v1/energy``) when the sweep started and after its
    last level's records were final: conservation (attributed + idle + foreign = measured) over the
    proxy's lifetime, and what each device's counter measured during the run (``Energy``'s fields)."""
    if end is None:
        return {
            "devices": [],
            "null_reason": "the proxy's GET /qtrap/v1/energy did not answer (or refused: auth on and no admin key)",
        }
    keys = (
        "meter", "meter_up", "updates", "counter_resets", "measured_j", "attributed_j", "idle_j", "foreign_j",
        "conservation_error_j", "conservation_error_ratio", "pending_intervals",
    )  # fmt: skip
    devices = []
    for name, d in end["devices"].items():
        row: dict[str, Any] = {"device": name, **{k: d.get(k) for k in keys}}
        before = (start or {}).get("devices", {}).get(name)
        row["run_measured_j"] = (
            d["measured_j"] - before["measured_j"]
            if before is not None and d.get("measured_j") is not None and before.get("measured_j") is not None
            else None
        )
        devices.append(row)
    return {"devices": devices, "null_reason": None if devices else "the proxy meters no device"}


def build(
    config: Config | Mapping[str, Any],
    analysis: Analysis,
    *,
    partial: bool,
    started_unix_s: float,
    duration_s: float,
    energy: Energy | Mapping[str, Any] | None = None,
    context: Mapping[str, Any] | None = None,
) -> Report:
    """The report of a run, validated: a figure of the analysis without a field in ``Report`` (or of
    another type) raises ``pydantic.ValidationError``. ``context``: the header (loadgen/context.py)."""
    return Report.model_validate(
        {
            "schema_version": SCHEMA_VERSION,
            "generator": GENERATOR,
            "partial": partial,
            "started_unix_s": started_unix_s,
            "duration_s": duration_s,
            "config": config,
            "baseline": analysis.baseline,
            "accuracy_measured": analysis.accuracy_null_reason is None,
            "accuracy_null_reason": analysis.accuracy_null_reason,
            "accuracy": analysis.accuracy,
            "levels": analysis.levels,
            "crossovers": analysis.crossovers,
            "indices": analysis.indices,
            "energy": energy if energy is not None else {"devices": [], "null_reason": "not recorded"},
            "context": context,
        }
    )


def build_scheduled(
    config: Config | Mapping[str, Any],
    schedules: list[Mapping[str, Any]],
    *,
    partial: bool,
    started_unix_s: float,
    duration_s: float,
    energy: Energy | Mapping[str, Any] | None = None,
    context: Mapping[str, Any] | None = None,
) -> Report:
    """The report of a ``--schedule`` run: no levels, one ``schedules`` entry per precision; ``context``: the
    header (loadgen/context.py)."""
    return Report.model_validate(
        _clean(
            {
                "schema_version": SCHEMA_VERSION,
                "generator": GENERATOR,
                "partial": partial,
                "started_unix_s": started_unix_s,
                "duration_s": duration_s,
                "config": config,
                "baseline": None,
                "accuracy": {},
                "levels": [],
                "crossovers": [],
                "indices": [],
                "energy": energy if energy is not None else {"devices": [], "null_reason": "not recorded"},
                "schedules": list(schedules),
                "context": context,
            }
        )
    )


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def dumps(report: Report) -> str:
    """report.json's text: non-finite figures become null."""
    return json.dumps(_clean(report.model_dump()), indent=2) + "\n"


def write_json(report: Report, path: Path) -> Path:
    path.write_text(dumps(report))
    return path


def _error_line(e: ValidationError) -> str:
    err = e.errors()[0]
    where = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in err["loc"]).lstrip(".")
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return f"{where or 'report'}: {err['msg']}{more}"


def load(path: str | Path) -> Report:
    """A report.json of this major version, validated; a newer minor version's added fields are ignored."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except OSError as e:
        raise ReportError(f"cannot read {p}: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{p} is not a JSON report: {e}") from e
    if not isinstance(doc, dict) or "schema_version" not in doc or "levels" not in doc:
        raise ReportError(f"{p} is not a qtrap loadgen report (no schema_version/levels)")
    version = str(doc["schema_version"]).split(".")
    if version[0] != SCHEMA_VERSION.split(".")[0]:
        raise ReportError(f"{p} has schema {doc['schema_version']}; this loadgen reads {SCHEMA_VERSION}")
    mine = int(SCHEMA_VERSION.split(".")[1])
    newer = len(version) > 1 and version[1].isdigit() and int(version[1]) > mine
    try:
        return Report.model_validate(doc, context={IGNORE_UNKNOWN: newer})
    except ValidationError as e:
        raise ReportError(
            f"{p} is not a valid schema {doc['schema_version']} report: {_error_line(e)}"
        ) from e


CSV_FIELDS = [
    "precision", "concurrency", "repeat", "chain_id", "warmup", "hops", "hop", "in_window", "request_id",
    "backend", "status", "error", "prompt_tokens", "completion_tokens", "ttft_s", "itl_s", "e2e_s",
    "energy_j", "energy_final", "error_bound_j", "energy_null_reason", "chain_correct", "chain_correct_flexible",
    "co2e_g", "cost", "cost_currency",
]  # fmt: skip


def write_csv(runs: list[LevelRun], path: Path, *, scored: bool = True) -> Path:
    """One row per request; ``scored=False`` (``--no-score``) leaves the chain verdict columns empty."""
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS)
        w.writeheader()
        for run in runs:
            w0, w1 = run.window if run.window else (math.inf, -math.inf)
            for chain in run.chains:
                for ex in chain.exchanges:
                    rec = ex.record or {}
                    w.writerow(
                        {
                            "precision": run.precision,
                            "concurrency": run.concurrency,
                            "repeat": run.repeat,
                            "chain_id": chain.id,
                            "warmup": int(chain.warmup),
                            "hops": chain.problem.hops,
                            "hop": ex.hop,
                            "in_window": int(w0 <= ex.t_send and ex.t_end <= w1),
                            "request_id": ex.request_id,
                            "backend": ex.backend,
                            "status": ex.status,
                            "error": ex.error,
                            "prompt_tokens": ex.prompt_tokens,
                            "completion_tokens": ex.completion_tokens,
                            "ttft_s": ex.ttft_s,
                            "itl_s": ex.itl_s,
                            "e2e_s": ex.e2e_s,
                            "energy_j": rec.get("energy_j"),
                            "energy_final": int(bool(rec.get("final"))) if rec else "",
                            "error_bound_j": rec.get("error_bound_j"),
                            "energy_null_reason": rec.get("energy_null_reason")
                            or ("" if rec else "no record"),
                            "chain_correct": ""
                            if chain.score is None or not scored
                            else int(chain.score.strict),
                            "chain_correct_flexible": ""
                            if chain.score is None or not scored
                            else int(chain.score.flexible),
                            "co2e_g": rec.get("co2e_g"),
                            "cost": rec.get("cost"),
                            "cost_currency": rec.get("cost_currency"),
                        }
                    )
    return path


# -- formatting -----------------------------------------------------------------------------------------


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def fmt_ci(ci: list[float] | None, digits: int = 3) -> str:
    return "-" if not ci else f"[{ci[0]:.{digits}g}, {ci[1]:.{digits}g}]"


def b_star_text(cx: Any) -> str:
    """B* as the report states it: a number, "not determined" (the bootstrap does not settle it) or -."""
    if cx.status == "not_determined":
        return "not determined" + ("" if cx.b_star_point is None else f" (point {cx.b_star_point:.3g})")
    return fmt(cx.b_star)


def crossover_rows(report: Report) -> list[list[str]]:
    rows = []
    for cx in report.crossovers:
        rows.append(
            [
                f"{cx.precision} vs {cx.baseline}",
                cx.metric,
                b_star_text(cx),
                fmt_ci(cx.ci),
                "-" if cx.ci_coverage is None else f"{cx.ci_coverage:.0%}",
                cx.direction or "-",
                "  ".join(f"c={c}:{fmt(r)}" for c, r in zip(cx.concurrency, cx.ratio, strict=True)),
            ]
        )
    return rows


CROSS_HEAD = [
    "precision",
    "metric",
    "B*",
    "95% CI",
    "replicates crossing",
    "direction",
    "ratio by concurrency",
]
LEVEL_HEAD = [
    "precision",
    "conc",
    "chains",
    "accuracy",
    "J/token",
    "J/token 95% CI",
    "J/correct",
    "J/correct 95% CI",
    "tok/s",
    "TTFT p50 ms",
    "errors",
]


REPEAT_HEAD = ["J/token repeats sd (range)", "J/correct repeats sd (range)"]


def has_repeats(report: Report) -> bool:
    return any(lv.repeat_spread is not None for lv in report.levels)


FOOTPRINT_HEAD = ["gCO2e", "cost"]


def has_footprint(report: Report) -> bool:
    """Whether any level has a carbon or cost figure (the proxy's ``carbon`` or ``pricing`` configured)."""
    return any(lv.co2e_g is not None or lv.cost is not None for lv in report.levels)


def level_head(report: Report, *, measured: bool = False) -> list[str]:
    """LEVEL_HEAD, with the between-repeat spread beside the intervals when levels ran several times, and
    the window requests' gCO2e and cost at the end when the proxy gave them; ``measured``: with measured
    J/token beside the attributed (report.html; the terminal keeps its width)."""
    head = list(LEVEL_HEAD)
    if measured:
        head.insert(head.index("J/correct"), "measured J/token")
    if has_repeats(report):
        i = head.index("tok/s")
        head = [*head[:i], *REPEAT_HEAD, *head[i:]]
    return [*head, *FOOTPRINT_HEAD] if has_footprint(report) else head


def _spread_text(sp: Any) -> str:
    return "-" if sp is None else f"{sp.sd:.3g} ({sp.range:.3g})"


def _sorted_levels(report: Report) -> list[Any]:
    order = list(dict.fromkeys(lv.precision for lv in report.levels))
    return sorted(report.levels, key=lambda lv: (lv.concurrency, order.index(lv.precision)))


def level_rows(report: Report, *, measured: bool = False) -> list[list[str]]:
    """One row per level; an interval widened by the repeats' disagreement is marked with *; ``measured``:
    as ``level_head``."""
    rows = []
    repeats = has_repeats(report)
    footprint = has_footprint(report)
    for lv in _sorted_levels(report):
        ttft = lv.ttft_s.p50
        mark = {m: "*" if m in lv.ci.widened else "" for m in ("j_per_token", "j_per_correct")}
        row = [
            lv.precision,
            str(lv.concurrency),
            str(lv.chains),
            fmt(lv.accuracy),
            fmt(lv.j_per_token),
            fmt_ci(lv.ci.j_per_token) + mark["j_per_token"],
            *([fmt(lv.measured_j_per_token)] if measured else []),
            fmt(lv.j_per_correct),
            fmt_ci(lv.ci.j_per_correct) + mark["j_per_correct"],
        ]
        if repeats:
            sp = lv.repeat_spread
            row += [
                _spread_text(sp.j_per_token if sp else None),
                _spread_text(sp.j_per_correct if sp else None),
            ]
        row += [
            fmt(lv.tokens_per_s, 4),
            "-" if ttft is None else f"{ttft * 1e3:.1f}",
            f"{lv.errors}/{lv.requests}",
        ]
        if footprint:
            row += [fmt(lv.co2e_g), "-" if lv.cost is None else f"{lv.cost:.4g} {lv.cost_currency}"]
        rows.append(row)
    return rows


TAIL_HEAD = [
    "precision",
    "conc",
    "req/s",
    "out tok/s",
    "TTFT p50/p90/p99 ms",
    "ITL (TPOT) p50/p90/p99 ms",
    "E2E p50/p90/p99 s",
]


def _pcts(p: Any, scale: float, digits: int) -> str:
    vals = (p.p50, p.p90, p.p99)
    return " / ".join("-" if v is None else f"{v * scale:.{digits}f}" for v in vals)


def tail_rows(report: Report) -> list[list[str]]:
    """Throughput and latency tails per level, as `vllm bench serve` and guidellm report them."""
    return [
        [
            lv.precision,
            str(lv.concurrency),
            fmt(lv.requests_per_s, 4),
            fmt(lv.tokens_per_s, 4),
            _pcts(lv.ttft_s, 1e3, 1),
            _pcts(lv.itl_s, 1e3, 2),
            _pcts(lv.e2e_s, 1.0, 3),
        ]
        for lv in _sorted_levels(report)
    ]


def context_lines(report: Report | CompareRouting) -> list[str]:
    """The header in lines: date, version, command, proxy, backends and engines, GPUs, meter, workload."""
    ctx = report.context
    if ctx is None:
        return []
    m = ctx.meter
    period = "" if m.update_period_s is None else f", counter updates every {m.update_period_s * 1e3:.0f} ms"
    gpus = ", ".join(ctx.gpu_names) or "names unknown"
    lines = [
        f"date {ctx.date_utc}, qtrap {ctx.qtrap_version}",
        f"command: {ctx.command_line}",
        f"proxy {ctx.proxy_url}" + (" (embedded default)" if ctx.embedded else ""),
        f"model {ctx.model}, dataset {ctx.dataset}"
        + (f" ({ctx.data_file})" if ctx.data_file else "")
        + f", hops as {ctx.hops}",
        f"GPUs: {ctx.gpu_count} ({gpus}); meter {m.kind}, policy {m.policy}{period}",
    ]
    if not ctx.backends:
        lines.append(f"backends: unknown ({ctx.backends_null_reason})")
    for b in ctx.backends:
        version = b.engine_version or f"version unknown ({b.engine_error or 'not given'})"
        model = b.served_model or b.model
        more = "" if b.max_model_len is None else f", max_model_len {b.max_model_len}"
        lines.append(
            f"backend {b.name}: {b.precision}, {b.engine} {version}, model {model}{more}, "
            f"devices {', '.join(b.devices) or '-'}"
        )
    return lines


def warning_lines(report: Report) -> list[str]:
    return [f"{w.level.upper()} [{w.code}] {w.message}" for w in report.warnings]


def accuracy_note(report: Report) -> str | None:
    """One line when the run did not score answers (``--no-score``), else None."""
    if report.accuracy_measured:
        return None
    return (
        f"accuracy not measured: {report.accuracy_null_reason or 'no reason given'}; "
        "J per correct answer and the trust, sustainability and composite indices are null, "
        "and B* is located on J/token only"
    )


ENERGY_HEAD = [
    "device",
    "meter",
    "measured J",
    "attributed J",
    "idle J",
    "foreign J",
    "conservation error",
    "measured during the run J",
]


def energy_rows(report: Report) -> list[list[str]]:
    return [
        [
            d.device,
            str(d.meter),
            fmt(d.measured_j, 6),
            fmt(d.attributed_j, 6),
            fmt(d.idle_j, 6),
            fmt(d.foreign_j, 6),
            "-" if d.conservation_error_ratio is None else f"{d.conservation_error_ratio:.2e}",
            fmt(d.run_measured_j, 6),
        ]
        for d in report.energy.devices
    ]


INDEX_HEAD = [
    "precision",
    "conc",
    "bits",
    "casting overhead",
    "trust",
    "sustainability",
    "economy",
    "composite",
]


def index_rows(report: Report) -> list[list[str]]:
    return [
        [
            i.precision,
            str(i.concurrency),
            fmt(i.bits),
            fmt(i.casting_overhead_ratio),
            fmt(i.trust_index),
            fmt(i.sustainability_index),
            fmt(i.economy_index),
            fmt(i.composite_index),
        ]
        for i in report.indices
    ]


HOP_HEAD = ["precision", "conc", "hop", "requests", "J/request", "J/token"]


def hop_rows(report: Report) -> list[list[str]]:
    rows = []
    for lv in report.levels:
        for hop, h in lv.energy_by_hop.items():
            rows.append(
                [
                    lv.precision,
                    str(lv.concurrency),
                    hop,
                    str(h.requests),
                    fmt(h.j_per_request),
                    fmt(h.j_per_token),
                ]
            )
    return rows


def print_summary(report: Report, console: Console) -> None:
    for line in context_lines(report):
        console.print(line, highlight=False, markup=False)
    title = "Levels (energy over each level's steady-state window; accuracy of its measured chains)"
    if has_repeats(report):
        title += "; * interval widened: the repeats disagree more than the bootstrap says"
    t = Table(title=title)
    for h in level_head(report):
        t.add_column(h, justify="right" if h not in ("precision",) else "left")
    for row in level_rows(report):
        t.add_row(*row)
    console.print(t)
    if report.levels:
        t = Table(
            title="Throughput and latency tails (measured requests; ITL: each request's mean time per token)"
        )
        for h in TAIL_HEAD:
            t.add_column(h, justify="left" if h == "precision" else "right")
        for row in tail_rows(report):
            t.add_row(*row)
        console.print(t)
    t = Table(title=f"B*: where a quantized precision's energy crosses {report.baseline or 'the baseline'}'s")
    for h in CROSS_HEAD:
        t.add_column(h)
    for row in crossover_rows(report):
        t.add_row(*row)
    if not report.crossovers:
        t.add_row(
            "-", "-", "-", "-", "-", "no baseline (fp16/bf16) or a single precision: nothing to compare", "-"
        )
    console.print(t)
    if report.indices:
        t = Table(title="Indices (casting overhead: J/token against linear-in-bits scaling of the baseline)")
        for h in INDEX_HEAD:
            t.add_column(h, justify="left" if h == "precision" else "right")
        for row in index_rows(report):
            t.add_row(*row)
        console.print(t)
    if energy_rows(report):
        t = Table(title="Energy accounts of the proxy (its lifetime; attributed + idle + foreign = measured)")
        for h in ENERGY_HEAD:
            t.add_column(h, justify="left" if h in ("device", "meter") else "right")
        for row in energy_rows(report):
            t.add_row(*row)
        console.print(t)
    note = accuracy_note(report)
    if note:
        console.print(note, highlight=False, markup=False)
    for lv in report.levels:
        if lv.energy_j is None:
            console.print(
                f"energy unknown for {lv.precision} at concurrency {lv.concurrency}: {lv.energy_null_reason}"
            )
    if report.partial:
        console.print("[bold]partial report[/bold]: the run was interrupted")
    if report.warnings:
        n = sum(w.level == "warning" for w in report.warnings)
        console.print(f"[bold]Validity checks: {n} warning(s)[/bold]" if n else "Validity checks: no warning")
        for line in warning_lines(report):
            console.print(line, highlight=False, markup=False)
    elif report.checks is not None:
        console.print("Validity checks: no warning")


# -- HTML -----------------------------------------------------------------------------------------------


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1240px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
figure{margin:1.5em 0}img{max-width:100%;height:auto;border:1px solid #eee;margin:0.5em 0;display:block}
figcaption{color:#444;font-size:0.9em;max-width:1100px}
.note{color:#555;font-size:0.9em}code{background:#f6f6f6;padding:1px 4px}
.warn{background:#fff6d6;border:1px solid #e6c200;padding:6px 10px}
.ctx{color:#444;font-size:0.9em}li.info{color:#555}
dl.defs{font-size:0.9em;color:#333;margin:0.5em 0 1.5em;display:grid;grid-template-columns:max-content 1fr;gap:4px 14px}
dl.defs dt{font-weight:600}dl.defs dd{margin:0}"""

# where the definitions live: docs/methodology.md in the qtrap repository (anchors as GitHub renders them)
METHODOLOGY = "docs/methodology.md"
_SECTIONS = {
    "energy": "energy-figures-from-the-proxys-final-records",
    "ci": "confidence-intervals",
    "bstar": "b",
    "checks": "validity-checks",
    "indices": "indices-after-the-seed-papers-indicators-as-qtrap-defines-them",
}


def _link(section: str, text: str = "methodology") -> str:
    return f'<a href="{METHODOLOGY}#{_SECTIONS[section]}">{html.escape(text)}</a>'


def _defs(items: list[tuple[str, str, str, str]]) -> str:
    """A definition list: (term, one or two sentences (HTML), formula, methodology section)."""
    rows = "".join(
        f"<dt>{html.escape(term)}</dt><dd>{text} <code>{html.escape(formula)}</code> ({_link(section)})</dd>"
        for term, text, formula, section in items
    )
    return f'<dl class="defs">{rows}</dl>'


def _bstar_defs(report: Report) -> str:
    base = html.escape(report.baseline or "the baseline")
    return _defs(
        [
            ("ratio", f"A quantized precision's energy over {base}'s at the same concurrency, per correct answer "
             "and per output token; above 1 the quantized precision costs more (the trap). Its interval: "
             "the bootstrap's 2.5-97.5 percentiles.", "ratio(C) = metric_q(C) / metric_base(C)", "bstar"),
            ("B*", "The first concurrency where the ratio crosses 1, interpolated linearly in log(concurrency) "
             "and log(ratio) between neighbouring levels; its 95% interval: percentiles of the bootstrap "
             "replicates' first crossing in the same direction. A number only when at least 90% of the "
             "replicates cross and the interval stays inside the swept range; otherwise \"not determined\".",
             "log B* = log C1 + (log C2 - log C1) x (0 - log r1) / (log r2 - log r1)", "bstar"),
            ("replicates crossing", "The share of bootstrap replicates whose ratio curve crosses 1 in B*'s "
             "direction (in either direction when the point estimate does not cross).",
             "coverage = crossing replicates / replicates", "bstar"),
        ]
    )  # fmt: skip


def _level_defs() -> str:
    return _defs(
        [
            ("J/token (attributed)", "The proxy's final per-request energy records of the requests that "
             "started and ended inside the level's steady-state window, over their completion tokens.",
             "J/token = sum(energy of window requests) / sum(their completion tokens)", "energy"),
            ("measured J/token", "The same from the devices' energy counters instead of the attribution: "
             "the counters' increase over the window over the tokens generated in it; null for windows under "
             "2 s. It should agree with the attributed figure within 5% when nothing else runs on the devices.",
             "measured J/token = (counter at close - counter at open) / tokens in the window", "energy"),
            ("J/correct", "Energy per chain (each window request counts as 1/H of its chain of H requests) "
             "over the precision's accuracy.",
             "J/correct = (sum(energy) / sum(1/H_r)) / accuracy", "energy"),
            ("95% CI", "Percentile bootstrap over chains (and repeats), 1,000 replicates by default.",
             "95% CI = [2.5th, 97.5th percentile of the replicates]", "ci"),
        ]
    )  # fmt: skip


def _index_defs(report: Report) -> str:
    w = report.indices[0].weights if report.indices else None
    weights = "w_T = w_S = w_E = 1/3" if w is None else (
        f"w_T = {w.trust:.3g}, w_S = {w.sustainability:.3g}, w_E = {w.economy:.3g}")  # fmt: skip
    return _defs(
        [
            ("casting overhead", "Measured J/token against what linear-in-bits scaling of the baseline "
             "predicts: 1 means the bits saved were saved in energy, 3 that it costs three times what its "
             "bit width promises.", "casting overhead = J/token_q / (J/token_base x bits_q / bits_base)", "indices"),
            ("trust", "Accuracy relative to the baseline (pooled over every level).",
             "trust = accuracy_q / accuracy_base", "indices"),
            ("sustainability", "Energy per correct answer of the baseline over the quantized precision's at "
             "the same concurrency; above 1 the quantized precision is greener.",
             "sustainability = J/correct_base / J/correct_q", "indices"),
            ("economy", "Steady-state output throughput relative to the baseline's.",
             "economy = tokens/s_q / tokens/s_base", "indices"),
            ("composite", f"The weighted sum of the three (`--index-weights`, normalised; here {weights}); "
             "above 1 the quantized precision is better on the weighted balance.",
             "composite = w_T x trust + w_S x sustainability + w_E x economy", "indices"),
        ]
    )  # fmt: skip


_CAPTIONS = {
    "energy": "Energy per output token and per correct answer at each swept concurrency, with 95% bootstrap "
    "intervals as error bars (precisions nudged sideways so their bars do not overlap). B* of each quantized "
    'precision: dashed line, its 95% interval shaded; "not determined" (with why) and "no crossover in the '
    "swept range\" are said in the legend (a dotted line marks a not-determined B*'s point estimate). "
    "Without scored answers, J/token alone.",
    "ratio": "Quantized / baseline at each concurrency with its 95% bootstrap interval; the region above 1 "
    "(shaded red) is the trap, where the quantized precision costs more energy than the baseline. B* as in "
    "the energy plot.",
    "accuracy_by_hops": "Share of chains answered correctly (strict) by the chain's hop count, per precision, "
    "with Wilson 95% intervals; n is the number of chains at each point; precisions are shifted sideways so "
    "their lines do not hide one another.",
    "throughput_latency": "Steady-state output tokens/s, time to first token and request latency (p50 solid, "
    "p99 dashed) against concurrency.",
    "power_timeline": "Each level's first repeat over time: the power attributed to its requests (each "
    "request's final energy spread evenly over its life), the devices' measured mean power over the "
    "steady-state window (dashed; from the counters at the window's edges) and output tokens/s (grey, right "
    "axis). The window is shaded between its edges: before it the warm-up wave, after it the drain.",
    "idle_share": "Each metered device's energy over the proxy's lifetime, split into what was attributed to "
    "requests, idle (with the proxy's default full policy: while no request was in flight) and foreign (other work on the device): attributed + idle + "
    "foreign = measured. A device that served one precision is idle while the others run.",
}


def _figure(p: Path) -> str:
    svg = p.with_suffix(".svg")
    link = f' (<a href="{html.escape(svg.name)}">SVG</a>)' if svg.exists() else ""
    caption = _CAPTIONS.get(p.stem, "")
    data = base64.b64encode(p.read_bytes()).decode()
    return (
        f'<figure id="fig-{html.escape(p.stem)}"><img alt="{html.escape(p.stem)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(caption)}{link}</figcaption></figure>"
    )


def write_html(report: Report, plots: list[Path], path: Path) -> Path:
    cfg = report.config
    figs = {p.stem: _figure(p) for p in plots}

    def fig(*names: str) -> str:
        return "".join(figs.pop(n) for n in names if n in figs)

    note = accuracy_note(report)
    if note:
        accuracy_html = f'<p class="warn">{html.escape(note[0].upper() + note[1:])}.</p>'
    else:
        acc_rows = [
            [p, str(a.chains), fmt(a.accuracy), fmt_ci(a.ci), fmt(a.accuracy_flexible)]
            for p, a in report.accuracy.items()
        ]
        accuracy_html = _table(
            ["precision", "chains", "accuracy (strict)", "95% CI", "accuracy (flexible)"], acc_rows
        )
    energy_html = (
        _table(ENERGY_HEAD, energy_rows(report))
        if report.energy.devices
        else f'<p class="note">{html.escape(report.energy.null_reason or "not recorded")}</p>'
    )
    header_html = "".join(f"<li>{html.escape(line)}</li>" for line in context_lines(report))
    header_html = f'<ul class="ctx">{header_html}</ul>' if header_html else ""
    warn_html = "".join(
        f'<li class="{w.level}"><code>{html.escape(w.code)}</code> {html.escape(w.message)}</li>'
        for w in report.warnings
    )
    n_warn = sum(w.level == "warning" for w in report.warnings)
    if report.warnings:
        warn_html = (
            f'<div class="{"warn" if n_warn else "note"}" id="warnings"><strong>Validity checks: {n_warn} '
            f"warning(s)</strong> ({_link('checks', 'what each check means')})<ul>{warn_html}</ul></div>"
        )
    elif report.checks is not None:
        warn_html = '<p class="note" id="warnings">Validity checks: no warning.</p>'
    no_plots = (
        ""
        if plots
        else '<p class="note">No plots: matplotlib was not installed where this report was written '
        "(<code>python -m loadgen render report.json</code> draws them).</p>"
    )
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>qtrap loadgen report</title><style>{_CSS}</style></head>
<body>
<h1>qtrap loadgen report{" (partial)" if report.partial else ""}</h1>
{warn_html}
{header_html}
<p class="note">model <code>{html.escape(str(cfg.model))}</code>, dataset <code>{html.escape(str(cfg.dataset))}</code>,
hops as <code>{html.escape(str(cfg.hops))}</code>, concurrency {html.escape(str(cfg.concurrency))},
repeats {html.escape(str(cfg.repeats))}, proxy <code>{html.escape(str(cfg.proxy))}</code>; schema {report.schema_version}.
Definitions: {METHODOLOGY} in the qtrap repository (links below are relative to it).</p>
{accuracy_html if note else ""}
<h2>B*</h2>
{_table(CROSS_HEAD, crossover_rows(report))}
{_bstar_defs(report)}
{fig("energy", "ratio")}{no_plots}
<h2>Levels</h2>
{_table(level_head(report, measured=True), level_rows(report, measured=True))}
{'<p class="note">* interval widened: the repeats disagree more than the bootstrap says (docs/methodology.md, "Repeats").</p>' if has_repeats(report) else ""}
{_level_defs()}
<h2>Throughput and latency tails</h2>
{_table(TAIL_HEAD, tail_rows(report))}
<p class="note">Measured requests (warm-up left out); req/s and out tok/s over the steady-state window; ITL is each
request's mean time per output token after the first (vLLM's TPOT).</p>
{fig("throughput_latency", "power_timeline")}
<h2>Accuracy (all measured chains of a precision)</h2>
{accuracy_html}
{fig("accuracy_by_hops")}
<h2>Indices</h2>
{_table(INDEX_HEAD, index_rows(report))}
{_index_defs(report)}
<h2>Energy by hop (window requests)</h2>
{_table(HOP_HEAD, hop_rows(report))}
<h2>Energy accounts of the proxy</h2>
{energy_html}
<p class="note">Over the proxy's lifetime: attributed + idle + foreign = measured, per device; "measured during the
run" is the device counter's increase from the start of the sweep to the end of its last level; idle share =
idle J / measured J.</p>
{fig("idle_share")}{"".join(figs.values())}
</body></html>
"""
    path.write_text(doc)
    return path
