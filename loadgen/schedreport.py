"""A schedule's outputs: the terminal tables, compare-routing.md and a schedule report's report.html."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from loadgen.report import _CSS, _table, context_lines, fmt, fmt_ci
from loadgen.schema import CompareRouting, Report, ScheduleRun


def _lat(pct: Any) -> str:
    return " / ".join(fmt(getattr(pct, f"p{q}")) for q in (50, 90, 99))


def _share(share: dict[str, float]) -> str:
    return " ".join(f"{p} {v:.0%}" for p, v in share.items()) or "-"


POLICY_HEAD = ["policy", "fleet J", "J/correct", "95% CI", "accuracy", "95% CI", "J/token", "TTFT p50/p90/p99 s",
               "e2e p50/p90/p99 s", "served by"]  # fmt: skip


def _per_answer(
    energy: float | None, correct: int | float | None, tokens: float | None, scored: bool
) -> float | None:
    denom = correct if scored else tokens
    if energy is None or not denom:
        return None
    return energy / denom


def comparison(doc: CompareRouting) -> list[str]:
    """Lines comparing the unpinned policies with the best pinned one, and with the per-window oracle: the
    pinned policy chosen window by window to minimise the whole run's energy per correct answer (per output
    token when not scored), found by Dinkelbach's iteration on the pinned runs' windows. The oracle knows
    each window's outcome in advance and switches for free: a bound no policy reaches, not a target."""
    scored = doc.config.no_score is None
    unit = "J/correct" if scored else "J/token"
    ran = [(p.policy, p.kind, p.run) for p in doc.policies if p.run is not None]
    values = {
        name: _per_answer(run.totals.fleet_energy_j, run.totals.correct, run.totals.tokens, scored)
        for name, _, run in ran
    }
    known = [(name, run) for name, kind, run in ran if kind == "pinned" and values[name] is not None]
    if not known:
        return []
    best_name, _ = min(known, key=lambda nr: values[nr[0]] or 0.0)
    b = values[best_name]
    assert b is not None
    lines = [f"Best pinned policy: {best_name}, {b:.4g} {unit} (fleet energy, idle included)."]
    n = min(len(run.windows) for _, run in known)
    raw = [[(w.energy_j, w.correct if scored else w.tokens) for w in run.windows[:n]] for _, run in known]
    windows: list[list[tuple[float, float]]] = [
        [(float(e), float(c)) for e, c in ws if e is not None and c is not None] for ws in raw
    ]
    if n and all(len(ws) == n for ws in windows):
        lam, e, c = b, 0.0, 0.0
        for _ in range(50):  # Dinkelbach: minimise sum(E) - lam * sum(C) window by window, then lam = E / C
            pick = [
                min(range(len(known)), key=lambda k: windows[k][i][0] - lam * windows[k][i][1])
                for i in range(n)
            ]
            e = sum(windows[k][i][0] for i, k in enumerate(pick))
            c = sum(windows[k][i][1] for i, k in enumerate(pick))
            if not c or abs(e / c - lam) <= 1e-12 * lam:
                break
            lam = e / c
        if c:
            lines.append(
                f"Per-window oracle over the pinned runs' {n} windows: {e / c:.4g} {unit} "
                f"({(e / c) / b - 1:+.1%} against the best pinned; a bound, not a target)."
            )
    for name, kind, _ in ran:
        v = values[name]
        if kind != "pinned" and v is not None:
            lines.append(f"{name}: {v:.4g} {unit}, {v / b - 1:+.1%} against the best pinned policy.")
    return lines


def policy_rows(doc: CompareRouting) -> list[list[str]]:
    rows = []
    for p in doc.policies:
        if p.run is None:
            rows.append([p.policy, "not run", *["-"] * (len(POLICY_HEAD) - 2)])
            continue
        t = p.run.totals
        rows.append(
            [
                p.policy, fmt(t.fleet_energy_j, 4), fmt(t.j_per_correct), fmt_ci(t.j_per_correct_ci),
                fmt(t.accuracy), fmt_ci(t.accuracy_ci), fmt(t.j_per_token), _lat(t.ttft_s), _lat(t.e2e_s),
                _share(t.precision_share),
            ]
        )  # fmt: skip
    return rows


WINDOW_HEAD = ["t s", "offered", "chains in flight", "requests in flight", "tokens/s", "J", "J/token",
               "chains ended", "correct", "J/correct"]  # fmt: skip


