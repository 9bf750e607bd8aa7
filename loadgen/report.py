"""report.json, requests.csv, report.html and the terminal summary (schema: docs/report-schema.md)."""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from loadgen.analysis import Analysis
from loadgen.runner import LevelRun

SCHEMA_VERSION = "1.0"


class ReportError(ValueError):
    """A report file that cannot be read; one line for the CLI."""


def build(
    config: dict[str, Any], analysis: Analysis, *, partial: bool, started_unix_s: float, duration_s: float
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "generator": "qtrap loadgen",
        "partial": partial,
        "started_unix_s": started_unix_s,
        "duration_s": duration_s,
        "config": config,
        "baseline": analysis.baseline,
        "accuracy": analysis.accuracy,
        "levels": analysis.levels,
        "crossovers": analysis.crossovers,
        "indices": analysis.indices,
    }


def _clean(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def write_json(report: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(_clean(report), indent=2) + "\n")
    return path


def load(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except OSError as e:
        raise ReportError(f"cannot read {p}: {e.strerror or e}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{p} is not a JSON report: {e}") from e
    if not isinstance(doc, dict) or "schema_version" not in doc or "levels" not in doc:
        raise ReportError(f"{p} is not a qtrap loadgen report (no schema_version/levels)")
    if str(doc["schema_version"]).split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise ReportError(f"{p} has schema {doc['schema_version']}; this loadgen reads {SCHEMA_VERSION}")
    return doc


CSV_FIELDS = [
    "precision", "concurrency", "repeat", "chain_id", "warmup", "hops", "hop", "in_window", "request_id",
    "backend", "status", "error", "prompt_tokens", "completion_tokens", "ttft_s", "itl_s", "e2e_s",
    "energy_j", "energy_final", "error_bound_j", "energy_null_reason", "chain_correct", "chain_correct_flexible",
]  # fmt: skip


def write_csv(runs: list[LevelRun], path: Path) -> Path:
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
                            "chain_correct": "" if chain.score is None else int(chain.score.strict),
                            "chain_correct_flexible": ""
                            if chain.score is None
                            else int(chain.score.flexible),
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


def crossover_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    for cx in report.get("crossovers", []):
        rows.append(
            [
                f"{cx['precision']} vs {cx['baseline']}",
                cx["metric"],
                fmt(cx.get("b_star")),
                fmt_ci(cx.get("ci")),
                "-" if cx.get("ci_coverage") is None else f"{cx['ci_coverage']:.0%}",
                cx.get("direction") or "-",
                "  ".join(f"c={c}:{fmt(r)}" for c, r in zip(cx["concurrency"], cx["ratio"], strict=True)),
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


def level_rows(report: dict[str, Any]) -> list[list[str]]:
    rows = []
    order = list(dict.fromkeys(lv["precision"] for lv in report["levels"]))
    for lv in sorted(report["levels"], key=lambda lv: (lv["concurrency"], order.index(lv["precision"]))):
        ci = lv.get("ci") or {}
        ttft = (lv.get("ttft_s") or {}).get("p50")
        rows.append(
            [
                lv["precision"],
                str(lv["concurrency"]),
                str(lv["chains"]),
                fmt(lv["accuracy"]),
                fmt(lv["j_per_token"]),
                fmt_ci(ci.get("j_per_token")),
                fmt(lv["j_per_correct"]),
                fmt_ci(ci.get("j_per_correct")),
                fmt(lv["tokens_per_s"], 4),
                "-" if ttft is None else f"{ttft * 1e3:.1f}",
                f"{lv['errors']}/{lv['requests']}",
            ]
        )
    return rows


def print_summary(report: dict[str, Any], console: Console) -> None:
    t = Table(title="Levels (energy over each level's steady-state window; accuracy of its measured chains)")
    for h in LEVEL_HEAD:
        t.add_column(h, justify="right" if h not in ("precision",) else "left")
    for row in level_rows(report):
        t.add_row(*row)
    console.print(t)
    t = Table(
        title=f"B*: where a quantized precision's energy crosses {report.get('baseline') or 'the baseline'}'s"
    )
    for h in CROSS_HEAD:
        t.add_column(h)
    for row in crossover_rows(report):
        t.add_row(*row)
    if not report.get("crossovers"):
        t.add_row(
            "-", "-", "-", "-", "-", "no baseline (fp16/bf16) or a single precision: nothing to compare", "-"
        )
    console.print(t)
    for lv in report["levels"]:
        if lv["energy_j"] is None:
            console.print(
                f"energy unknown for {lv['precision']} at concurrency {lv['concurrency']}: {lv['energy_null_reason']}"
            )
    if report.get("partial"):
        console.print("[bold]partial report[/bold]: the run was interrupted")


# -- HTML -----------------------------------------------------------------------------------------------


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee;margin:0.5em 0}
.note{color:#555;font-size:0.9em}code{background:#f6f6f6;padding:1px 4px}"""


def write_html(report: dict[str, Any], plots: list[Path], path: Path) -> Path:
    cfg = report.get("config", {})
    imgs = "".join(
        f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}"></figure>'
        for p in plots
    )
    acc_rows = [
        [p, str(a["chains"]), fmt(a["accuracy"]), fmt_ci(a.get("ci")), fmt(a.get("accuracy_flexible"))]
        for p, a in report.get("accuracy", {}).items()
    ]
    idx_rows = [
        [
            i["precision"],
            str(i["concurrency"]),
            fmt(i["casting_overhead_ratio"]),
            fmt(i["trust_index"]),
            fmt(i["sustainability_index"]),
            fmt(i["economy_index"]),
            fmt(i["composite_index"]),
        ]
        for i in report.get("indices", [])
    ]
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>qtrap loadgen report</title><style>{_CSS}</style></head>
<body>
<h1>qtrap loadgen report{" (partial)" if report.get("partial") else ""}</h1>
<p class="note">model <code>{html.escape(str(cfg.get("model")))}</code>, dataset <code>{html.escape(str(cfg.get("dataset")))}</code>,
hops as <code>{html.escape(str(cfg.get("hops")))}</code>, concurrency {html.escape(str(cfg.get("concurrency")))},
repeats {html.escape(str(cfg.get("repeats")))}, proxy <code>{html.escape(str(cfg.get("proxy")))}</code>; schema {report["schema_version"]}.</p>
<h2>B*</h2>
{_table(CROSS_HEAD, crossover_rows(report))}
<p class="note">Ratio = quantized / {html.escape(str(report.get("baseline")))}; B* interpolated on log(concurrency);
the interval is the bootstrap percentile interval of B* over the replicates that cross in the same direction
("replicates crossing").</p>
{imgs}
<h2>Levels</h2>
{_table(LEVEL_HEAD, level_rows(report))}
<h2>Accuracy (all measured chains of a precision)</h2>
{_table(["precision", "chains", "accuracy (strict)", "95% CI", "accuracy (flexible)"], acc_rows)}
<h2>Indices</h2>
{_table(["precision", "concurrency", "casting overhead", "trust", "sustainability", "economy", "composite"], idx_rows)}
<p class="note">Definitions: docs/methodology.md in the qtrap repository.</p>
</body></html>
"""
    path.write_text(doc)
    return path
