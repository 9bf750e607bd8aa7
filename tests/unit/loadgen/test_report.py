"""report.json, report.html and the plots of a run whose answers were not scored (--no-score), the proxy's
energy accounts in the report, and `python -m loadgen render`."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from loadgen.analysis import analyse
from loadgen.app import plots_or_none, render
from loadgen.cli import main
from loadgen.report import build, dumps, energy_summary, load, print_summary, write_html, write_json
from loadgen.schema import SCHEMA_VERSION, Report
from tests.unit.loadgen.test_analysis import _fleet

REASON = "random weights: the answers mean nothing"
PLOTS = ["energy", "ratio", "accuracy_by_hops", "throughput_latency", "power_timeline", "idle_share"]


def _snapshot(measured: float, attributed: float, idle: float) -> dict[str, Any]:
    return {
        "t": 0.0,
        "devices": {
            "localhost:0": {
                "device": "localhost:0",
                "meter": "nvml",
                "meter_up": True,
                "updates": 10,
                "counter_resets": 0,
                "measured_j": measured,
                "attributed_j": attributed,
                "idle_j": idle,
                "foreign_j": 0.0,
                "conservation_error_j": attributed + idle - measured,
                "conservation_error_ratio": abs(attributed + idle - measured) / measured,
                "pending_intervals": 0,
            }
        },
    }


def _report(scored: bool) -> Report:
    a = analyse(_fleet(4), bootstrap=100, seed=0, accuracy_null_reason=None if scored else REASON)
    energy = energy_summary(_snapshot(100.0, 60.0, 40.0), _snapshot(1100.0, 900.0, 200.0))
    report = build({"model": "m", "concurrency": [1, 64]}, a, partial=False, started_unix_s=0.0, duration_s=1.0,
                   energy=energy)  # fmt: skip
    return Report.model_validate_json(dumps(report))  # as read back from report.json


def test_energy_summary_conservation_and_run_delta() -> None:
    e = energy_summary(_snapshot(100.0, 60.0, 40.0), _snapshot(1100.0, 900.0, 200.0))
    [d] = e["devices"]
    assert d["device"] == "localhost:0" and d["measured_j"] == 1100.0 and d["run_measured_j"] == 1000.0
    assert d["conservation_error_ratio"] == 0.0 and e["null_reason"] is None
    assert energy_summary(None, _snapshot(5.0, 5.0, 0.0))["devices"][0]["run_measured_j"] is None
    gone = energy_summary(None, None)
    assert gone["devices"] == [] and "did not answer" in gone["null_reason"]


def test_no_score_report_html_and_summary(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from loadgen.plots import all_plots

    rep = _report(scored=False)
    assert rep.accuracy_measured is False and rep.accuracy_null_reason == REASON
    assert rep.schema_version == SCHEMA_VERSION and rep.energy.devices[0].run_measured_j == 1000.0
    plots = all_plots(rep, tmp_path)
    assert [p.stem for p in plots] == PLOTS
    html = write_html(rep, plots, tmp_path / "report.html").read_text()
    assert "Accuracy not measured: random weights" in html
    assert "Energy accounts of the proxy" in html and "localhost:0" in html
    console = Console(width=200, record=True)
    print_summary(rep, console)
    text = console.export_text()
    assert "accuracy not measured: random weights" in text and "casting overhead" in text
    assert "j_per_correct" not in text  # B* only on J/token
    scored = _report(scored=True)
    assert scored.accuracy_measured is True and scored.accuracy_null_reason is None
    html = write_html(scored, [], tmp_path / "scored.html").read_text()
    assert "not measured" not in html and "accuracy (strict)" in html and "No plots" in html


def test_render_draws_plots_and_html_from_report_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    src = tmp_path / "run"
    src.mkdir()
    write_json(_report(scored=False), src / "report.json")
    assert main(["render", str(src / "report.json"), "--out", str(tmp_path / "html")]) == 0
    for name in PLOTS:
        assert (tmp_path / "html" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (tmp_path / "html" / f"{name}.svg").exists()
    html = (tmp_path / "html" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(PLOTS) and "Accuracy not measured" in html
    assert "rendered:" in capsys.readouterr().out
    # a directory works too, and writes beside its report.json
    assert render(src, None) == 0 and (src / "report.html").exists()
    assert load(src / "report.json").accuracy_measured is False
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["render", str(bad)]) == 2
    assert "not a qtrap loadgen report" in capsys.readouterr().err


def test_no_matplotlib_no_plots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    monkeypatch.delitem(sys.modules, "loadgen.plots", raising=False)
    assert plots_or_none(_report(scored=False), tmp_path) == []
    err = capsys.readouterr().err
    assert "plots skipped" in err and "python -m loadgen render" in err
    assert list(tmp_path.iterdir()) == []


def _slug(heading: str) -> str:
    """A Markdown heading's anchor as GitHub makes it."""
    text = re.sub(r"[^\w\- ]", "", heading.lstrip("#").strip().lower().replace("\\", ""))
    return text.replace(" ", "-")


def test_html_defines_each_figure_with_its_formula_and_a_working_methodology_link(tmp_path: Path) -> None:
    rep = _report(scored=True)
    html = write_html(rep, [], tmp_path / "report.html").read_text()
    terms = ["ratio", "B*", "replicates crossing", "J/token (attributed)", "measured J/token", "J/correct",
             "95% CI", "casting overhead", "trust", "sustainability", "economy", "composite"]  # fmt: skip
    defs = dict(re.findall(r"<dt>(.*?)</dt><dd>(.*?)</dd>", html))
    assert sorted(defs) == sorted(terms)
    for term, text in defs.items():
        formula = re.search(r"<code>(.*?)</code>", text)
        assert formula and " = " in formula.group(1), term
        assert 'href="docs/methodology.md#' in text, term
    # the composite's weights are the run's
    w = rep.indices[0].weights
    assert f"w_T = {w.trust:.3g}, w_S = {w.sustainability:.3g}, w_E = {w.economy:.3g}" in defs["composite"]
    # every link's anchor is a heading of docs/methodology.md
    doc = (Path(__file__).parents[3] / "docs" / "methodology.md").read_text()
    anchors = {_slug(line) for line in doc.splitlines() if line.startswith("#")}
    linked = set(re.findall(r'href="docs/methodology\.md#([^"]+)"', html))
    assert linked and linked <= anchors, linked - anchors
    # attributed and measured J/token side by side in the page's level table; the terminal keeps its width
    assert "<th>J/token</th>" in html and "<th>measured J/token</th>" in html
    lv = rep.levels[0]
    assert lv.measured_j_per_token is None or f"<td>{lv.measured_j_per_token:.3g}</td>" in html
    console = Console(width=200, record=True)
    print_summary(rep, console)
    assert "measured J/token" not in console.export_text()


def test_levels_table_shows_gco2e_and_cost_only_when_the_proxy_gave_them() -> None:
    from loadgen.report import level_head, level_rows

    rep = _report(scored=True)
    assert "gCO2e" not in level_head(rep) and all(len(r) == len(level_head(rep)) for r in level_rows(rep))
    levels = [
        lv.model_copy(update={"co2e_g": 0.125, "cost": 0.5, "cost_currency": "EUR"}) for lv in rep.levels
    ]
    rep = rep.model_copy(update={"levels": levels})
    head, rows = level_head(rep), level_rows(rep)
    assert head[-2:] == ["gCO2e", "cost"] and all(r[-2:] == ["0.125", "0.5 EUR"] for r in rows)