def window_rows(run: ScheduleRun) -> list[list[str]]:
    return [
        [
            f"{w.t_start_s:.0f}-{w.t_end_s:.0f}", fmt(w.offered), fmt(w.chains_in_flight), fmt(w.requests_in_flight),
            fmt(w.tokens_per_s), fmt(w.energy_j, 4), fmt(w.j_per_token), str(w.chains_ended), fmt(w.correct),
            fmt(w.j_per_correct),
        ]
        for w in run.windows
    ]  # fmt: skip


def _console() -> Console:
    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 180))


def _print_table(console: Console, title: str, head: list[str], rows: list[list[str]]) -> None:
    t = Table(title=title)
    for i, h in enumerate(head):
        t.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*row)
    console.print(t)


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_markdown(doc: CompareRouting, path: Path) -> Path:
    cfg = doc.config
    parts = [
        f"# compare-routing{' (partial)' if doc.partial else ''}",
        "",
        f"Schedule `{cfg.schedule}` ({cfg.schedule_unit}"
        + (f", {cfg.arrivals} arrivals" if cfg.arrivals else "")
        + f"), model `{cfg.model}`, dataset `{cfg.dataset}`, proxy {cfg.proxy}; schema {doc.schema_version}.",
        "",
        *[f"* {line}" for line in context_lines(doc)],
        "",
        "Fleet energy: every metered device's counter over the policy's run (schedule and drain), idle devices"
        " and idle time included; J/correct = fleet energy / correct answers. Intervals: 95% bootstrap.",
        "",
        _md_table(POLICY_HEAD, policy_rows(doc)),
        "",
        *[f"* {line}" for line in comparison(doc)],
    ]
    for p in doc.policies:
        if p.run is not None:
            parts += [
                "",
                f"## {p.policy} by {p.run.window_s:g} s window",
                "",
                _md_table(WINDOW_HEAD, window_rows(p.run)),
            ]
    path.write_text("\n".join(parts) + "\n")
    return path


SCHED_HEAD = ["precision", "fleet J", "J/token", "J/correct", "95% CI", "accuracy", "tokens/s",
              "TTFT p50/p90/p99 s", "e2e p50/p90/p99 s"]  # fmt: skip


def schedule_rows(report: Report) -> list[list[str]]:
    return [
        [
            s.label, fmt(s.totals.fleet_energy_j, 4), fmt(s.totals.j_per_token), fmt(s.totals.j_per_correct),
            fmt_ci(s.totals.j_per_correct_ci), fmt(s.totals.accuracy), fmt(s.totals.tokens_per_s),
            _lat(s.totals.ttft_s), _lat(s.totals.e2e_s),
        ]
        for s in report.schedules
    ]  # fmt: skip


def render_schedules(report: Report, out: Path) -> None:
    """A schedule report's terminal tables and report.html (no plots)."""
    console = _console()
    for s in report.schedules:
        _print_table(
            console, f"{s.label}: {s.schedule} by {s.window_s:g} s window", WINDOW_HEAD, window_rows(s)
        )
    _print_table(
        console, "Whole runs (fleet energy: every device, idle included)", SCHED_HEAD, schedule_rows(report)
    )
    body = "".join(
        f"<h2>{html.escape(s.label)} by {s.window_s:g} s window</h2>{_table(WINDOW_HEAD, window_rows(s))}"
        for s in report.schedules
    )
    cfg = report.config
    header = "".join(f"<li>{html.escape(line)}</li>" for line in context_lines(report))
    (out / "report.html").write_text(
        f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>qtrap loadgen schedule report</title><style>{_CSS}</style></head>
<body><h1>qtrap loadgen schedule report{" (partial)" if report.partial else ""}</h1>
<p class="note">schedule <code>{html.escape(str(cfg.schedule))}</code> ({html.escape(str(cfg.schedule_unit))}),
model <code>{html.escape(str(cfg.model))}</code>, dataset <code>{html.escape(str(cfg.dataset))}</code>,
proxy <code>{html.escape(str(cfg.proxy))}</code>; schema {report.schema_version}.</p>
{f'<ul class="note">{header}</ul>' if header else ""}
<h2>Whole runs</h2>{_table(SCHED_HEAD, schedule_rows(report))}
{body}
<p class="note">Fleet energy: every metered device's counter over the run (schedule and drain), idle included.
Definitions: docs/methodology.md ("Schedules") in the qtrap repository.</p>
</body></html>
"""
    )
