"""The report's plots (matplotlib, no display needed), each written as PNG (embedded in report.html) and
SVG beside it. Sized to be read at report.html's width (at most 1,200 px: 12 inches at 100 dpi)."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from loadgen.report import b_star_text
from loadgen.schema import Crossover, Level, Metric, Report

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
DPI = 100
_STYLE: dict[str, Any] = {
    "font.size": 11,
    "axes.titlesize": 13,
    "axes.labelsize": 11,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 10,
    "figure.titlesize": 14,
    "svg.fonttype": "none",  # text stays text in the SVGs
}
_TRAP = "#d62728"
_WINDOW = "#f0e442"


@contextmanager
def _style() -> Iterator[None]:
    with plt.rc_context(cast(Any, _STYLE)):
        yield


def _save(fig: Figure, path: Path) -> Path:
    """``path`` (.png) and the same figure as .svg beside it."""
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    fig.savefig(path.with_suffix(".svg"), bbox_inches="tight")
    plt.close(fig)
    return path


def _by_precision(report: Report) -> dict[str, list[Level]]:
    out: dict[str, list[Level]] = {}
    for lv in report.levels:
        out.setdefault(lv.precision, []).append(lv)
    for v in out.values():
        v.sort(key=lambda lv: lv.concurrency)
    return out


def _precisions(report: Report) -> list[str]:
    return list(dict.fromkeys(lv.precision for lv in report.levels))


def _color(report: Report, precision: str) -> str:
    names = _precisions(report)
    i = names.index(precision) if precision in names else len(names)
    return _COLORS[i % len(_COLORS)]


def _concurrencies(report: Report) -> list[int]:
    return sorted({lv.concurrency for lv in report.levels})


def _nudge(report: Report, precision: str, spread: float = 0.06) -> Callable[[float], float]:
    """Shift a precision's points sideways (a fraction of an octave on the log axis) so that the error bars
    of precisions at the same concurrency do not hide one another."""
    names = _precisions(report)
    k = names.index(precision) - (len(names) - 1) / 2 if precision in names else 0.0
    return lambda x: x * 2 ** (k * spread)


def _plain(v: float, _pos: object = None) -> str:
    """0.05, 0.2, 1, 2000: no exponents."""
    if v >= 1 and abs(v - round(v)) < 1e-9 * max(1.0, v):
        return f"{round(v)}"
    return f"{v:.3g}" if v >= 1e-3 else f"{v:.2e}"


_NICE = (
    (1.0, 2.0, 5.0),
    (1.0, 1.5, 2.0, 3.0, 5.0, 7.0),
    (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0),
)


def _log_y(ax: Axes) -> None:
    """Log y axis with plain labels at 1-2-5 steps (denser when that gives fewer than 5) rather than 2x10^-1; call it
    once the axis' data are drawn."""
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    if not (lo > 0 and hi > lo):
        return
    ticks: list[float] = []
    for subs in _NICE:
        ticks = [
            m * 10.0**k
            for k in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
            for m in subs
            if lo <= m * 10.0**k <= hi
        ]
        if len(ticks) >= 5:
            break
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(_plain))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_ylim(lo, hi)


def _concurrency_axis(ax: Axes, concs: Sequence[int]) -> None:
    """Log2 axis ticked and labelled at the swept concurrencies only, as plain numbers."""
    ax.set_xscale("log", base=2)
    if concs:
        ax.xaxis.set_major_locator(FixedLocator([float(c) for c in concs]))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
        ax.xaxis.set_minor_locator(NullLocator())
        lo, hi = min(concs), max(concs)
        pad = 2 ** (0.35 if hi > lo else 1.0)
        ax.set_xlim(lo / pad, hi * pad)
    ax.set_xlabel("concurrency (chains in flight)")


def _metric(lv: Level, metric: Metric) -> tuple[float | None, list[float] | None]:
    """A level's figure and its interval."""
    if metric == "j_per_token":
        return lv.j_per_token, lv.ci.j_per_token
    return lv.j_per_correct, lv.ci.j_per_correct


