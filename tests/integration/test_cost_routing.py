"""Routing by cost through a real proxy: two simulated H200s (Qwen3-8B at BF16 and INT4 W4A16) metered by
the proxy's DCGM meter; unpinned requests end up on the precision whose measured J/token is lower."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import yaml

from tests.helpers import BIN, backend, free_port, proxy, server, wait_meter

ROUTE = re.compile(
    r"cost; precision=(bf16|int4); reason=(pinned|cheapest|explore|sticky|ramp|fallback|no_data)"
)


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("cost")
    ports = {"bf16": free_port(), "int4": free_port()}
    fleet = {"backends": [{"model": "qwen3-8b", "precision": p, "port": port} for p, port in ports.items()]}
    (tmp / "sim.yaml").write_text(yaml.safe_dump(fleet))
    cfg: dict[str, Any] = {
        "backends": [
            backend(f"sim-{p}", port, p, devices=[{"host": "qtrap-sim", "index": i}])
            for i, (p, port) in enumerate(ports.items())
        ],
        "pools": {
            "qwen3-8b": {
                "default_precision": "bf16",
                "routing": "cost",
                "cost": {"probe_s": 1.0, "sticky_max_ratio": 4.0},
            }
        },
        "meter": {
            "kind": "dcgm",
            "urls": [f"http://127.0.0.1:{port}/dcgm/metrics" for port in ports.values()],
            "settle_s": 0.3,
        },
    }
    sim_cmd = [str(BIN / "qtrap-sim"), "--config", str(tmp / "sim.yaml")]
    with server(sim_cmd, f"http://127.0.0.1:{ports['int4']}/health"), proxy(tmp, cfg):
        u = f"http://127.0.0.1:{cfg['server']['port']}"
        wait_meter(u)
        yield u


def _chat(url: str, model: str = "qwen3-8b", chain: str | None = None) -> tuple[str, str]:
    body = {
        "model": model,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "count: " + "one " * 20}],
    }
    headers = {"x-qtrap-chain-id": chain} if chain else {}
    r = requests.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    m = ROUTE.fullmatch(r.headers["x-qtrap-route"])
    assert m is not None, r.headers["x-qtrap-route"]
    assert m.group(1) == r.headers["x-qtrap-precision"]
    return m.group(1), m.group(2)


def _measured(url: str) -> dict[str, float]:
    """Each precision's dynamic J/token with one request in flight, as the proxy's cost table has it."""
    table = requests.get(url + "/qtrap/v1/routing", timeout=5).json()
    (pool,) = table["pools"]
    out = {}
    for b in pool["backends"]:
        alone = b["j_per_token_by_load"]["0"]
        if alone is not None and sum(c["seconds"] for c in b["curves"]) >= 3:
            out[b["precision"]] = alone
    return out


def test_unpinned_requests_go_to_the_cheaper_precision(url: str) -> None:
    first = [_chat(url) for _ in range(2)]
    assert {r for _, r in first} == {"explore"}  # neither has data: each is tried
    assert {p for p, _ in first} == {"bf16", "int4"}
    deadline = time.monotonic() + 40
    while len(_measured(url)) < 2:  # warm-up: until both have 3 s of settled meter intervals
        assert time.monotonic() < deadline, requests.get(url + "/qtrap/v1/routing", timeout=5).text
        for p in ("bf16", "int4"):  # pinned requests teach the curves too (the policy would starve one)
            _chat(url, f"qwen3-8b@{p}")
    for _ in range(6):
        _chat(url)
    decisions = [_chat(url) for _ in range(30)]
    measured = _measured(url)
    cheaper = min(measured, key=measured.__getitem__)
    counts = Counter(p for p, _ in decisions)
    assert counts[cheaper] >= 0.75 * len(decisions), (measured, decisions)
    assert measured["int4"] < measured["bf16"]  # the simulated H200: W4A16 about 0.6x BF16 alone
    assert any(r == "cheapest" for _, r in decisions)

    # a pin wins, and a chain keeps the precision of its first hop
    assert _chat(url, "qwen3-8b@bf16") == ("bf16", "pinned")
    # (a chain's first hop is routed like any request, so exploration may send it elsewhere: a few chains
    # until one starts on the cheaper precision; its next hop must stay there)
    chain = next((c for c in (f"chain-a{i}" for i in range(8)) if _chat(url, chain=c)[0] == cheaper), None)
    assert chain is not None, "eight chains' first hops all went to the dearer precision"
    assert _chat(url, chain=chain) == (cheaper, "sticky")
    assert _chat(url, "qwen3-8b@bf16", chain="chain-b") == ("bf16", "pinned")
    # a chain stays while its precision is within sticky_max_ratio of the cheapest (set to 4 here: BF16's cost
    # over W4A16's on the simulated H200 sits near the default 1.5, where the outcome would turn on the
    # curves' last intervals; moving beyond the ratio is unit-tested on constructed curves)
    assert measured["bf16"] < 3 * measured["int4"], measured
    assert _chat(url, chain="chain-b") == ("bf16", "sticky")

    table = requests.get(url + "/qtrap/v1/routing", timeout=5).json()
    (pool,) = table["pools"]
    assert pool["current_best"]["precision"] == cheaper and table["round_robin_pools"] == []
    for b in pool["backends"]:
        assert b["up"] and b["candidate"] and b["records"] > 0
        (curve,) = b["curves"]  # one simulated device each
        assert curve["seconds"] > 0 and curve["points"]
        for k in curve["points"]:
            assert k["power_w"] > 0 and k["tokens_per_s"] > 0 and k["seconds_eff"] > 0
            assert k["power_stderr_w"] >= 0 and k["mean_load"] > 0
    metrics = requests.get(url + "/metrics", timeout=5).text
    cheapest = re.search(
        rf'qtrap_route_decisions_total{{pool="qwen3-8b",precision="{cheaper}",reason="cheapest"}} (\S+)',
        metrics,
    )
    assert cheapest is not None and float(cheapest.group(1)) >= 1
    assert 'reason="pinned"' in metrics and 'reason="sticky"' in metrics


def test_routing_table_needs_nothing_but_the_route(url: str) -> None:
    r = requests.get(url + "/qtrap/v1/routing", timeout=5)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    assert requests.post(url + "/qtrap/v1/routing", timeout=5).status_code == 405


def test_pinned_requests_on_a_cost_pool_say_so(url: str) -> None:
    assert _chat(url, "qwen3-8b@int4") == ("int4", "pinned")
