"""The validity checks (loadgen/validity.py), the repeats' spread and widened intervals, B* "not determined",
the latency tails and the context header, in report.json, the terminal summary and report.html."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from typing import Any

import pytest
from rich.console import Console

from loadgen.analysis import ChainObs, LevelObs, analyse, repeat_spread, undetermined, widen
from loadgen.context import build_context
from loadgen.report import build, dumps, print_summary, write_html
from loadgen.schema import Report
from loadgen.validity import Thresholds, checks, has_warnings, validate
from tests.unit.loadgen.test_analysis import _level

LEVELS = (1, 8, 64)


def _clean_fleet(seed: int = 7, ratio: float = 0.6) -> list[LevelObs]:
    """int4 at ``ratio`` x bf16's J/token everywhere (no crossover, far from 1), 60 chains, 10 s windows."""
    rng = random.Random(seed)
    out = []
    for c in LEVELS:
        base = 2.0 / c**0.8
        out.append(_level("bf16", c, base, rng, noise=0.05))
        out.append(_level("int4", c, base * ratio, rng, noise=0.05))
    for o in out:
        o.windows = [(100.0, 100.0 + o.window_s)]
        o.requests = o.window_requests
        o.ttft = [0.01 * (i + 1) for i in range(100)]  # 10 ms .. 1 s
        o.itl = [0.005] * 100
        o.e2e = [0.2] * 98 + [2.0, 2.0]
    return out


def _energy(update_period_s: float | None = 0.1) -> dict[str, Any]:
    return {
        "t": 0.0,
        "meter": "dcgm",
        "policy": "full",
        "interval_s": 0.02,
        "devices": {
            f"gpu-node:{i}": {
                "device": f"gpu-node:{i}",
                "name": "NVIDIA H200",
                "update_period_s": update_period_s,
            }
            for i in range(2)
        },
    }


def _backends(simulated: bool) -> list[dict[str, Any]]:
    engine = "qtrap-sim (simulated)" if simulated else "vLLM"
    return [
        {
            "name": f"b-{p}", "pool": "qwen3-8b", "precision": p, "kind": "vllm", "model": "Qwen/Qwen3-8B",
            "url": f"http://gpu-node:800{i}", "devices": [f"gpu-node:{i}"], "engine": engine,
            "engine_version": "0.1.0" if simulated else "0.26.0", "simulated": simulated,
            "served_model": "Qwen/Qwen3-8B", "max_model_len": 32768, "dtype": None, "engine_error": None,
        }
        for i, p in enumerate(("bf16", "int4"))
    ] + [{"name": "other", "pool": "other-model", "precision": "bf16", "devices": ["x:0"]}]  # fmt: skip


def _context(simulated: bool = False, period: float | None = 0.1) -> dict[str, Any]:
    return build_context(
        started_unix_s=1_765_000_000.0,
        argv=["--proxy", "http://proxy:8080", "--concurrency", "1,8,64"],
        proxy_url="http://proxy:8080",
        embedded=simulated,
        model="qwen3-8b",
        dataset="gsm8k",
        data_file=None,
        hops="requests",
        precisions=["bf16", "int4"],
        backends=_backends(simulated),
        backends_null_reason=None,
        energy=_energy(period),
    )


def _report(obs: list[LevelObs], t: Thresholds | None = None, **ctx: Any) -> Report:
    a = analyse(obs, bootstrap=300, seed=1)
    rep = build(
        {"model": "qwen3-8b"}, a, partial=False, started_unix_s=0.0, duration_s=1.0, context=_context(**ctx)
    )
    rep.checks = checks(rep, t or Thresholds())
    rep.warnings = validate(rep, rep.checks)
    return Report.model_validate_json(dumps(rep))  # as read back from report.json


def _codes(rep: Report) -> list[str]:
    return [w.code for w in rep.warnings]


def test_a_sound_run_has_no_warning() -> None:
    rep = _report(_clean_fleet())
    assert rep.warnings == [] and not has_warnings(rep)
    assert rep.checks is not None and rep.checks.min_window_s == pytest.approx(1.0)
    assert "10 meter updates of 0.1 s" in rep.checks.min_window_s_source
    assert {cx.status for cx in rep.crossovers} == {"none_in_range"}