def _bstar_label(cx: Crossover) -> str:
    who = f"{cx.precision} B*"
    if cx.b_star is None:
        if cx.status == "not_determined":
            why = f": {cx.undetermined_reason}" if cx.undetermined_reason else ""
            return f"{who}: {b_star_text(cx)}{why}"
        if cx.status == "none_in_range" or (cx.status is None and cx.direction):
            return f"{who}: no crossover in the swept range"
        return f"{who}: - ({cx.undetermined_reason or cx.note or 'too few levels'})"
    ci = "" if not cx.ci else f", 95% CI [{cx.ci[0]:.3g}, {cx.ci[1]:.3g}]"
    return f"{who} = {cx.b_star:.3g}{ci}"


def _mark_bstar(ax: Axes, report: Report, metric: Metric) -> list[str]:
    """B* of each crossover on ``metric`` as a dashed line with its interval shaded (legend entries);
    the lines of text for crossovers without a B* ("not determined", "none in range")."""
    notes = []
    for cx in report.crossovers:
        if cx.metric != metric:
            continue
        color = _color(report, cx.precision)
        if cx.b_star is None:
            notes.append(_bstar_label(cx))
            if cx.status == "not_determined" and cx.b_star_point is not None:
                ax.axvline(cx.b_star_point, ls=":", color=color, alpha=0.6, lw=1.2)
            continue
        if cx.ci:  # the interval: shaded, its ends drawn thin
            ax.axvspan(cx.ci[0], cx.ci[1], color=color, alpha=0.15, lw=0)
            for end in cx.ci:
                ax.axvline(end, color=color, lw=0.8, ls=":", alpha=0.9)
        ax.axvline(cx.b_star, ls="--", color=color, lw=1.6, label=_bstar_label(cx))
    return notes


def _legend(ax: Axes, notes: list[str]) -> None:
    """The axes' legend, with the B* notes ("not determined", "none in range") as entries without a mark."""
    handles, labels = ax.get_legend_handles_labels()
    # the precisions' series first, then B*s (matplotlib lists plain lines before error bars)
    order = sorted(range(len(handles)), key=lambda i: not isinstance(handles[i], ErrorbarContainer))
    handles, labels = [handles[i] for i in order], [labels[i] for i in order]
    for n in notes:
        handles.append(Line2D([], [], ls="none"))
        labels.append(textwrap.fill(n, 60))
    if handles:  # below the axes: it never hides a point
        ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False,
                  fontsize=10, handlelength=1.8)  # fmt: skip


def _errorbar(
    ax: Axes,
    xs: Sequence[float],
    ys: Sequence[float],
    cis: Sequence[Sequence[float] | None],
    **kw: object,
) -> None:
    # a percentile bootstrap interval may miss its point estimate (few chains): the bar then ends at the point
    lo = [max(0.0, y - ci[0]) if ci else 0.0 for y, ci in zip(ys, cis, strict=True)]
    hi = [max(0.0, ci[1] - y) if ci else 0.0 for y, ci in zip(ys, cis, strict=True)]
    ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", ms=6, capsize=4, lw=1.8, elinewidth=1.4, **kw)  # type: ignore[arg-type]


def _metric_panel(ax: Axes, report: Report, metric: Metric, label: str) -> None:
    for p, levels in _by_precision(report).items():
        pts = [(lv.concurrency, y, ci) for lv in levels for y, ci in [_metric(lv, metric)] if y is not None]
        if not pts:
            continue
        nudge = _nudge(report, p)
        _errorbar(
            ax,
            [nudge(x) for x, _, _ in pts],
            [y for _, y, _ in pts],
            [ci for _, _, ci in pts],
            label=p,
            color=_color(report, p),
        )
    notes = _mark_bstar(ax, report, metric)
    _concurrency_axis(ax, _concurrencies(report))
    _log_y(ax)
    ax.set_ylabel(label)
    ax.grid(True, which="major", alpha=0.35)
    _legend(ax, notes)


