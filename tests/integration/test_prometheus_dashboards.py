"""A real Prometheus (Debian's `prometheus`) scrapes a proxy metered by DCGM over calibrated qtrap-sim
backends (bf16, int4) while loadgen sweeps them; then every recording rule and every query of every
dashboard panel and variable returns data, and the alert rules load and evaluate without error."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from loadgen.analysis import crossings
from loadgen.embedded import embedded_stack
from qtrap_common.localproc import child, free_port
from qtrap_proxy.grafana.dashboards import dashboards
from qtrap_proxy.grafana.rules import record_names
from tests.helpers import ROOT

pytestmark = [
    pytest.mark.skipif(
        shutil.which("prometheus") is None, reason="prometheus (Debian package prometheus) not installed"
    ),
    pytest.mark.slow,  # about 100 s: loadgen sweeps a metered proxy while Prometheus scrapes it
]

RULES = ROOT / "deploy" / "prometheus" / "rules"
POOL = "qwen3-8b"
PRECISIONS = ("bf16", "int4")
# What Grafana substitutes for the dashboards' variables (multi-value variables become regex alternations).
VARIABLES = {
    "pool": POOL,
    "precision": "(" + "|".join(PRECISIONS) + ")",
    "gpu_device": "(qtrap-sim:0|qtrap-sim:1)",
    "__range": "15m",
    "__rate_interval": "10s",
    "__interval": "2s",
    "datasource": "prometheus",
}


def substitute(expr: str, variables: dict[str, str] = VARIABLES) -> str:
    """As Grafana interpolates: ``$name`` / ``${name}`` of known variables; ``$1`` (label_replace) stays."""

    def value(m: re.Match[str]) -> str:
        name = m.group(1)
        return m.group(0) if name.isdigit() else variables[name]

    return re.sub(r"\$\{?(\w+)\}?", value, expr)


@dataclass(frozen=True)
class Query:
    id: str
    expr: str
    instant: bool


def panel_queries() -> list[Query]:
    out = []
    for d in dashboards():
        for p in d["panels"]:
            for t in p.get("targets", []):
                out.append(Query(f"{d['uid']}/{p['id']}:{p['title']}/{t['refId']}", t["expr"], t["instant"]))
    return out


def variable_queries() -> list[Query]:
    out = []
    for d in dashboards():
        for v in d["templating"]["list"]:
            if v["type"] == "query":
                out.append(Query(f"{d['uid']}/${v['name']}", v["query"]["query"], True))
    return out


@dataclass
class Prom:
    url: str
    start: float
    out: Path  # loadgen's output directories are under it

    def get(self, path: str, **params: Any) -> Any:
        r = requests.get(self.url + path, params=params, timeout=30)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", data
        return data["result"]  # type: ignore[no-any-return]

    def query_range(self, expr: str) -> list[dict[str, Any]]:
        data = self.get("/api/v1/query_range", query=expr, start=self.start, end=time.time(), step=2)
        return data["result"]  # type: ignore[no-any-return]


def _loadgen(url: str, concurrency: str, out: Path) -> None:
    run = subprocess.run(
        [
            sys.executable, "-m", "loadgen", "--proxy", url, "--model", POOL, "--precisions", ",".join(PRECISIONS),
            "--concurrency", concurrency, "--duration", "8", "--warmup", "1", "--bootstrap", "50", "--quiet",
            "--out", str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]


def _wait(cond: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def prom(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prom]:
    tmp = tmp_path_factory.mktemp("prom")
    start = time.time()
    # The B* rules need a crossing to have data: the H100 kernel-probe profile's fused INT4 what-if crosses
    # BF16 between 1 and 8 chains in flight (on the H200 profile, calibrated to vLLM, INT4 is cheaper at both).
    with embedded_stack(
        "qwen3-8b",
        PRECISIONS,
        workdir=tmp,
        think_tokens=8,
        token_counters=True,
        gpu="h100",
        proxy_options={  # the carbon and cost panels
            "carbon": {"intensity_g_per_kwh": 350},
            "pricing": {"price_per_kwh": 0.2, "currency": "EUR"},
        },
    ) as stack:
        port = free_port()
        cfg = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES / "*.yml")],
            "scrape_configs": [
                {
                    "job_name": "qtrap-proxy",
                    "static_configs": [{"targets": [stack.url.removeprefix("http://")]}],
                }
            ],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        cmd = [
            "prometheus",
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ]
        with child(cmd, f"http://127.0.0.1:{port}/-/ready", tmp / "prometheus.log", timeout_s=60):
            p = Prom(f"http://127.0.0.1:{port}", start, tmp)
            # a request rejected before routing, and the backends' health probe (qtrap_backend_up)
            requests.post(
                stack.url + "/v1/chat/completions", json={"model": "nope", "messages": []}, timeout=10
            )
            requests.get(stack.url + "/health", timeout=10)
            _wait(lambda: p.query('up{job="qtrap-proxy"} == 1'), 30, "Prometheus's first scrape of the proxy")
            # Two sweeps (bf16 then int4, 8 s of steady state each), at 1 and then at 8 chains in flight.
            # The by-load rules work on 1-minute rates and on in-flight samples taken at each scrape:
            # each level lasts several scrapes, and a precision's two levels are over a minute apart,
            # so no 1-minute window mixes them.
            _loadgen(stack.url, "1", tmp / "loadgen-c1")
            time.sleep(50)
            _loadgen(stack.url, "8", tmp / "loadgen-c8")
            requests.get(stack.url + "/health", timeout=10)
            # final energy figures land after the meter's next update; then a scrape and a rule evaluation
            _wait(
                lambda: (
                    p.query("qtrap:j_per_token:bstar_30m")
                    and p.query("qtrap:j_per_correct:ratio_to_baseline")
                ),
                60,
                "the recording rules' B* and ratios",
            )
            yield p


def _has_data(result: list[dict[str, Any]], instant: bool) -> bool:
    if instant:
        values = [float(s["value"][1]) for s in result]
    else:
        values = [float(v[1]) for s in result for v in s["values"]]
    return any(not math.isnan(v) for v in values)


@pytest.mark.parametrize("rule", record_names())
def test_recording_rule_has_data(prom: Prom, rule: str) -> None:
    result = prom.query(rule)
    assert _has_data(result, instant=True), f"{rule}: no data"


@pytest.mark.parametrize("q", panel_queries(), ids=lambda q: q.id)
def test_panel_query_returns_data(prom: Prom, q: Query) -> None:
    expr = substitute(q.expr)
    result = prom.query(expr) if q.instant else prom.query_range(expr)
    assert _has_data(result, q.instant), f"{q.id}: no data for\n{expr}"


@pytest.mark.parametrize("q", variable_queries(), ids=lambda q: q.id)
def test_variable_query_returns_values(prom: Prom, q: Query) -> None:
    m = re.fullmatch(r"label_values\((.+), (\w+)\)", q.expr)
    assert m, q.expr
    values = prom.get(f"/api/v1/label/{m.group(2)}/values", **{"match[]": substitute(m.group(1))})
    assert values and "" not in values, values


def test_alert_rules_loaded_and_healthy(prom: Prom) -> None:
    groups = prom.get("/api/v1/rules")["groups"]
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) >= {"qtrap-energy", "qtrap-load", "qtrap-alerts"}
    for g in groups:
        for r in g["rules"]:
            assert r["health"] == "ok", (r["name"], r.get("lastError"))
    alerts = {r["name"] for r in by_name["qtrap-alerts"]["rules"]}
    assert alerts == {
        "QtrapMeterDown",
        "QtrapMeterStale",
        "QtrapConservationBroken",
        "QtrapTrapActive",
        "QtrapBackendDown",
        "QtrapTokenCountersDown",
    }
    # nothing is broken in this healthy stack: no alert but the trap is even pending
    active = [
        a for a in prom.get("/api/v1/alerts")["alerts"] if a["labels"]["alertname"] != "QtrapTrapActive"
    ]
    assert active == [], active


def test_bstar_agrees_with_loadgen(prom: Prom) -> None:
    """The live B* crosses where loadgen's J/token ratios at 1 and 8 in flight cross, in the same direction."""
    ratios = []
    for c in (1, 8):
        levels = json.loads((prom.out / f"loadgen-c{c}" / "report.json").read_text())["levels"]
        jpt = {lv["precision"]: lv["j_per_token"] for lv in levels}
        ratios.append(jpt["int4"] / jpt["bf16"])
    found = crossings([1, 8], ratios)
    live = prom.query(f'qtrap:j_per_token:bstar_30m{{pool="{POOL}"}}')
    assert len(found) == 1 and len(live) == 1, (ratios, live)
    (b_star, direction), s = found[0], live[0]
    assert s["metric"]["precision"] == "int4" and s["metric"]["direction"] == direction
    assert float(s["value"][1]) == pytest.approx(b_star, rel=0.5), (ratios, s)