def test_simulated_backends_are_an_info() -> None:
    rep = _report(_clean_fleet(), simulated=True)
    [w] = rep.warnings
    assert (w.code, w.level) == ("simulated", "info") and "b-bf16, b-int4" in w.message
    assert not has_warnings(rep)


def test_short_window_counts_meter_updates_per_repeat() -> None:
    obs = _clean_fleet()
    # bf16 at 8: two repeats, one of 0.7 s: shorter than 10 updates of 0.1 s
    lv = next(o for o in obs if (o.precision, o.concurrency) == ("bf16", 8))
    lv.windows = [(0.0, 5.0), (10.0, 10.7)]
    rep = _report(obs)
    [w] = [w for w in rep.warnings if w.code == "short_window"]
    assert (w.level, w.precision, w.concurrency) == ("warning", "bf16", 8)
    assert "0.70 s (its shortest repeat)" in w.message and "1.00 s" in w.message
    # a slower meter: 10 updates of 1.5 s make every 10 s window short
    rep = _report(_clean_fleet(), period=1.5)
    assert _codes(rep).count("short_window") == 6 and rep.checks is not None
    assert rep.checks.min_window_s == pytest.approx(15.0)
    # --min-window-s wins over the meter; an unknown period falls back to 10 x 0.1 s
    rep = _report(_clean_fleet(), Thresholds(min_window_s=12.0), period=1.5)
    assert _codes(rep).count("short_window") == 6 and rep.checks.min_window_s_source == "--min-window-s"
    rep = _report(_clean_fleet(), period=None)
    assert rep.warnings == [] and rep.checks.min_window_s == pytest.approx(1.0)
    assert "not known" in rep.checks.min_window_s_source


def test_few_chains() -> None:
    rep = _report(_clean_fleet(), Thresholds(min_chains=61))
    assert _codes(rep) == ["few_chains"] * 6
    assert "60 measured chains, fewer than 61" in rep.warnings[0].message
    assert _report(_clean_fleet(), Thresholds(min_chains=60)).warnings == []


def test_errors_above_one_percent() -> None:
    obs = _clean_fleet()
    lv = next(o for o in obs if (o.precision, o.concurrency) == ("int4", 64))
    lv.requests = 1000
    lv.errors, lv.error_kinds = 10, {"HTTP 502": 10}  # 1.0%: not above
    assert _report(obs).warnings == []
    lv.errors, lv.error_kinds = 11, {"HTTP 502": 7, "timed out": 4}
    [w] = _report(obs).warnings
    assert (w.code, w.precision, w.concurrency) == ("errors", "int4", 64)
    assert "11 of 1000 requests failed (1.1%" in w.message and "HTTP 502 7, timed out 4" in w.message


def test_attribution_mismatch_beyond_five_percent() -> None:
    obs = _clean_fleet()
    a = analyse(obs, bootstrap=50, seed=1)
    jpt = next(lv["j_per_token"] for lv in a.levels if (lv["precision"], lv["concurrency"]) == ("bf16", 1))
    lv = next(o for o in obs if (o.precision, o.concurrency) == ("bf16", 1))
    lv.measured_window_j = jpt * 1.04 * lv.window_tokens_prorata  # 4% apart: fine
    assert _report(obs).warnings == []
    lv.measured_window_j = jpt * 1.06 * lv.window_tokens_prorata
    [w] = _report(obs).warnings
    assert (w.code, w.precision, w.concurrency) == ("attribution_mismatch", "bf16", 1)
    assert "differ by 5.7%" in w.message


def test_ratio_spanning_one_is_named_per_crossover() -> None:
    # int4 as dear as bf16 at 64 (noise both ways), clearly cheaper at 1 and 8
    rng = random.Random(3)
    obs = []
    for c, r in zip(LEVELS, (0.6, 0.6, 1.0), strict=True):
        obs.append(_level("bf16", c, 1.0, rng, noise=0.3))
        obs.append(_level("int4", c, r, rng, noise=0.3))
    for o in obs:
        o.windows = [(0.0, 10.0)]
    rep = _report(obs)
    spans = [w for w in rep.warnings if w.code == "ratio_spans_one"]
    assert {(w.precision, w.metric) for w in spans} == {("int4", "j_per_token"), ("int4", "j_per_correct")}
    tok = next(w for w in spans if w.metric == "j_per_token")
    assert tok.message.endswith("at concurrency 64: there the two are not told apart")