def _not_measured(ax: Axes, report: Report, title: str) -> None:
    ax.set_title(title)
    ax.text(
        0.5,
        0.5,
        "accuracy not measured\n\n" + textwrap.fill(report.accuracy_null_reason or "", 40),
        ha="center",
        va="center",
        transform=ax.transAxes,
        fontsize=12,
        color="#555",
    )
    ax.set_xticks([])
    ax.set_yticks([])


def energy_plot(report: Report, path: Path) -> Path:
    """J per output token and J per correct answer against concurrency, 95% intervals as error bars,
    B* of each quantized precision with its interval shaded; J/token alone when answers were not scored."""
    with _style():
        if not report.accuracy_measured:
            fig, ax = plt.subplots(figsize=(8, 5.2))
            _metric_panel(ax, report, "j_per_token", "J per output token")
            ax.set_title("Energy per output token (95% CI)")
            why = textwrap.fill(
                f"J per correct answer: accuracy not measured ({report.accuracy_null_reason})", 90
            )
            fig.suptitle(f"B*: dashed, its 95% CI shaded\n{why}", fontsize=11)
            return _save(fig, path)
        fig, axes = plt.subplots(1, 2, figsize=(12, 5))
        _metric_panel(axes[0], report, "j_per_token", "J per output token")
        axes[0].set_title("Energy per output token (95% CI)")
        _metric_panel(axes[1], report, "j_per_correct", "J per correct answer")
        axes[1].set_title("Energy per correct answer (95% CI)")
        fig.suptitle("Energy per token and per correct answer; B*: dashed, its 95% CI shaded")
        return _save(fig, path)


