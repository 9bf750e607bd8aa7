"""``python -m loadgen compare``: several finished runs side by side (e.g. model sizes: where does the trap
dissolve? The seed paper calls that size the critical model scale)."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from loadgen.report import ReportError, b_star_text, fmt, fmt_ci, load
from loadgen.schema import Report


def compare(paths: list[Path], metric: str = "j_per_correct") -> int:
    reports: list[tuple[Path, Report]] = []
    for p in paths:
        try:
            reports.append((p, load(p / "report.json" if p.is_dir() else p)))
        except ReportError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    t = Table(title=f"B* by run ({metric}: quantized / baseline)")
    for h in (
        "run",
        "model",
        "dataset",
        "precision",
        "baseline",
        "B*",
        "95% CI",
        "direction",
        "ratio by concurrency",
    ):
        t.add_column(h)
    for path, rep in reports:
        cfg = rep.config
        rows = [cx for cx in rep.crossovers if cx.metric == metric]
        if not rows:
            t.add_row(
                str(path),
                str(cfg.model),
                str(cfg.dataset),
                "-",
                "-",
                "-",
                "-",
                "no comparison in this run",
                "-",
            )
        for cx in rows:
            ratios = "  ".join(f"c={c}:{fmt(r)}" for c, r in zip(cx.concurrency, cx.ratio, strict=True))
            t.add_row(
                str(path), str(cfg.model), str(cfg.dataset), cx.precision, cx.baseline,
                b_star_text(cx), fmt_ci(cx.ci), cx.direction or "-", ratios,
            )  # fmt: skip
    Console().print(t)
    return 0
