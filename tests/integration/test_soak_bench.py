"""bench/soak.py in miniature (about 20 s): every phase runs, the JSON holds the samples and verdicts,
and a proxy that breaks any verdict (a leak of descriptors, a 5xx, a missing ledger record) fails it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT

SMOKE = [
    "--duration", "5", "--streams", "16", "--sample-s", "1", "--min-tokens", "4", "--max-tokens", "16",
    "--slow-headers", "10", "--slow-bodies", "5", "--header-timeout-s", "1", "--body-timeout-s", "1",
    "--body-trickle-s", "1", "--trickle-s", "0.3", "--phase-streams", "4", "--probe-every-s", "0.5",
    "--max-connections", "64", "--max-inflight", "48", "--flood-connections", "256", "--flood-s", "3",
    "--flood-tokens", "8", "--recovery-requests", "3", "--settle-s", "3",
]  # fmt: skip

VERDICTS = {
    "rss_slope",
    "soak_requests",
    "slow_heads",
    "slow_bodies",
    "slow_clients_normal_traffic",
    "flood_outcomes",
    "flood_fds",
    "recovery",
    "fds_return",
    "rss_return",
    "ledger_metrics",
    "ledger_final",
    "ledger_integrity",
    "proxy_exit",
}


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "bench/soak.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def test_a_short_soak_passes_and_reports_samples_and_verdicts(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    res = _run(*SMOKE, "--out", str(out))
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    doc = json.loads((out / "soak.json").read_text())
    samples = doc["samples"]
    assert {s["phase"] for s in samples} >= {"soak", "slow_clients", "flood"}
    soak = [s for s in samples if s["phase"] == "soak"]
    assert len(soak) >= 4
    assert all(s["proxy_rss_mb"] > 0 and s["proxy_fds"] > 0 and s["sim_rss_mb"] > 0 for s in soak)
    assert max(s["inflight"] for s in soak) > 0
    verdicts = {v["name"]: v for v in doc["verdicts"]}
    assert set(verdicts) == VERDICTS
    assert verdicts["rss_slope"]["pass"] is None  # 4 s of steady state is too short to judge a slope
    failed = [v for name, v in verdicts.items() if name != "rss_slope" and v["pass"] is not True]
    assert not failed, failed
    assert doc["passed"] is True
    r = doc["results"]
    assert r["soak"]["ok"] > 0 and r["slow_clients"]["heads"]["statuses"] == {"408": 10}
    assert r["flood"]["flood"]["errors"].get("shed", 0) > 0  # the in-flight limit was reached
    led = doc["ledger"]
    assert (
        led["integrity_check"] == "ok"
        and led["missing"] == 0
        and led["completed_requests"] >= r["soak"]["ok"]
    )
    assert "## Verdicts" in (out / "soak.md").read_text()


def test_usage_errors_are_one_line() -> None:
    res = _run("--proxy", "http://127.0.0.1:9", timeout=30)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "--proxy-pid" in res.stderr