def ratio_plot(report: Report, path: Path) -> Path:
    """Quantized / baseline by concurrency with the ratio's intervals; the trap (ratio > 1) shaded."""
    metrics: list[Metric] = ["j_per_correct", "j_per_token"] if report.accuracy_measured else ["j_per_token"]
    names = {"j_per_correct": "J per correct answer", "j_per_token": "J per output token"}
    with _style():
        fig, axes = plt.subplots(1, len(metrics), figsize=(12 if len(metrics) > 1 else 7.5, 5), squeeze=False)
        for ax, metric in zip(axes[0], metrics, strict=True):
            ratios: list[float] = []
            for cx in report.crossovers:
                if cx.metric != metric:
                    continue
                cis = cx.ratio_ci or [None] * len(cx.concurrency)
                pts = [
                    (c, r, ci)
                    for c, r, ci in zip(cx.concurrency, cx.ratio, cis, strict=True)
                    if r is not None
                ]
                if not pts:
                    continue
                nudge = _nudge(report, cx.precision)
                ratios += [r for _, r, _ in pts] + [v for _, _, ci in pts if ci for v in ci]
                _errorbar(
                    ax,
                    [nudge(c) for c, _, _ in pts],
                    [r for _, r, _ in pts],
                    [ci for _, _, ci in pts],
                    label=f"{cx.precision} / {cx.baseline}",
                    color=_color(report, cx.precision),
                )
            notes = _mark_bstar(ax, report, metric)
            _concurrency_axis(ax, _concurrencies(report))
            top = max([1.5, *(r * 1.1 for r in ratios if math.isfinite(r))])
            bottom = min([0.67, *(r / 1.1 for r in ratios if math.isfinite(r) and r > 0)])
            ax.set_yscale("log")
            ax.set_ylim(bottom, top)
            _log_y(ax)
            ax.axhspan(1.0, top, color=_TRAP, alpha=0.08, lw=0, gid="trap")
            ax.axhline(1.0, color="black", lw=1.2)
            # said in the right margin, where no point can hide it
            side = ax.get_yaxis_transform()
            ax.text(1.015, math.sqrt(top), "trap: quantized\ncosts more", transform=side, rotation=90, ha="left",
                    va="center", color=_TRAP, fontsize=10)  # fmt: skip
            ax.text(1.015, math.sqrt(bottom), "quantized\nsaves energy", transform=side, rotation=90,
                    ha="left", va="center", color="#2a7a2a", fontsize=10)  # fmt: skip
            ax.set_ylabel(f"{names[metric]}: quantized / {report.baseline or 'baseline'}")
            ax.set_title(f"Ratio of {names[metric]} (95% CI)")
            ax.grid(True, which="major", alpha=0.35)
            if not ax.get_legend_handles_labels()[0]:
                notes.append("no quantized precision to compare with a baseline")
            _legend(ax, notes)
        fig.suptitle("Quantized vs baseline: above 1 (shaded) the quantized precision costs more energy")
        fig.subplots_adjust(wspace=0.45)  # room for the margin's words before the next panel's axis
        return _save(fig, path)


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default)."""
    if n <= 0:
        return (0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def accuracy_plot(report: Report, path: Path) -> Path:
    """Accuracy by the chain's hop count per precision, Wilson 95% intervals, n per point; precisions
    jittered sideways."""
    with _style():
        fig, ax = plt.subplots(figsize=(9, 5))
        if not report.accuracy_measured:
            _not_measured(ax, report, "Accuracy by hop depth")
            return _save(fig, path)
        names = list(report.accuracy)
        hops_all = sorted({int(h) for a in report.accuracy.values() for h in a.by_hops})
        ns = {
            h: {a.by_hops[str(h)].chains for a in report.accuracy.values() if str(h) in a.by_hops}
            for h in hops_all
        }
        same_n = all(len(v) == 1 for v in ns.values())
        width = 0.5
        for k, p in enumerate(names):
            acc = report.accuracy[p]
            hops = sorted(int(h) for h in acc.by_hops)
            if not hops:
                continue
            off = (k - (len(names) - 1) / 2) * width / max(1, len(names) - 1) if len(names) > 1 else 0.0
            xs = [h + off for h in hops]
            ys = [acc.by_hops[str(h)].accuracy for h in hops]
            cis = [wilson(acc.by_hops[str(h)].correct, acc.by_hops[str(h)].chains) for h in hops]
            color = _color(report, p)
            _errorbar(ax, xs, ys, [list(c) for c in cis], label=p, color=color, alpha=0.9)
            if not same_n:
                for x, y, h in zip(xs, ys, hops, strict=True):
                    ax.annotate(
                        f"n={acc.by_hops[str(h)].chains}",
                        (x, y),
                        textcoords="offset points",
                        xytext=(0, 7),
                        ha="center",
                        fontsize=8,
                        color=color,
                    )
        ax.set_xticks(hops_all)
        ax.set_xticklabels([f"{h}\nn={next(iter(ns[h]))}" if same_n else str(h) for h in hops_all])
        ax.set_xlabel("hops in the chain" + (" (n: chains per precision)" if same_n else ""))
        ax.set_ylabel("accuracy (strict)")
        ax.set_ylim(-0.03, 1.05)
        ax.set_title("Accuracy by hop depth (Wilson 95% intervals)")
        ax.grid(True, alpha=0.35)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower left", framealpha=0.9)
        return _save(fig, path)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def throughput_plot(report: Report, path: Path) -> Path:
    """Steady-state throughput and latency (p50, p99) against concurrency."""
    with _style():
        fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
        concs = _concurrencies(report)
        positive = [False, False]
        for p, levels in _by_precision(report).items():
            color = _color(report, p)

            def series(
                get: Callable[[Level], float | None], levels: list[Level] = levels
            ) -> tuple[list[int], list[float]]:
                pts = [(lv.concurrency, v) for lv in levels if (v := get(lv)) is not None]
                return [c for c, _ in pts], [v for _, v in pts]

            xs, ys = series(lambda lv: lv.tokens_per_s)
            axes[0].plot(xs, ys, marker="o", lw=1.8, label=p, color=color)
            panels: list[tuple[int, Callable[[Level], float | None], Callable[[Level], float | None]]] = [
                (1, lambda lv: _ms(lv.ttft_s.p50), lambda lv: _ms(lv.ttft_s.p99)),
                (2, lambda lv: lv.e2e_s.p50, lambda lv: lv.e2e_s.p99),
            ]
            for i, p50, p99 in panels:
                for get, ls, marker in ((p50, "-", "o"), (p99, "--", "^")):
                    xs, ys = series(get)
                    positive[i - 1] |= any(y > 0 for y in ys)
                    axes[i].plot(xs, ys, marker=marker, ls=ls, lw=1.6, color=color)
        axes[0].set_ylabel("output tokens/s (steady state)")
        axes[0].set_title("Throughput")
        axes[1].set_ylabel("ms")
        axes[1].set_title("Time to first token")
        axes[2].set_ylabel("s")
        axes[2].set_title("Request latency (send to last token)")
        for i in (1, 2):
            if positive[i - 1]:
                _log_y(axes[i])
        for ax in axes:
            _concurrency_axis(ax, concs)
            ax.grid(True, which="major", alpha=0.35)
        handles: list[Artist] = [Patch(color=_color(report, p), label=p) for p in _precisions(report)]
        handles += [
            Line2D([], [], color="#444", ls="-", marker="o", label="p50"),
            Line2D([], [], color="#444", ls="--", marker="^", label="p99"),
        ]
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False,
                   bbox_to_anchor=(0.5, -0.02))  # fmt: skip
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        return _save(fig, path)


def timeline_plot(report: Report, path: Path) -> Path:
    """Each level over time (its first repeat): the requests' attributed power, the devices' measured mean
    power over the window, and output tokens/s; the steady-state window shaded between its edges."""
    precisions = _precisions(report)
    concs = _concurrencies(report)
    grid = {(lv.precision, lv.concurrency): lv for lv in report.levels}
    if not any(lv.timeline for lv in report.levels):
        with _style():
            fig, ax = plt.subplots(figsize=(10, 2.2))
            ax.set_title("Power and throughput over time per level")
            ax.text(0.5, 0.5, "not in this report: levels carry their timeline from schema 1.4 on", ha="center",
                    va="center", transform=ax.transAxes, color="#555")  # fmt: skip
            ax.set_xticks([])
            ax.set_yticks([])
            return _save(fig, path)
    with _style():
        rows, cols = max(1, len(precisions)), max(1, len(concs))
        fig, axes = plt.subplots(rows, cols, figsize=(min(13.0, 4.2 * cols), 2.6 * rows + 0.9), squeeze=False)
        for r, p in enumerate(precisions):
            for c, conc in enumerate(concs):
                ax = axes[r][c]
                lv = grid.get((p, conc))
                tl = lv.timeline if lv is not None else None
                ax.set_title(f"{p}, concurrency {conc}", fontsize=11)
                if tl is None:
                    ax.text(0.5, 0.5, "no timeline", ha="center", va="center", transform=ax.transAxes,
                            color="#777")  # fmt: skip
                    ax.set_xticks([])
                    ax.set_yticks([])
                    continue
                ts = [t + tl.bin_s / 2 for t in tl.t_s]
                if tl.window_s:
                    ax.axvspan(tl.window_s[0], tl.window_s[1], color=_WINDOW, alpha=0.25, lw=0)
                    for edge in tl.window_s:
                        ax.axvline(edge, color="#8a7a00", lw=1.2, ls="-")
                ax.plot(ts, tl.attributed_power_w, color=_color(report, p), lw=1.8)
                if tl.measured_power_w is not None and tl.window_s:
                    ax.hlines(tl.measured_power_w, tl.window_s[0], tl.window_s[1], colors="black",
                              linestyles="--", lw=1.4)  # fmt: skip
                ax.set_ylim(bottom=0)
                ax.grid(True, alpha=0.3)
                if c == 0:
                    ax.set_ylabel("W")
                if r == rows - 1:
                    ax.set_xlabel("s since the level started")
                tw = ax.twinx()
                tw.plot(ts, tl.tokens_per_s, color="#777", lw=1.2, ls="-", alpha=0.8)
                tw.set_ylim(bottom=0)
                tw.tick_params(axis="y", colors="#666", labelsize=9)
                if c == cols - 1:
                    tw.set_ylabel("tokens/s", color="#666")
        handles = [
            Line2D([], [], color="#333", lw=1.8, label="attributed power (W, left; the precision's colour)"),
            Line2D([], [], color="black", lw=1.4, ls="--", label="measured mean power over the window"),
            Line2D([], [], color="#777", lw=1.2, label="output tokens/s (right)"),
            Patch(color=_WINDOW, alpha=0.4, label="steady-state window"),
        ]
        fig.suptitle(
            "Power and throughput over time per level (first repeat; warm-up before the window, drain after)"
        )
        fig.tight_layout(rect=(0, 0.6 / (2.6 * rows + 0.9), 1, 1))
        fig.legend(handles=handles, loc="lower center", ncol=2, frameon=False, bbox_to_anchor=(0.5, 0.0))
        return _save(fig, path)


def idle_plot(report: Report, path: Path) -> Path:
    """Each device's measured energy split into attributed (to requests), idle and foreign, as shares, over
    the proxy's lifetime (``energy.devices``)."""
    devices = [d for d in report.energy.devices if d.measured_j]
    with _style():
        fig, ax = plt.subplots(figsize=(10, 0.6 * max(2, len(devices)) + 1.6))
        ax.set_title("Where each device's energy went (the proxy's lifetime): idle share")
        if not devices:
            ax.text(0.5, 0.5, f"no energy accounts: {report.energy.null_reason or 'none'}", ha="center",
                    va="center", transform=ax.transAxes, color="#555")  # fmt: skip
            ax.set_xticks([])
            ax.set_yticks([])
            return _save(fig, path)
        parts = [("attributed", "attributed_j", "#4c72b0"), ("idle", "idle_j", "#bbbbbb"),
                 ("foreign", "foreign_j", "#dd8452")]  # fmt: skip
        served = {d: b.name for b in (report.context.backends if report.context else []) for d in b.devices}
        labels = [f"{d.device} ({served[d.device]})" if d.device in served else d.device for d in devices]
        left = [0.0] * len(devices)
        for name, key, color in parts:
            shares = [(getattr(d, key) or 0.0) / (d.measured_j or 1.0) for d in devices]
            ax.barh(labels, shares, left=left, color=color, label=name, edgecolor="white", height=0.6)
            for i, (s, lft) in enumerate(zip(shares, left, strict=True)):
                if s >= 0.06:
                    ax.text(lft + s / 2, i, f"{s:.0%}", ha="center", va="center", fontsize=10,
                            color="white" if name != "idle" else "#222")  # fmt: skip
            left = [a + b for a, b in zip(left, shares, strict=True)]
        ax.set_xlim(0, 1)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:.0%}"))
        ax.invert_yaxis()
        ax.set_xlabel("share of the device's measured energy (attributed + idle + foreign = measured)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)
        return _save(fig, path)


PLOTS: list[tuple[str, Callable[[Report, Path], Path]]] = [
    ("energy", energy_plot),
    ("ratio", ratio_plot),
    ("accuracy_by_hops", accuracy_plot),
    ("throughput_latency", throughput_plot),
    ("power_timeline", timeline_plot),
    ("idle_share", idle_plot),
]


def all_plots(report: Report, out: Path) -> list[Path]:
    """Every plot as ``out/NAME.png`` and ``out/NAME.svg``; the PNGs' paths."""
    return [draw(report, out / f"{name}.png") for name, draw in PLOTS]
