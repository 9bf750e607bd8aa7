"""PNG plots of a report (matplotlib, no display needed)."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from loadgen.schema import Level, Metric, Report

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _by_precision(report: Report) -> dict[str, list[Level]]:
    out: dict[str, list[Level]] = {}
    for lv in report.levels:
        out.setdefault(lv.precision, []).append(lv)
    for v in out.values():
        v.sort(key=lambda lv: lv.concurrency)
    return out


def _color(report: Report, precision: str) -> str:
    names = list(dict.fromkeys(lv.precision for lv in report.levels))
    return _COLORS[names.index(precision) % len(_COLORS)]


def _metric(lv: Level, metric: Metric) -> tuple[float | None, list[float] | None]:
    """A level's figure and its interval."""
    if metric == "j_per_token":
        return lv.j_per_token, lv.ci.j_per_token
    return lv.j_per_correct, lv.ci.j_per_correct


def _metric_panel(ax: Axes, report: Report, metric: Metric, label: str) -> None:
    for p, levels in _by_precision(report).items():
        pts: list[tuple[int, float, list[float] | None]] = []
        for lv in levels:
            y, ci = _metric(lv, metric)
            if y is not None:
                pts.append((lv.concurrency, y, ci))
        if not pts:
            continue
        xs = [x for x, _, _ in pts]
        ys = [y for _, y, _ in pts]
        lo = [y - ci[0] if ci else 0.0 for _, y, ci in pts]
        hi = [ci[1] - y if ci else 0.0 for _, y, ci in pts]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=p, color=_color(report, p))
    for cx in report.crossovers:
        if cx.metric == metric and cx.b_star is not None:
            ax.axvline(cx.b_star, ls="--", color=_color(report, cx.precision), alpha=0.7)
            ax.annotate(
                f"B*={cx.b_star:.3g}",
                (cx.b_star, 0.97),
                xycoords=("data", "axes fraction"),
                rotation=90,
                va="top",
                ha="right",
                fontsize=8,
                color=_color(report, cx.precision),
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrency (chains in flight)")
    ax.set_ylabel(label)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _not_measured(ax: Axes, report: Report, title: str) -> None:
    ax.set_title(title)
    ax.text(
        0.5,
        0.5,
        "accuracy not measured\n\n" + textwrap.fill(report.accuracy_null_reason or "", 34),
        ha="center",
        va="center",
        transform=ax.transAxes,
        fontsize=10,
        color="#555",
    )
    ax.set_xticks([])
    ax.set_yticks([])


def energy_plot(report: Report, path: Path) -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    _metric_panel(axes[0], report, "j_per_token", "J per output token")
    axes[0].set_title("Energy per token")
    scored = report.accuracy_measured
    if scored:
        _metric_panel(axes[1], report, "j_per_correct", "J per correct answer")
        axes[1].set_title("Energy per correct answer")
    else:
        _not_measured(axes[1], report, "Energy per correct answer")
    # the ratio of J per correct answer; of J/token when answers were not scored
    metric: Metric = "j_per_correct" if scored else "j_per_token"
    ax = axes[2]
    for cx in report.crossovers:
        if cx.metric != metric:
            continue
        cis = cx.ratio_ci or [None] * len(cx.concurrency)
        pts = [(c, r, ci) for c, r, ci in zip(cx.concurrency, cx.ratio, cis, strict=True) if r is not None]
        if pts:
            ax.errorbar(
                [c for c, _, _ in pts],
                [r for _, r, _ in pts],
                yerr=[
                    [r - ci[0] if ci else 0.0 for _, r, ci in pts],
                    [ci[1] - r if ci else 0.0 for _, r, ci in pts],
                ],
                marker="o",
                capsize=3,
                label=f"{cx.precision} / {cx.baseline}",
                color=_color(report, cx.precision),
            )
        if cx.b_star is not None:
            ax.axvline(cx.b_star, ls="--", color=_color(report, cx.precision), alpha=0.7)
    ax.axhline(1.0, color="black", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency (chains in flight)")
    ax.set_ylabel("ratio of J per correct answer" if scored else "ratio of J per token")
    ax.set_title("Quantized vs baseline (>1: the trap)")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(fig, path)


def accuracy_plot(report: Report, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    if not report.accuracy_measured:
        _not_measured(ax, report, "Accuracy by hop depth")
        return _save(fig, path)
    for p, acc in report.accuracy.items():
        hops = sorted(acc.by_hops, key=int)
        if hops:
            ax.plot(
                [int(h) for h in hops],
                [acc.by_hops[h].accuracy for h in hops],
                marker="o",
                label=p,
                color=_color(report, p),
            )
    ax.set_xlabel("hops in the chain")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Accuracy by hop depth")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(fig, path)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def throughput_plot(report: Report, path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    positive = False
    for p, levels in _by_precision(report).items():
        color = _color(report, p)

        def series(
            get: Callable[[Level], float | None], levels: list[Level] = levels
        ) -> tuple[list[int], list[float]]:
            pts = [(lv.concurrency, v) for lv in levels if (v := get(lv)) is not None]
            return [c for c, _ in pts], [v for _, v in pts]

        xs, ys = series(lambda lv: lv.tokens_per_s)
        axes[0].plot(xs, ys, marker="o", label=p, color=color)
        latencies: list[tuple[Callable[[Level], float | None], str, str, str]] = [
            (lambda lv: _ms(lv.ttft_s.p50), "o", "-", "TTFT p50"),
            (lambda lv: _ms(lv.e2e_s.p50), "s", "--", "request p50"),
        ]
        for get, marker, ls, what in latencies:
            xs, ys = series(get)
            positive |= any(y > 0 for y in ys)
            axes[1].plot(xs, ys, marker=marker, ls=ls, label=f"{p} {what}", color=color)
    axes[0].set_ylabel("output tokens/s (steady state)")
    axes[0].set_title("Throughput")
    axes[1].set_ylabel("ms")
    if positive:
        axes[1].set_yscale("log")
    axes[1].set_title("Latency")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (chains in flight)")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _save(fig, path)


def all_plots(report: Report, out: Path) -> list[Path]:
    return [
        energy_plot(report, out / "energy.png"),
        accuracy_plot(report, out / "accuracy_by_hops.png"),
        throughput_plot(report, out / "throughput_latency.png"),
    ]