def test_b_star_not_determined_is_not_a_number() -> None:
    # a crossing close to the lowest level: the replicates' interval reaches the edge of the range
    assert undetermined(1.05, 1.0, [1.0, 2.0], [1, 8, 64]) is not None
    assert undetermined(6.0, 0.95, [4.0, 9.0], [1, 8, 64]) is None
    assert "only 80%" in str(undetermined(6.0, 0.8, [4.0, 9.0], [1, 8, 64]))
    assert "touches the edge" in str(undetermined(40.0, 0.99, [20.0, 63.9], [1, 8, 64]))
    assert "15% of bootstrap replicates cross" in str(undetermined(None, 0.15, None, [1, 8, 64]))
    assert undetermined(None, 0.05, None, [1, 8, 64]) is None
    # constructed: ratio 0.98 at 1, 1.3 at 8: a crossing just above the lowest level, which many replicates
    # place below it (no crossing) or at its edge
    rng = random.Random(11)
    obs = []
    for c, r in zip(LEVELS, (0.98, 1.3, 1.5), strict=True):
        obs.append(_level("bf16", c, 1.0, rng, noise=0.2))
        obs.append(_level("int4", c, r, rng, noise=0.2))
    for o in obs:
        o.windows = [(0.0, 10.0)]
    rep = _report(obs)
    cx = next(x for x in rep.crossovers if x.metric == "j_per_token")
    assert cx.status == "not_determined" and cx.b_star is None and cx.b_star_point is not None
    assert cx.undetermined_reason and "not determined" in cx.note
    [w] = [w for w in rep.warnings if w.code == "bstar_undetermined" and w.metric == "j_per_token"]
    assert w.level == "warning" and w.precision == "int4" and "not determined (point estimate" in w.message
    console = Console(width=250, record=True)
    print_summary(rep, console)
    assert "not determined (point" in console.export_text()


def test_repeats_spread_and_widening() -> None:
    assert repeat_spread([1.0, None]) is None
    sp = repeat_spread([1.0, 1.2, 1.4])
    assert sp is not None and sp["sd"] == pytest.approx(0.2) and sp["range"] == pytest.approx(0.4)
    assert sp["half_width"] == pytest.approx(1.959964 * 0.2 / 3**0.5)
    assert widen([1.1, 1.3], 1.2, sp) == pytest.approx([1.2 - sp["half_width"], 1.2 + sp["half_width"]])
    assert widen([0.5, 2.0], 1.2, sp) == [0.5, 2.0]  # the bootstrap's is wider already: unchanged

    def level(precision: str, shifts: tuple[float, ...]) -> LevelObs:
        rng = random.Random(precision)
        obs = LevelObs(precision, 8, repeats=len(shifts))
        for r, shift in enumerate(shifts):
            for i in range(40):
                ch = ChainObs(
                    r, 3, True, i % 5 != 0, True, 120.0 * shift * (1 + rng.gauss(0, 0.02)), 120, 1.0, i
                )
                obs.chains.append(ch)
                obs.window_chains.append(ch)
                obs.window_requests += 3
        obs.window_s, obs.window_tokens_prorata = 10.0, 120.0 * len(obs.chains)
        return obs

    a = analyse([level("bf16", (1.0, 1.0, 1.0)), level("int4", (0.5, 0.6, 0.7))], bootstrap=300, seed=2)
    same, apart = a.levels
    s = same["repeat_spread"]
    assert s["repeats"] == [0, 1, 2] and s["j_per_token"]["sd"] < 0.01
    assert same["ci"]["widened"] == [] and same["ci"]["bootstrap"] is None
    sp = apart["repeat_spread"]["j_per_token"]
    assert sp["values"] == pytest.approx([0.5, 0.6, 0.7], rel=0.02) and sp["sd"] == pytest.approx(
        0.1, rel=0.1
    )
    assert set(apart["ci"]["widened"]) == {"j_per_token", "j_per_chain", "j_per_correct"}
    lo, hi = apart["ci"]["j_per_token"]
    blo, bhi = apart["ci"]["bootstrap"]["j_per_token"]
    assert lo < blo and hi > bhi
    assert hi - lo == pytest.approx(2 * sp["half_width"], rel=0.01)
    # J per correct answer per repeat: the repeat's J/chain over that repeat's accuracy (32/40 correct)
    jpc = apart["repeat_spread"]["j_per_correct"]["values"]
    assert jpc == pytest.approx([v / 0.8 for v in apart["repeat_spread"]["j_per_chain"]["values"]])
    # the table shows the spread next to the intervals, widened ones marked
    rep = build({}, a, partial=False, started_unix_s=0.0, duration_s=1.0)
    console = Console(width=250, record=True)
    print_summary(rep, console)
    text = console.export_text()
    assert "J/token repeats sd (range)" in text and "widened" in text and "]*" in text


