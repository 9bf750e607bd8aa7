"""Dashboards and Prometheus rules: generated files up to date, Grafana's JSON model (checked against
grafana-foundation-sdk's types), queries that only use exported metrics and recorded rules, and
promtool's checks and unit tests of the rules."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
import sys
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from qtrap_proxy.energy.collector import EnergyCollector
from qtrap_proxy.grafana import DASHBOARDS_DIR, generated_files
from qtrap_proxy.grafana.dashboards import DS, dashboards
from qtrap_proxy.grafana.rules import LEVELS, level_bounds, level_label, record_names, recording_rules
from qtrap_proxy.metrics import Metrics
from tests.helpers import ROOT

PANEL_TYPES = {"row", "timeseries", "stat", "barchart", "heatmap", "table"}
BUILTIN_VARIABLES = {"__range", "__rate_interval", "__interval"}
promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed"
)


def test_generated_files_are_up_to_date() -> None:
    files = generated_files()
    for path, text in files.items():
        assert (ROOT / path).read_text() == text, f"{path} is out of date: run python grafana/generate.py"
    on_disk = {p.relative_to(ROOT) for p in (ROOT / DASHBOARDS_DIR).glob("*.json")}
    assert on_disk == {p for p in files if p.parent == DASHBOARDS_DIR}
    r = subprocess.run(
        [sys.executable, "grafana/generate.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr


def _exported_metric_names() -> set[str]:
    """Sample names the proxy's /metrics can carry (from its Metrics class, per-device ones included)."""

    class Service:
        def energy_report(self) -> dict[str, Any]:
            d = {
                "device": "h:0",
                "measured_j": 1.0,
                "idle_j": 0.5,
                "foreign_j": 0.2,
                "conservation_error_ratio": 0.0,
            }
            return {
                "devices": [{**d, "meter_up": True, "last_update_age_s": 0.1, "power_w": 300.0}],
                "token_counters": [{"backend": "b", "up": True}],
            }

    m = Metrics(CollectorRegistry())
    m.registry.register(EnergyCollector(Service()))  # type: ignore[arg-type]
    names = set()
    for fam in m.registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(fam.type, [""])
        names |= {fam.name + s for s in suffixes}
    return names


def _exprs(d: dict[str, Any]) -> list[str]:
    out = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    return out + [v["query"]["query"] for v in d["templating"]["list"] if v["type"] == "query"]


@pytest.mark.parametrize("d", dashboards(), ids=lambda d: d["uid"])
def test_dashboard_model(d: dict[str, Any]) -> None:
    assert re.fullmatch(r"qtrap-[a-z]+", d["uid"]) and d["title"].startswith("qtrap / ")
    assert d["schemaVersion"] >= 39 and d["tags"] == ["qtrap"] and d["time"]["from"].startswith("now-")
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"] == {**variables["datasource"], "type": "datasource", "query": "prometheus"}
    ids = [p["id"] for p in d["panels"]]
    assert ids == list(range(1, len(ids) + 1))
    occupied: set[tuple[int, int]] = set()
    for p in d["panels"]:
        assert p["type"] in PANEL_TYPES and p["title"]
        g = p["gridPos"]
        assert set(g) == {"h", "w", "x", "y"} and g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & occupied, f"panel {p['title']!r} overlaps another"
        occupied |= cells
        if p["type"] == "row":
            continue
        assert len(p["description"]) > 40, p["title"]
        assert p["datasource"] == DS
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(set(refs)) == len(refs)
        for t in p["targets"]:
            assert t["datasource"] == DS and t["expr"].strip() and t["instant"] != t["range"]
            assert t["format"] in ("time_series", "table", "heatmap")
        if p["type"] in ("barchart", "table"):
            assert all(t["instant"] and t["format"] == "table" for t in p["targets"])
        if p["type"] == "barchart":
            x = p["options"]["xField"]
            matrix = p["transformations"][0]["options"]
            assert matrix["rowField"] == x and matrix["columnField"] == "series"
    # every $variable is defined (or one of Grafana's own); every rule and metric exists
    rules, metrics = set(record_names()), _exported_metric_names()
    for expr in _exprs(d):
        for name in re.findall(r"\$\{?(\w+)", expr):
            assert name.isdigit() or name in variables or name in BUILTIN_VARIABLES, (name, expr)
        for name in re.findall(r"\bqtrap:\w+:\w+", expr):
            assert name in rules, name
        for name in re.findall(r"\bqtrap_\w+", expr):
            assert name in metrics, name


def _dropped(orig: Any, back: Any, path: str = "") -> list[str]:
    """What of ``orig`` did not survive the round trip (keys the typed model does not know, changed values)."""
    if isinstance(orig, dict):
        if not isinstance(back, dict):
            return [f"{path}: became {type(back).__name__}"]
        return [
            x
            for k, v in orig.items()
            for x in ([f"{path}.{k}"] if k not in back else _dropped(v, back[k], f"{path}.{k}"))
        ]
    if isinstance(orig, list):
        if not isinstance(back, list) or len(back) != len(orig):
            return [f"{path}: list changed"]
        return [
            x for i, (a, b) in enumerate(zip(orig, back, strict=True)) for x in _dropped(a, b, f"{path}[{i}]")
        ]
    return [] if orig == back else [f"{path}: {orig!r} became {back!r}"]


