"""loadgen end to end: the embedded default (calibrated simulated H100s behind a real proxy with a DCGM
meter), a running proxy, bad input, backend failures during a run, and Ctrl-C."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import Fleet
from tests.helpers import ROOT, backend, free_port, proxy

PY = sys.executable


def loadgen(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "loadgen", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )


@dataclass
class Run:
    out: Path
    proc: subprocess.CompletedProcess[str]

    @property
    def report(self) -> dict:  # type: ignore[type-arg]
        return json.loads((self.out / "report.json").read_text())


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    out = tmp_path_factory.mktemp("loadgen") / "out"
    proc = loadgen(
        "--concurrency", "1,4", "--num-chains", "4", "--warmup", "1", "--bootstrap", "200",
        "--sim-think-tokens", "8", "--out", str(out), "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    yield Run(out, proc)


def test_embedded_default_report(embedded: Run) -> None:
    rep = embedded.report
    assert rep["schema_version"] == "1.5" and rep["partial"] is False
    assert rep["accuracy_measured"] is True and rep["accuracy_null_reason"] is None
    assert rep["config"]["precisions"] == ["bf16", "fp8", "int8", "int4"] and rep["baseline"] == "bf16"
    assert {(lv["precision"], lv["concurrency"]) for lv in rep["levels"]} == {
        (p, c) for p in ("bf16", "fp8", "int8", "int4") for c in (1, 4)
    }
    for lv in rep["levels"]:
        assert lv["chains"] == 4 and lv["errors"] == 0
        assert lv["energy_j"] > 0 and lv["j_per_token"] > 0
        assert lv["j_per_correct"] is None or lv["j_per_correct"] > 0
        # the embedded proxy has no carbon intensity nor price: null with the proxy's reason, never 0
        assert lv["co2e_g"] is None and "no carbon intensity configured" in lv["co2e_null_reason"]
        assert lv["cost"] is None and lv["cost_unknown_requests"] == lv["window_requests"]
        assert lv["window_requests"] > 0 and lv["tokens_per_s"] > 0
        [(w0, w1)] = lv["windows_monotonic_s"]  # one repeat: one window, on time.monotonic()
        assert w1 - w0 == pytest.approx(lv["window_s"])
        lo, hi = lv["ci"]["j_per_token"]
        assert lo <= lv["j_per_token"] <= hi
        # the device counters over the window agree with the sum of the attributed records
        # (only over windows of 2 s or more: the counters move every ~100 ms)
        if lv["window_s"] >= 2.0:
            assert lv["measured_j_per_token"] == pytest.approx(lv["j_per_token"], rel=0.35)
        else:
            assert lv["measured_j_per_token"] is None
        assert lv["ttft_s"]["p50"] > 0 and lv["e2e_s"]["p99"] >= lv["e2e_s"]["p50"]
        # the level over time: window edges inside it, every request's energy in its bins, the counters'
        # mean power over the window
        tl = lv["timeline"]
        assert tl["repeat"] == 0 and len(tl["t_s"]) == len(tl["attributed_power_w"]) == len(tl["in_flight"])
        t0, t1 = tl["window_s"]
        assert 0 < t0 < t1 <= tl["t_s"][-1] + tl["bin_s"] and t1 - t0 == pytest.approx(lv["window_s"])
        assert tl["energy_unknown_requests"] == 0 and tl["measured_power_w"] > 0
        assert sum(tl["attributed_power_w"]) * tl["bin_s"] > lv["energy_j"]  # warm-up and drain too
        assert max(tl["in_flight"]) <= lv["concurrency"] + 1e-9
    assert {(c["precision"], c["metric"]) for c in rep["crossovers"]} == {
        (p, m) for p in ("fp8", "int8", "int4") for m in ("j_per_correct", "j_per_token")
    }
    for cx in rep["crossovers"]:
        assert cx["baseline"] == "bf16" and len(cx["ratio"]) == 2 and cx["direction"]
        assert (cx["b_star"] is None) == (not cx["all_crossings"])
    assert {i["precision"] for i in rep["indices"]} == {"fp8", "int8", "int4"}
    for p, acc in rep["accuracy"].items():
        assert acc["chains"] == 8, p
        assert sum(h["chains"] for h in acc["by_hops"].values()) == 8
    # the proxy's energy accounts: one simulated GPU per precision, every joule accounted for
    devices = rep["energy"]["devices"]
    assert len(devices) == 4 and rep["energy"]["null_reason"] is None
    for d in devices:
        assert d["meter"] == "dcgm" and d["meter_up"] is True
        assert d["conservation_error_ratio"] < 1e-9
        assert 0 < d["run_measured_j"] <= d["measured_j"]
    # energy by hop: every window request of a level in exactly one hop
    for lv in rep["levels"]:
        by_hop = lv["energy_by_hop"]
        assert sum(h["requests"] for h in by_hop.values()) == lv["window_requests"]
        assert sum(h["energy_j"] for h in by_hop.values()) == pytest.approx(lv["energy_j"])
        assert "1" in by_hop and all(h["j_per_token"] > 0 for h in by_hop.values())
    # the terminal summary
    assert "B*" in embedded.proc.stdout and "int4 vs bf16" in embedded.proc.stdout
    assert "conservation error" in embedded.proc.stdout


def test_short_run_carries_its_warnings_context_and_tails(embedded: Run) -> None:
    """A deliberately short run (4 chains a level) says so: few_chains at every level, and the simulated
    backends as an info; the header names the simulator, its GPUs and the meter; the tails are there."""
    rep = embedded.report
    levels = {(lv["precision"], lv["concurrency"]) for lv in rep["levels"]}
    few = [w for w in rep["warnings"] if w["code"] == "few_chains"]
    assert {(w["precision"], w["concurrency"]) for w in few} == levels
    assert all(w["level"] == "warning" and "4 measured chains, fewer than 30" in w["message"] for w in few)
    [sim] = [w for w in rep["warnings"] if w["code"] == "simulated"]
    assert sim["level"] == "info" and "sim-bf16" in sim["message"]
    codes = {w["code"] for w in rep["warnings"]}
    assert codes <= {"few_chains", "simulated", "short_window", "ratio_spans_one", "bstar_undetermined",
                     "attribution_mismatch"}, codes  # fmt: skip
    assert "errors" not in codes  # no request failed
    for w in rep["warnings"]:
        if w["code"] == "short_window":
            lv = next(
                x
                for x in rep["levels"]
                if (x["precision"], x["concurrency"]) == (w["precision"], w["concurrency"])
            )
            assert lv["window_s"] < rep["checks"]["min_window_s"]
    assert rep["checks"]["min_chains"] == 30 and 0.5 < rep["checks"]["min_window_s"] < 2.0
    ctx = rep["context"]
    assert ctx["embedded"] is True and ctx["command_line"].startswith("python -m loadgen --concurrency 1,4")
    assert ctx["proxy_url"].startswith("http://127.0.0.1:") and ctx["hops"] == "requests"
    assert [b["precision"] for b in ctx["backends"]] == ["bf16", "fp8", "int8", "int4"]
    for b in ctx["backends"]:
        assert b["engine"] == "qtrap-sim (simulated)" and b["simulated"] is True
        assert b["engine_version"] == ctx["qtrap_version"] and b["served_model"] == "qwen3-8b"
    assert ctx["gpu_count"] == 4 and ctx["gpu_names"] == ["NVIDIA H200 (simulated)"]
    assert ctx["meter"]["kind"] == "dcgm" and ctx["meter"]["policy"] == "full"
    assert 0.08 < ctx["meter"]["update_period_s"] < 0.13  # the simulated counter steps every 85-115 ms
    for lv in rep["levels"]:
        for key in ("ttft_s", "itl_s", "e2e_s"):
            t = lv[key]
            assert 0 < t["p50"] <= t["p90"] <= t["p99"] and t["mean"] > 0, (key, t)
        assert lv["requests_per_s"] > 0 and lv["tokens_per_s"] > 0
    out = embedded.proc.stdout
    assert "WARNING [few_chains]" in out and "INFO [simulated]" in out
    assert "qtrap-sim (simulated)" in out and "GPUs: 4 (NVIDIA H200 (simulated)); meter dcgm" in out
    assert "TTFT p50/p90/p99 ms" in out and "E2E p50/p90/p99 s" in out
    html = (embedded.out / "report.html").read_text()
    assert html.index('id="warnings"') < html.index("<h2>B*</h2>") and "<code>few_chains</code>" in html
    assert "Throughput and latency tails" in html and "qtrap-sim (simulated)" in html


def test_repeats_report_their_spread(tmp_path: Path) -> None:
    """--repeats 2: each level gives its repeats' figures and spread beside the interval, which covers at
    least the repeats' own 95% interval of their mean."""
    out = tmp_path / "out"
    proc = loadgen(
        "--concurrency", "2", "--num-chains", "4", "--warmup", "1", "--precisions", "bf16,int4", "--repeats",
        "2", "--bootstrap", "100", "--sim-think-tokens", "4", "--out", str(out), "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    for lv in rep["levels"]:
        sp = lv["repeat_spread"]
        assert lv["repeats"] == 2 and sp["repeats"] == [0, 1] and len(lv["windows_monotonic_s"]) == 2
        tok = sp["j_per_token"]
        assert len(tok["values"]) == 2 and tok["min"] <= lv["j_per_token"] * 1.5 and tok["sd"] >= 0
        assert tok["range"] == pytest.approx(tok["max"] - tok["min"])
        lo, hi = lv["ci"]["j_per_token"]
        assert (
            lo <= lv["j_per_token"] - tok["half_width"] + 1e-12
            and hi >= lv["j_per_token"] + tok["half_width"] - 1e-12
        )
        assert ("j_per_token" in lv["ci"]["widened"]) == (lv["ci"]["bootstrap"] is not None and
                                                         lv["ci"]["bootstrap"]["j_per_token"] != [lo, hi])  # fmt: skip
    assert "J/token repeats sd (range)" in proc.stdout
    assert "J/token repeats sd (range)" in (out / "report.html").read_text()


def test_strict_exits_3_on_a_warning(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = loadgen(
        "--concurrency", "1", "--num-chains", "2", "--warmup", "0", "--precisions", "bf16", "--bootstrap", "50",
        "--sim-think-tokens", "4", "--strict", "--out", str(out), "--quiet",
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())  # the reports are written first
    assert "few_chains" in {w["code"] for w in rep["warnings"] if w["level"] == "warning"}
    assert "WARNING [few_chains]" in proc.stdout


def test_proxy_lists_its_backends_and_engines(fleet: Fleet) -> None:
    """GET /qtrap/v1/backends: each backend as configured and what its engine says (the simulator, on
    vLLM's /version and TGI's /info, says it is simulated)."""
    r = requests.get(fleet.proxy_url + "/qtrap/v1/backends", timeout=10)
    assert r.status_code == 200
    rows = {b["name"]: b for b in r.json()["backends"]}
    assert set(rows) == {"sim-bf16", "sim-int4", "sim-tgi-int8"}
    for b in rows.values():
        assert b["engine"] == "qtrap-sim (simulated)" and b["simulated"] is True and b["engine_error"] is None
        assert b["engine_version"] and b["pool"] == "qwen3-8b" and b["model"] == "qwen3-8b"
    assert rows["sim-tgi-int8"]["kind"] == "tgi" and rows["sim-tgi-int8"]["dtype"] == "int8"
    assert rows["sim-bf16"]["url"] == f"http://127.0.0.1:{fleet.bf16_port}"
    assert rows["sim-bf16"]["max_model_len"] and rows["sim-bf16"]["served_model"] == "qwen3-8b"
    v = requests.get(f"http://127.0.0.1:{fleet.bf16_port}/version", timeout=5).json()
    assert v["simulated"] is True and v["engine"] == "qtrap-sim" and "(simulated)" in v["gpu"]


def test_requests_csv_and_files(embedded: Run) -> None:
    with (embedded.out / "requests.csv").open() as f:
        rows = list(csv.DictReader(f))
    rep = embedded.report
    assert len(rows) == sum(lv["requests"] for lv in rep["levels"])
    assert all(r["status"] == "ok" and r["energy_final"] == "1" and float(r["energy_j"]) > 0 for r in rows)
    # every hop of a chain went out with its chain id and hop number, in order
    by_chain: dict[str, list[int]] = {}
    for r in rows:
        by_chain.setdefault(r["chain_id"], []).append(int(r["hop"]))
    for hops in by_chain.values():
        assert hops == list(range(1, len(hops) + 1))
    window = [r for r in rows if r["in_window"] == "1" and r["warmup"] == "0"]
    assert window
    for name in PLOTS:
        assert (embedded.out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (embedded.out / f"{name}.svg").stat().st_size > 0
    html = (embedded.out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(PLOTS) and "http://" not in html.replace(
        "http://127.0.0.1", ""
    )


def test_compare(embedded: Run, tmp_path: Path) -> None:
    proc = loadgen("compare", str(embedded.out), str(embedded.out / "report.json"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("int4") >= 2
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    proc = loadgen("compare", str(bad))
    assert proc.returncode == 2 and "not a qtrap loadgen report" in proc.stderr


def _requests_total(url: str) -> float:
    text = requests.get(url + "/metrics", timeout=5).text
    return sum(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith("qtrap_requests_total{")
    )


def test_bad_input_fails_before_any_load(fleet: Fleet, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    before = _requests_total(fleet.proxy_url)
    cases = [
        (["--dataset", "squad"], "unknown dataset"),
        (["--dataset", "gsm8k", "--data-file", str(tmp_path / "none.jsonl")], "cannot read data file"),
        (["--dataset", "gsm8k", "--data-file", str(bad)], "not JSON lines"),
        (["--proxy", f"http://127.0.0.1:{free_port()}"], "unreachable"),
        (["--proxy", fleet.proxy_url, "--precisions", "bf16,fp4"], "does not serve qwen3-8b at fp4"),
        (["--proxy", fleet.proxy_url, "--model", "llama"], "serves no model 'llama'"),
        (["--concurrency", "0"], "concurrency levels must be integers >= 1"),
    ]
    for args, message in cases:
        proc = loadgen(*args, "--out", str(tmp_path / "out"), "--quiet", timeout=60)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
        if "--concurrency" not in args:  # argparse prints its usage line too
            assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert _requests_total(fleet.proxy_url) == before
    assert not (tmp_path / "out" / "report.json").exists()


def test_running_proxy_with_failing_backend_and_no_meter(fleet: Fleet, tmp_path: Path) -> None:
    """Against a running proxy (null meter): energy is null with a reason, never 0; a dead backend's
    errors are counted and reported and the run goes on."""
    cfg = {
        "backends": [
            backend("ok-bf16", fleet.bf16_port, "bf16", model="qwen3-8b"),
            backend("dead-int4", free_port(), "int4", model="qwen3-8b"),
        ],
        "pools": {"qwen3-8b": {"default_precision": "bf16"}},
    }
    with proxy(tmp_path, cfg):
        url = f"http://127.0.0.1:{cfg['server']['port']}"  # type: ignore[index]
        out = tmp_path / "out"
        proc = loadgen(
            "--proxy", url, "--concurrency", "1,3", "--num-chains", "3", "--out", str(out), "--bootstrap", "50"
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        # loadgen told the proxy each scored chain's verdict (warm-up chains included)
        metrics = requests.get(url + "/metrics", timeout=5).text
        scored = [line for line in metrics.splitlines() if line.startswith("qtrap_chains_scored_total{")]
        assert scored and all('precision="bf16"' in line for line in scored)
        assert sum(float(line.split()[-1]) for line in scored) == 1 + 3 + 3 + 3
        with (out / "requests.csv").open() as f:
            chain_id = next(r["chain_id"] for r in csv.DictReader(f) if r["precision"] == "bf16")
        score = f"{url}/qtrap/v1/chains/{chain_id}/score"
        again = requests.post(score, json={"correct": True, "hops": 2}, timeout=5)
        assert again.status_code == 200 and again.json()["counted"] is False  # once per chain
        assert requests.post(score, data=b"nope", timeout=5).status_code == 400
        bad = requests.post(score, json={"correct": "yes"}, timeout=5)
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
        assert requests.post(score, json={"correct": True, "hops": 0}, timeout=5).status_code == 400
        missing = requests.post(f"{url}/qtrap/v1/chains/nope/score", json={"correct": True}, timeout=5)
        assert missing.status_code == 404 and "nope" in missing.json()["error"]["message"]
    rep = json.loads((out / "report.json").read_text())
    assert rep["config"]["precisions"] == ["bf16", "int4"]
    for lv in rep["levels"]:
        assert lv["energy_j"] is None and lv["j_per_token"] is None
        assert lv["energy_null_reason"]
        if lv["precision"] == "int4":
            assert lv["errors"] == lv["requests"] > 0 and lv["chains_scored"] == 0
            assert sum(lv["error_kinds"].values()) == lv["errors"]
        else:
            assert lv["errors"] == 0 and lv["chains_scored"] == lv["chains"] > 0
    assert all(cx["b_star"] is None for cx in rep["crossovers"])
    assert "energy unknown for bf16" in proc.stdout
    # the header: a simulated backend and a dead one whose engine is unknown, with why
    backends = {b["name"]: b for b in rep["context"]["backends"]}
    assert backends["ok-bf16"]["engine"] == "qtrap-sim (simulated)"
    dead = backends["dead-int4"]
    assert dead["engine"] == "vLLM" and dead["engine_version"] is None and dead["engine_error"]
    assert rep["context"]["meter"]["kind"] == "null" and rep["context"]["gpu_count"] == 0
    # the warnings: every int4 request failed; 3 chains a level; no meter: the window unit is assumed
    errors = [w for w in rep["warnings"] if w["code"] == "errors"]
    assert {(w["precision"], w["concurrency"]) for w in errors} == {("int4", 1), ("int4", 3)}
    assert {w["code"] for w in rep["warnings"]} >= {"errors", "few_chains", "simulated"}
    assert "not known" in rep["checks"]["min_window_s_source"]
    assert "WARNING [errors] int4 at concurrency 1" in proc.stdout


def test_ctrl_c_writes_a_partial_report(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            PY,
            "-m",
            "loadgen",
            "--concurrency",
            "1,2",
            "--num-chains",
            "400",
            "--out",
            str(out),
            "--bootstrap",
            "50",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen: list[str] = []
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 120
        while "bf16 c=1 ..." not in (line := proc.stderr.readline()):
            seen.append(line)
            assert time.monotonic() < deadline and proc.poll() is None, (
                "".join(seen[-30:]) + proc.stderr.read()
            )
        time.sleep(3)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()  # reap it and close its pipes (a leak would fail a later test)
    assert proc.returncode == 130, stderr
    assert "partial report" in stderr + stdout
    rep = json.loads((out / "report.json").read_text())
    assert rep["partial"] is True
    [lv] = rep["levels"]
    assert lv["precision"] == "bf16" and lv["concurrency"] == 1 and 0 < lv["chains"] < 400
    assert (out / "report.html").exists() and (out / "requests.csv").exists()


PLOTS = ["energy", "ratio", "throughput_latency", "power_timeline", "accuracy_by_hops", "idle_share"]
DEFAULT_REPORT = ROOT / "docs" / "img" / "report-default.json"  # the embedded default's report (no warning)


def _page_ok(html: Path) -> Any:
    """Offline (every network request goes to a dead proxy): nothing errs or fails to load, and every plot
    decodes and shows on screen at a readable size, in the page's order."""
    from tests.browser import check_page, chromium

    if chromium() is None:
        pytest.skip("chromium is not installed (scripts/setup.sh --test installs it)")
    page = check_page(html)
    assert page.title == "qtrap loadgen report"
    assert page.console_errors == [] and page.exceptions == [] and page.failed_loads == []
    assert [img["alt"] for img in page.images] == PLOTS
    for img in page.images:
        assert img["complete"] and img["naturalWidth"] > 300 and img["naturalHeight"] > 200, img
        assert img["visible"] and img["width"] > 300 and img["height"] > 100, img
        # shown at (nearly) its own size: at most 5% scaled down on a 1,280 px wide window
        assert img["width"] >= 0.95 * min(img["naturalWidth"], 1200), img
    return page


def test_html_report_with_warnings_renders_in_headless_chromium(embedded: Run) -> None:
    """A deliberately short run: the warnings block is the first thing under the title."""
    page = _page_ok(embedded.out / "report.html")
    w = page.warnings
    assert w is not None and w["index_in_body"] == 1 and w["before_first_h2"] and w["cls"] == "warn"
    assert w["top"] < w["first_h2_top"] and w["height"] > 0
    n = sum(x["level"] == "warning" for x in embedded.report["warnings"])
    assert n > 0 and f"Validity checks: {n} warning(s)" in w["text"] and "few_chains" in w["text"]
    assert page.headings[:2] == ["qtrap loadgen report", "B*"]


def test_default_html_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    """The embedded default's report (docs/img/report-default.json), rendered again: no warning, said as
    such at the top, and each plot shows."""
    rep = json.loads(DEFAULT_REPORT.read_text())
    assert [w["code"] for w in rep["warnings"]] == ["simulated"]
    assert rep["config"]["concurrency"] == [1, 8, 64] and all(lv["timeline"] for lv in rep["levels"])
    proc = loadgen("render", str(DEFAULT_REPORT), "--out", str(tmp_path), timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    page = _page_ok(tmp_path / "report.html")
    w = page.warnings
    assert w is not None and w["index_in_body"] == 1 and w["cls"] == "note"
    assert "Validity checks: 0 warning(s)" in w["text"] and "simulated" in w["text"]
    html = (tmp_path / "report.html").read_text()
    for term in ("casting overhead", "trust", "sustainability", "economy", "composite", "measured J/token",
                 "J/correct", "B*", "ratio", "idle share"):  # fmt: skip
        assert f"<dt>{term}" in html or f"{term} =" in html, term
    for name in PLOTS:
        assert (tmp_path / f"{name}.svg").read_text().rstrip().endswith("</svg>")


def test_no_score_run_and_render(tmp_path: Path) -> None:
    """--no-score (models with random weights): nothing is scored or sent to the proxy as a verdict,
    accuracy and J per correct answer are null with the reason, B* is on J/token; `render` redraws the
    plots and report.html from report.json alone."""
    out = tmp_path / "out"
    reason = "random weights: accuracy is meaningless"
    proc = loadgen(
        "--concurrency", "1,3", "--num-chains", "3", "--warmup", "1", "--precisions", "bf16,int4",
        "--bootstrap", "100", "--sim-think-tokens", "4", "--no-score", reason, "--out", str(out), "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["accuracy_measured"] is False and rep["accuracy_null_reason"] == reason
    assert rep["config"]["no_score"] == reason and rep["config"]["scoring"] == f"not scored: {reason}"
    for p, acc in rep["accuracy"].items():
        assert acc["accuracy"] is None and acc["null_reason"] == reason and acc["chains"] == 6, p
    for lv in rep["levels"]:
        assert lv["j_per_token"] > 0 and lv["j_per_correct"] is None and lv["accuracy"] is None
        assert lv["chains_scored"] == 0 and lv["chains_ok"] == lv["chains"] == 3
    assert [(c["precision"], c["metric"]) for c in rep["crossovers"]] == [("int4", "j_per_token")]
    [idx] = [i for i in rep["indices"] if i["concurrency"] == 3]
    assert idx["casting_overhead_ratio"] > 0 and idx["trust_index"] is None
    with (out / "requests.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["chain_correct"] == "" and r["status"] == "ok" for r in rows)
    assert "accuracy not measured: random weights" in proc.stdout
    assert "Accuracy not measured" in (out / "report.html").read_text()
    html_dir = tmp_path / "html"
    again = loadgen("render", str(out / "report.json"), "--out", str(html_dir), timeout=120)
    assert again.returncode == 0, again.stderr
    page = (html_dir / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(PLOTS) and "Accuracy not measured" in page
    assert "accuracy not measured" in again.stdout and "rendered:" in again.stdout