def test_context_tails_and_warnings_in_json_terminal_and_html(tmp_path: Any) -> None:
    obs = _clean_fleet()
    obs[0].requests, obs[0].errors, obs[0].error_kinds = 100, 5, {"connection": 5}
    rep = _report(obs)
    doc = json.loads(dumps(rep))
    ctx = doc["context"]
    assert ctx["date_utc"] == "2025-12-06T05:46:40Z" and ctx["qtrap_version"]
    assert ctx["command_line"] == "python -m loadgen --proxy http://proxy:8080 --concurrency 1,8,64"
    assert [b["name"] for b in ctx["backends"]] == ["b-bf16", "b-int4"]  # the pool's, not "other"
    assert ctx["backends"][0]["engine"] == "vLLM" and ctx["backends"][0]["engine_version"] == "0.26.0"
    assert ctx["gpu_count"] == 2 and ctx["gpu_names"] == ["NVIDIA H200"]
    assert ctx["meter"] == {"kind": "dcgm", "policy": "full", "interval_s": 0.02, "update_period_s": 0.1}
    assert (ctx["dataset"], ctx["hops"]) == ("gsm8k", "requests")
    assert doc["warnings"] == [
        {
            "code": "errors", "level": "warning", "precision": "bf16", "concurrency": 1, "metric": None,
            "message": "bf16 at concurrency 1: 5 of 100 requests failed (5.0%, more than 1%): connection 5",
        }
    ]  # fmt: skip
    lv = doc["levels"][0]
    assert lv["ttft_s"]["p99"] == pytest.approx(0.9901) and lv["ttft_s"]["mean"] == pytest.approx(0.505)
    assert lv["e2e_s"]["p50"] == pytest.approx(0.2) and lv["e2e_s"]["p99"] > 1.0
    assert lv["itl_s"]["p90"] == pytest.approx(0.005) and lv["requests_per_s"] is not None
    console = Console(width=250, record=True)
    print_summary(rep, console)
    text = console.export_text()
    assert "date 2025-12-06T05:46:40Z" in text and "command: python -m loadgen --proxy" in text
    assert "backend b-int4: int4, vLLM 0.26.0, model Qwen/Qwen3-8B" in text
    assert "GPUs: 2 (NVIDIA H200); meter dcgm, policy full" in text
    assert "TTFT p50/p90/p99 ms" in text and "505.0 / 901.0 / 990.1" in text
    assert "WARNING [errors] bf16 at concurrency 1: 5 of 100" in text
    html = write_html(rep, [], tmp_path / "report.html").read_text()
    assert html.index('id="warnings"') < html.index("<h2>")  # at the top
    assert "<code>errors</code> bf16 at concurrency 1: 5 of 100" in html
    assert "vLLM 0.26.0" in html and "Throughput and latency tails" in html and "990.1" in html


def test_one_seed_gives_one_report_in_any_process() -> None:
    """The bootstrap's intervals must not depend on the process's string-hash salt (PYTHONHASHSEED)."""
    code = (
        "import json\n"
        "from loadgen.analysis import analyse\n"
        "from tests.unit.loadgen.test_validity import _clean_fleet\n"
        "a = analyse(_clean_fleet(), bootstrap=200, seed=5)\n"
        "print(json.dumps([lv['ci'] for lv in a.levels], sort_keys=True))\n"
    )
    outs = set()
    for salt in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": salt}
        run = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outs.add(run.stdout)
    assert len(outs) == 1 and '"j_per_token": [' in next(iter(outs))
