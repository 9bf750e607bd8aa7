"""Two proxy replicas in front of one backend: every joule attributed once.

One simulated vLLM backend on one simulated H100 (its DCGM counter and its own token counters on
``/metrics``); two qtrap-proxy processes with the same configuration, each reading the same GPU's
energy, each serving part of the load. With ``token_counters: true`` each replica gives the work it
did not see to its foreign bucket, and the replicas' attributed energy adds up to what the requests
cost on the GPU (the simulator's ground truth); without, each replica takes the whole busy energy.
"""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.helpers import backend, free_port, proxy, sim


def _cfg(sim_port: int, token_counters: bool, api: str) -> dict[str, Any]:
    return {
        "backends": [
            backend(
                "gpu0-bf16",
                sim_port,
                "bf16",
                kind=api,
                devices=[{"host": "qtrap-sim", "index": 0}],
                token_counters=token_counters,
            )
        ],
        "meter": {"kind": "dcgm", "urls": [f"http://127.0.0.1:{sim_port}/dcgm/metrics"], "settle_s": 2.0},
    }


def _energy(url: str) -> dict[str, Any]:
    report: dict[str, Any] = requests.get(url + "/qtrap/v1/energy", timeout=5).json()
    return report


def _wait_up(urls: list[str], counters: bool, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    for url in urls:
        while True:
            rep = _energy(url)
            d = rep["devices"][0]
            if d["meter_up"] and d["updates"] >= 2 and (not counters or rep["token_counters"][0]["up"]):
                break
            assert time.monotonic() < deadline, f"{url}: meter or token counters never came up: {rep}"
            time.sleep(0.05)


def _stream(url: str, i: int, api: str) -> str:
    n, words, stream = 30 + (i * 37) % 90, "word " * (10 + (i * 13) % 200), i % 4 != 0
    body: dict[str, Any]
    if api == "tgi":  # TGI's own routes
        path, body = (
            "/generate_stream" if stream else "/generate",
            {"inputs": words, "parameters": {"max_new_tokens": n}},
        )
    else:
        path = "/v1/chat/completions"
        body = {
            "model": "qwen3-8b",
            "max_tokens": n,
            "stream": stream,
            "messages": [{"role": "user", "content": words}],
        }
    r = requests.post(url + path, json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.headers["x-qtrap-request-id"]


def _load(plan: list[tuple[str, int]], api: str) -> dict[str, list[str]]:
    """Run the planned (proxy URL, concurrent clients) at the same time, each client 6 requests in a row."""
    clients = [(url, c) for url, n in plan for c in range(n)]
    with concurrent.futures.ThreadPoolExecutor(len(clients)) as ex:
        done = list(ex.map(lambda uc: [_stream(uc[0], uc[1] * 100 + k, api) for k in range(6)], clients))
    ids: dict[str, list[str]] = {url: [] for url, _ in plan}
    for (url, _), rids in zip(clients, done, strict=True):
        ids[url].extend(rids)
    return ids


def _settled(url: str, ids: list[str], timeout_s: float = 20.0) -> float:
    """Wait for every record to be final; their attributed energy."""
    deadline = time.monotonic() + timeout_s
    while True:
        recs = [requests.get(f"{url}/qtrap/v1/requests/{i}", timeout=5).json() for i in ids]
        if all(r["final"] for r in recs):
            assert all(r["energy_j"] is not None and r["energy_j"] > 0 for r in recs), recs
            return float(sum(r["energy_j"] for r in recs))
        assert time.monotonic() < deadline, [r["id"] for r in recs if not r["final"]]
        time.sleep(0.1)


def _truth(sim_url: str, ids: list[str]) -> float:
    return float(
        sum(requests.get(f"{sim_url}/sim/v1/requests/{i}", timeout=5).json()["energy_j"] for i in ids)
    )


@pytest.mark.parametrize(
    ("api", "token_counters"),
    [("vllm", True), ("tgi", True), ("vllm", False)],
    ids=["vllm-token-counters", "tgi-token-counters", "no-counters"],
)
def test_two_replicas_attribute_each_joule_once(tmp_path: Path, api: str, token_counters: bool) -> None:
    port = free_port()
    sim_url = f"http://127.0.0.1:{port}"
    with (
        sim(port, "--api", api),
        proxy(tmp_path, _cfg(port, token_counters, api)),
        proxy(tmp_path, _cfg(port, token_counters, api)),
    ):
        ports = sorted(int(p.stem.split("-")[1]) for p in tmp_path.glob("proxy-*.yaml"))
        a, b = (f"http://127.0.0.1:{p}" for p in ports)
        _wait_up([a, b], token_counters)
        busy_before = requests.get(sim_url + "/sim/v1/energy", timeout=5).json()["requests_j"]
        ids = _load([(a, 6), (b, 2)], api)  # replica A serves three times the load of B, at the same time
        got = {u: _settled(u, ids[u]) for u in (a, b)}
        truth = {u: _truth(sim_url, ids[u]) for u in (a, b)}
        busy = requests.get(sim_url + "/sim/v1/energy", timeout=5).json()["requests_j"] - busy_before
        rep = {u: _energy(u) for u in (a, b)}
        metrics = requests.get(a + "/metrics", timeout=5).text

    total = got[a] + got[b]
    assert truth[a] + truth[b] == pytest.approx(busy, rel=0.01)  # the ground truth is the GPU's busy energy
    print(
        f"attributed {got}, truth {truth}, busy {busy:.1f} J, foreign",
        [rep[u]["devices"][0]["foreign_j"] for u in (a, b)],
    )
    if not token_counters:
        # each replica hands the whole busy energy to its own requests: the fleet counts it about twice
        assert total > 1.5 * busy, (got, busy)
        return
    # the replicas' records add up to what the requests cost, and each replica's to its own requests' cost;
    # TGI's timing comes from its sampled running batch, coarser than vLLM's token counters
    tol = {"vllm": 0.04, "tgi": 0.06}[api]
    assert total == pytest.approx(busy, rel=tol), (got, truth, busy)
    assert got[a] == pytest.approx(truth[a], rel=2 * tol), (got, truth)
    assert got[b] == pytest.approx(truth[b], rel=3 * tol), (got, truth)
    for u, other in ((a, b), (b, a)):
        d = rep[u]["devices"][0]
        assert d["counted_backends"] == ["gpu0-bf16"] and d["counter_gaps"] == 0
        assert d["conservation_error_ratio"] < 1e-9
        # what one replica did not serve is foreign there: about the other replica's requests' cost
        assert d["foreign_j"] == pytest.approx(truth[other], rel=3 * tol), (u, d, truth)
        c = rep[u]["token_counters"][0]
        assert c["up"] and c["polls"] > 10 and c["generated_tokens"] > 0
    assert 'qtrap_backend_token_counters_up{backend="gpu0-bf16"} 1.0' in metrics
    foreign = [ln for ln in metrics.splitlines() if ln.startswith("qtrap_gpu_foreign_energy_joules_total{")]
    assert foreign and float(foreign[0].rsplit(" ", 1)[1]) > 0


def test_unreadable_token_counters_are_reported_and_requests_still_measured(tmp_path: Path) -> None:
    port = free_port()
    cfg = _cfg(port, True, "vllm")
    cfg["backends"][0]["metrics_path"] = "/no-such-page"
    with sim(port), proxy(tmp_path, cfg):
        url = f"http://127.0.0.1:{cfg['server']['port']}"
        _wait_up([url], counters=False)
        rid = _stream(url, 1, "vllm")
        got = _settled(url, [rid])
        rep = _energy(url)
        metrics = requests.get(url + "/metrics", timeout=5).text
    c = rep["token_counters"][0]
    assert not c["up"] and "/no-such-page: ValueError: HTTP 404" in c["error"], c
    # intervals settle without the counters (after settle_s), say so, and the request is measured as before
    assert got > 0 and rep["devices"][0]["counter_gaps"] > 0 and rep["devices"][0]["foreign_j"] == 0
    assert 'qtrap_backend_token_counters_up{backend="gpu0-bf16"} 0.0' in metrics
