"""loadgen's schedules end to end on the embedded default (simulated GPUs behind a real proxy with a DCGM
meter): compare-routing with pinned precisions, round_robin and cost (run if the proxy accepts
`routing: cost`, else reported as not run with the proxy's reason), and a `--schedule` run's report.json."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from loadgen.report import load
from loadgen.schema import SCHEMA_VERSION, CompareRouting
from tests.helpers import ROOT

PY = sys.executable


def loadgen(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "loadgen", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_compare_routing_on_the_embedded_default(tmp_path: Path) -> None:
    out = tmp_path / "cr"
    proc = loadgen(
        "compare-routing", "--schedule", "steps:1@2s,4@2s", "--precisions", "bf16,int4",
        "--policies", "bf16,int4,round_robin,cost", "--window", "2", "--bootstrap", "200",
        "--sim-think-tokens", "8", "--final-timeout", "20", "--out", str(out), "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "compare-routing.json").read_text())
    CompareRouting.model_validate(doc)  # the file is the model
    assert doc["schema_version"] == SCHEMA_VERSION and doc["partial"] is False
    assert doc["config"]["schedule"] == "steps:1@2s,4@2s" and doc["config"]["schedule_unit"] == "concurrency"
    pols = {p["policy"]: p for p in doc["policies"]}
    assert list(pols) == ["bf16", "int4", "round_robin", "cost"]
    assert pols["bf16"]["model"] == "qwen3-8b@bf16" and pols["round_robin"]["model"] == "qwen3-8b"
    cost = pols["cost"]
    assert cost["ran"], cost["not_run_reason"]  # this proxy has the cost policy: its own stack, its own loop
    ran = [p for p in doc["policies"] if p["ran"]]
    assert {"bf16", "int4", "round_robin", "cost"} == {p["policy"] for p in ran}
    for p in ran:
        run, t = p["run"], p["run"]["totals"]
        assert p["not_run_reason"] is None and run["label"] == p["policy"]
        assert t["fleet_energy_j"] > 0 and set(t["energy_by_device"]) and len(t["energy_by_device"]) == 2
        assert sum(t["energy_by_device"].values()) == pytest.approx(t["fleet_energy_j"])
        assert 0 <= t["accuracy"] <= 1 and t["chains_ok"] > 0 and t["errors"] == 0
        lo, hi = t["accuracy_ci"]
        assert 0 <= lo <= t["accuracy"] <= hi <= 1
        assert t["j_per_correct"] > 0 and t["j_per_token"] > 0
        for lat in (t["ttft_s"], t["e2e_s"]):
            assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
            assert lat["p50_ci"][0] <= lat["p50"] <= lat["p50_ci"][1]
        assert sum(t["precision_share"].values()) == pytest.approx(1.0)
        assert 4.0 <= t["schedule_s"] < 4.5 and t["duration_s"] >= t["schedule_s"]
        # the windows tile the run; their energy adds up to the fleet's
        ws = run["windows"]
        assert ws[0]["t_start_s"] == 0 and ws[-1]["t_end_s"] == pytest.approx(t["duration_s"])
        assert [w["offered"] for w in ws[:2]] == [1, 4]
        assert sum(w["energy_j"] for w in ws) == pytest.approx(t["fleet_energy_j"], rel=0.05)
        assert sum(w["chains_ended"] for w in ws) == t["chains"]
        assert ws[1]["chains_in_flight"] > ws[0]["chains_in_flight"]
    # pinned policies are served by their precision; round_robin by the pool's default (bf16 here)
    assert pols["bf16"]["run"]["totals"]["precision_share"] == {"bf16": 1.0}
    assert pols["int4"]["run"]["totals"]["precision_share"] == {"int4": 1.0}
    assert set(pols["round_robin"]["run"]["totals"]["precision_share"]) <= {"bf16", "int4"}
    md = (out / "compare-routing.md").read_text()
    assert "| round_robin |" in md and "fleet J" in md
    # the header: what ran, where and on what (the simulated backends and their GPUs, the meter)
    ctx = doc["context"]
    assert ctx["embedded"] is True and ctx["command_line"].startswith("python -m loadgen compare-routing")
    assert {(b["precision"], b["simulated"]) for b in ctx["backends"]} == {("bf16", True), ("int4", True)}
    assert ctx["gpu_count"] == 2 and ctx["meter"]["kind"] == "dcgm"
    assert f"* command: {ctx['command_line']}" in md and "* backend sim-int4: int4" in md
    # the comparison: the best pinned policy, the per-window oracle (never worse than it), each unpinned one
    jpc = {p["policy"]: p["run"]["totals"]["j_per_correct"] for p in ran}
    best = min(("bf16", "int4"), key=jpc.__getitem__)
    fleet = {p["policy"]: p["run"]["totals"]["fleet_energy_j"] for p in ran}
    correct = {p["policy"]: p["run"]["totals"]["correct"] for p in ran}
    assert f"* Best pinned policy: {best}, {fleet[best] / correct[best]:.4g} J/correct" in md
    oracle = re.search(r"\* Per-window oracle over the pinned runs' \d+ windows: (\S+) J/correct", md)
    assert oracle is not None and float(oracle.group(1)) <= fleet[best] / correct[best] * (1 + 1e-3)
    assert re.search(r"\* cost: \S+ J/correct, [+-]\d+\.\d% against the best pinned policy", md)
    assert "Best pinned policy" in proc.stdout
    assert (out / "requests.csv").read_text().count("\n") > 10


def test_schedule_run_report(tmp_path: Path) -> None:
    out = tmp_path / "s"
    proc = loadgen(
        "--schedule", "ramp:1..3@3s", "--precisions", "int4", "--window", "1", "--bootstrap", "100",
        "--sim-think-tokens", "8", "--final-timeout", "20", "--out", str(out), "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = load(out / "report.json")
    assert rep.levels == [] and rep.config.schedule == "ramp:1..3@3s"
    [s] = rep.schedules
    assert s.label == "int4" and s.model == "qwen3-8b@int4" and len(s.windows) >= 3
    assert s.totals.fleet_energy_j is not None and s.totals.fleet_energy_j > 0
    assert s.windows[0].offered < s.windows[2].offered
    assert (
        rep.context is not None
        and rep.context.embedded
        and [b.precision for b in rep.context.backends] == ["int4"]
    )
    assert "int4: ramp:1..3@3s" in proc.stdout and (out / "report.html").exists()
    assert "<li>command: python -m loadgen --schedule ramp:1..3@3s" in (out / "report.html").read_text()
    again = loadgen("render", str(out / "report.json"), "--out", str(tmp_path / "r"))
    assert again.returncode == 0, again.stderr