@pytest.mark.parametrize("d", dashboards(), ids=lambda d: d["uid"])
def test_dashboard_round_trips_through_grafana_foundation_sdk(d: dict[str, Any]) -> None:
    """Decoded into the SDK's typed Dashboard model (panel options and field config by panel type,
    targets as Prometheus queries) and encoded again, nothing of the dashboard is lost: every key is one
    Grafana's schema knows."""
    sdk = pytest.importorskip("grafana_foundation_sdk")
    from grafana_foundation_sdk.cog import plugins
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard, Panel, RowPanel
    from grafana_foundation_sdk.models.prometheus import Dataquery

    del sdk
    plugins.register_default_plugins()
    model = Dashboard.from_json(d)
    assert model.panels is not None
    for p in model.panels:
        if isinstance(p, Panel):
            assert p.targets and all(isinstance(t, Dataquery) for t in p.targets)
        else:
            assert isinstance(p, RowPanel)
    back = json.loads(json.dumps(model, cls=JSONEncoder))
    assert _dropped(d, back) == []


def test_dropped_detects_unknown_keys() -> None:
    """The round-trip check is not vacuous: unknown keys in options, field config and targets are caught."""
    pytest.importorskip("grafana_foundation_sdk")
    from grafana_foundation_sdk.cog import plugins
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    plugins.register_default_plugins()
    d = dashboards()[0]
    p = next(p for p in d["panels"] if p["type"] == "timeseries")
    p["options"]["legendd"] = {}
    p["fieldConfig"]["defaults"]["custom"]["drawStyl"] = "line"
    p["targets"][0]["exp"] = "up"
    back = json.loads(json.dumps(Dashboard.from_json(d), cls=JSONEncoder))
    assert len(_dropped(d, back)) == 3


def test_in_flight_levels_tile_the_axis() -> None:
    assert [level_label(i) for i in range(len(LEVELS))][:3] == ["001", "002", "004"] and level_label(
        9
    ) == "512+"
    bounds = [level_bounds(i) for i in range(len(LEVELS))]
    assert bounds[0][0] == 0 and bounds[-1][1] is None
    for (_, hi), (lo, _) in itertools.pairwise(bounds):
        assert hi == lo
    for i, (lo, hi) in enumerate(bounds):
        assert lo <= LEVELS[i] and (hi is None or LEVELS[i] < hi)


def test_recording_rule_names_follow_the_convention() -> None:
    names = record_names()
    assert len(names) == len(set(names))
    for name in names:
        assert re.fullmatch(r"qtrap:[a-z_0-9]+:[a-z_0-9]+", name), name
    for group in recording_rules()["groups"]:
        for rule in group["rules"]:
            assert set(rule) == {"record", "expr"}


def test_provisioning_files() -> None:
    prov = ROOT / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())
    assert ds["apiVersion"] == 1
    [source] = ds["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] and source["url"].startswith("http")
    boards = yaml.safe_load((prov / "dashboards" / "qtrap.yml").read_text())
    [provider] = boards["providers"]
    assert provider["type"] == "file" and provider["folder"] == "qtrap"
    path = provider["options"]["path"]
    # the compose stack mounts the generated dashboards where the provider looks
    compose = ROOT / "deploy" / "compose" / "docker-compose.yml"
    if compose.exists():
        volumes = yaml.safe_load(compose.read_text())["services"]["grafana"]["volumes"]
        assert f"../../{DASHBOARDS_DIR}:{path}:ro" in volumes, volumes
        assert "../../grafana/provisioning:/etc/grafana/provisioning:ro" in volumes, volumes


@promtool
def test_promtool_check_rules() -> None:
    files = sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))
    assert {f.name for f in files} >= {"qtrap-recording.yml", "qtrap-alerts.yml"}
    r = subprocess.run(
        ["promtool", "check", "rules", *map(str, files)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNING" not in r.stdout + r.stderr


@promtool
def test_promtool_check_config() -> None:
    """The example scrape configuration, with the rule files it loads."""
    config = ROOT / "deploy" / "prometheus" / "prometheus.yml"
    r = subprocess.run(
        ["promtool", "check", "config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "qtrap-recording.yml" in r.stdout and "qtrap-alerts.yml" in r.stdout
    cfg = yaml.safe_load(config.read_text())
    assert any(j["job_name"] == "qtrap-proxy" for j in cfg["scrape_configs"])


@promtool
def test_promtool_rule_unit_tests() -> None:
    """deploy/prometheus/tests: J/token, J per correct answer, ratios, baseline choice, casting overhead,
    B* from levels run one at a time, and every alert firing (or not) with its annotations."""
    tests = sorted((ROOT / "deploy" / "prometheus" / "tests").glob("*.test.yml"))
    assert tests
    r = subprocess.run(
        ["promtool", "test", "rules", *map(str, tests)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr
