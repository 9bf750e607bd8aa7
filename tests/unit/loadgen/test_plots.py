"""The report's plots: PNG and SVG of each, the concurrency axis ticked at the swept levels in plain
numbers, B* with its interval shaded (or "not determined" said), the trap region, Wilson intervals by hop
depth with n, jittered precisions; and each level's timeline (power, tokens/s, in flight) from its
requests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib")

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

import loadgen.plots as plots
from loadgen.analysis import level_timeline
from loadgen.client import Exchange
from loadgen.datasets import Problem
from loadgen.runner import Chain, LevelRun
from loadgen.schema import Report
from tests.unit.loadgen.test_report import _report


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """The figures the plot functions draw, kept open instead of written."""
    kept: list[Figure] = []

    def keep(fig: Figure, path: Path) -> Path:
        fig.canvas.draw()  # tick labels are set when drawn
        kept.append(fig)
        return path

    monkeypatch.setattr(plots, "_save", keep)
    return kept


def _labels(ax: Axes, axis: str = "x") -> list[str]:
    ticks = ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()
    return [t.get_text() for t in ticks if t.get_text()]


def _legend(ax: Axes) -> list[str]:
    leg = ax.get_legend()
    return [] if leg is None else [t.get_text() for t in leg.get_texts()]


def _with_crossover(report: Report, metric: str, **change: Any) -> Report:
    doc = report.model_dump()
    for cx in doc["crossovers"]:
        if cx["metric"] == metric:
            cx.update(change)
    return Report.model_validate(doc)


def test_every_plot_is_written_as_png_and_svg(tmp_path: Path) -> None:
    written = plots.all_plots(_report(scored=True), tmp_path)
    names = ["energy", "ratio", "accuracy_by_hops", "throughput_latency", "power_timeline", "idle_share"]
    assert [p.name for p in written] == [f"{n}.png" for n in names]
    for n in names:
        assert (tmp_path / f"{n}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        svg = (tmp_path / f"{n}.svg").read_text()
        assert "<svg" in svg[:1000] and svg.rstrip().endswith("</svg>")


def test_concurrency_axis_is_the_swept_levels_in_plain_numbers(figures: list[Figure]) -> None:
    rep = _report(scored=True)
    swept = sorted({lv.concurrency for lv in rep.levels})
    plots.energy_plot(rep, Path("energy.png"))
    plots.ratio_plot(rep, Path("ratio.png"))
    plots.throughput_plot(rep, Path("t.png"))
    axes = [ax for fig in figures for ax in fig.axes]
    assert len(axes) == 2 + 2 + 3
    for ax in axes:
        assert list(ax.get_xticks()) == swept, ax.get_title()
        assert _labels(ax) == [str(c) for c in swept], ax.get_title()
        for label in _labels(ax, "y"):  # no 2^0, 10^-1 or 6x10^-1 anywhere
            assert not any(ch in label for ch in "^$\\") and "e+" not in label, (ax.get_title(), label)
            float(label.replace(",", "").replace("\u2212", "-").rstrip("%"))


def test_b_star_is_drawn_with_its_interval_shaded(figures: list[Figure]) -> None:
    rep = _report(scored=True)
    [cx] = [c for c in rep.crossovers if c.metric == "j_per_token"]
    assert cx.b_star is not None and cx.ci is not None  # the constructed fleet crosses near 6
    plots.energy_plot(rep, Path("energy.png"))
    ax = figures[0].axes[0]
    bands = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_alpha() and p.get_alpha() < 0.5]
    assert len(bands) == 1  # axvspan from the interval's lower to upper end
    (x0, _), (x1, _) = bands[0].get_bbox().get_points()
    assert (x0, x1) == pytest.approx(tuple(cx.ci))
    dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert [ln.get_xdata()[0] for ln in dashed] == pytest.approx([cx.b_star])
    [entry] = [t for t in _legend(ax) if "B*" in t]
    assert entry.startswith(f"int4 B* = {cx.b_star:.3g}") and f"[{cx.ci[0]:.3g}, {cx.ci[1]:.3g}]" in entry


def test_b_star_not_determined_is_said_and_not_drawn_as_a_number(figures: list[Figure]) -> None:
    rep = _with_crossover(
        _report(scored=True), "j_per_token", b_star=None, ci=None, status="not_determined", b_star_point=5.5,
        undetermined_reason="only 60% of bootstrap replicates cross",
    )  # fmt: skip
    plots.energy_plot(rep, Path("energy.png"))
    ax = figures[0].axes[0]
    assert not [p for p in ax.patches if isinstance(p, Rectangle) and p.get_alpha() and p.get_alpha() < 0.5]
    assert not [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    [entry] = [t for t in _legend(ax) if "B*" in t]
    assert "not determined" in entry and "5.5" in entry


def test_ratio_plot_shades_the_trap_above_one(figures: list[Figure]) -> None:
    rep = _report(scored=True)
    plots.ratio_plot(rep, Path("ratio.png"))
    for ax in figures[0].axes:
        _lo, hi = ax.get_ylim()
        [trap] = [p for p in ax.patches if p.get_gid() == "trap"]
        assert isinstance(trap, Rectangle) and trap.get_facecolor()[0] > 0.7  # red
        (_, y0), (_, y1) = trap.get_bbox().get_points()
        assert y0 == pytest.approx(1.0, rel=1e-6) and y1 == pytest.approx(hi, rel=1e-6)
        texts = [t.get_text() for t in ax.texts]
        assert any("trap" in t for t in texts)
        assert "int4 / bf16" in _legend(ax)


def test_an_interval_that_misses_its_point_is_drawn(figures: list[Figure]) -> None:
    """A percentile bootstrap interval of few chains may lie wholly on one side of its point estimate."""
    doc = _report(scored=True).model_dump()
    lv = doc["levels"][0]
    lv["ci"]["j_per_token"] = [lv["j_per_token"] * 1.1, lv["j_per_token"] * 1.3]
    for cx in doc["crossovers"]:
        cx["ratio_ci"] = [[r * 0.5, r * 0.9] if r else None for r in cx["ratio"]]
    rep = Report.model_validate(doc)
    plots.energy_plot(rep, Path("e.png"))
    plots.ratio_plot(rep, Path("r.png"))
    segments = [s for ax in figures[0].axes for c in ax.collections for s in c.get_segments()]  # type: ignore[attr-defined]
    assert any(s[0][1] == pytest.approx(lv["j_per_token"]) and s[1][1] == pytest.approx(lv["j_per_token"] * 1.3)
               for s in segments)  # fmt: skip


def test_unscored_energy_plot_is_j_per_token_alone(figures: list[Figure]) -> None:
    plots.energy_plot(_report(scored=False), Path("e.png"))
    [ax] = figures[0].axes
    assert ax.get_ylabel() == "J per output token"
    title = figures[0].get_suptitle()  # type: ignore[attr-defined]
    assert "accuracy not measured (random weights" in title.replace("\n", " ")


def test_wilson_interval() -> None:
    assert plots.wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert plots.wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert plots.wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert plots.wilson(0, 0) == (0.0, 1.0)


def test_accuracy_by_hops_has_n_intervals_and_jitter(figures: list[Figure]) -> None:
    rep = _report(scored=True)
    hops = sorted({int(h) for a in rep.accuracy.values() for h in a.by_hops})
    # the precisions scored different numbers of chains per hop count: n beside each point
    assert rep.accuracy["bf16"].by_hops != rep.accuracy["int4"].by_hops
    plots.accuracy_plot(rep, Path("acc.png"))
    ax = figures[0].axes[0]
    assert _labels(ax) == [str(h) for h in hops]
    expected = sorted(f"n={a.by_hops[str(h)].chains}" for a in rep.accuracy.values() for h in hops)
    assert sorted(t.get_text() for t in ax.texts) == expected
    # one line per precision, shifted sideways from the other at every hop, each point within its hop
    lines = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == len(hops) and ln.get_marker() == "o"]
    assert len(lines) == 2
    xs = [list(ln.get_xdata()) for ln in lines]
    assert all(a != b for a, b in zip(*xs, strict=True))
    assert all(abs(x - h) < 0.5 for line in xs for x, h in zip(line, hops, strict=True))
    # Wilson intervals as error bars: bf16's first point
    h0 = rep.accuracy["bf16"].by_hops[str(hops[0])]
    lo, hi = plots.wilson(h0.correct, h0.chains)
    segments = [seg for coll in ax.collections for seg in coll.get_segments()]  # type: ignore[attr-defined]
    assert any(seg[0][1] == pytest.approx(lo) and seg[1][1] == pytest.approx(hi) for seg in segments)
    # the same n at every precision: n once, under the hop count
    doc = rep.model_dump()
    doc["accuracy"]["int4"]["by_hops"] = doc["accuracy"]["bf16"]["by_hops"]
    plots.accuracy_plot(Report.model_validate(doc), Path("acc.png"))
    ax = figures[1].axes[0]
    n = rep.accuracy["bf16"].by_hops
    assert _labels(ax) == [f"{h}\nn={n[str(h)].chains}" for h in hops] and not ax.texts


def _run() -> LevelRun:
    """A level of 4 s: two requests of 2 J each, one of unknown energy, the window from 1 s to 3 s."""
    run = LevelRun("bf16", 2, 0, t_start=100.0, t_end=104.0, window=(101.0, 103.0))
    chain = Chain("c0", 0, Problem("p", "synthetic", "q", "1", 3), warmup=False)
    for hop, (t0, t1, rec) in enumerate(
        [
            (100.0, 102.0, {"final": True, "energy_j": 2.0, "devices": ["gpu0"]}),
            (101.0, 103.0, {"final": True, "energy_j": 2.0, "devices": ["gpu0"]}),
            (102.0, 104.0, {"final": False, "energy_j": None}),
        ]
    ):
        ex = Exchange("c0", hop + 1, t0, status="ok", completion_tokens=10, t_first=t0 + 1.0, t_end=t1)
        ex.record = rec
        chain.exchanges.append(ex)
    run.chains.append(chain)
    return run


def test_level_timeline_from_requests() -> None:
    snap = ({"devices": {"gpu0": {"measured_j": 10.0, "metered_j": 10.0}}},
            {"devices": {"gpu0": {"measured_j": 14.0, "metered_j": 16.0}}})  # fmt: skip
    tl = level_timeline(_run(), snap)
    assert tl is not None
    assert tl["bin_s"] == 0.05 and len(tl["t_s"]) == 80 and tl["t_s"][:2] == [0.0, 0.05]
    assert tl["window_s"] == [1.0, 3.0]
    w = tl["bin_s"]
    # every known joule and every token is in some bin, spread over the request's life
    assert sum(tl["attributed_power_w"]) * w == pytest.approx(4.0)
    assert sum(tl["tokens_per_s"]) * w == pytest.approx(30.0)
    assert sum(tl["in_flight"]) * w == pytest.approx(6.0)  # three requests of 2 s
    assert tl["attributed_power_w"][10] == pytest.approx(1.0)  # 0.5-0.55 s: the first request, 1 W
    assert tl["attributed_power_w"][30] == pytest.approx(2.0)  # 1.5 s: two requests in flight
    assert tl["in_flight"][30] == pytest.approx(2.0) and tl["in_flight"][70] == pytest.approx(1.0)
    assert tl["tokens_per_s"][10] == 0.0 and tl["tokens_per_s"][30] == pytest.approx(10.0)
    assert tl["energy_unknown_requests"] == 1
    assert tl["measured_power_w"] == pytest.approx(3.0)  # (16 - 10) J over the 2 s window (metered_j)
    assert level_timeline(_run(), None)["measured_power_w"] is None  # type: ignore[index]


def test_power_timeline_marks_the_window(figures: list[Figure]) -> None:
    rep = _report(scored=True)
    tl = level_timeline(_run(), None)
    doc = rep.model_dump()
    for lv in doc["levels"]:
        lv["timeline"] = tl
    plots.timeline_plot(Report.model_validate(doc), Path("tl.png"))
    fig = figures[0]
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == len(rep.levels)
    for ax in panels:
        edges = sorted(ln.get_xdata()[0] for ln in ax.get_lines() if len(set(ln.get_xdata())) == 1)
        assert edges == [1.0, 3.0], ax.get_title()
    # a report without timelines (before schema 1.4) says so in one panel
    plots.timeline_plot(rep, Path("none.png"))
    [ax] = figures[1].axes
    assert "schema 1.4" in ax.texts[0].get_text()
