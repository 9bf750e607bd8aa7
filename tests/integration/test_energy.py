"""Energy through the proxy: a DCGM meter reading simulated H100s, under concurrent load."""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
import requests
import yaml

from tests.helpers import BIN, backend, free_port, proxy, server, wait_meter


@dataclass
class EnergySetup:
    url: str
    sim_urls: dict[str, str]


def _sim_fleet(tmp: Path, ports: dict[str, int]) -> list[str]:
    cfg = {"backends": [{"model": "qwen3-8b", "precision": p, "port": port} for p, port in ports.items()]}
    (tmp / "sim.yaml").write_text(yaml.safe_dump(cfg))
    return [str(BIN / "qtrap-sim"), "--config", str(tmp / "sim.yaml")]


def _proxy_cfg(ports: dict[str, int], **meter: object) -> dict[str, object]:
    return {
        "backends": [
            backend(f"sim-{p}", port, p, model="qwen3-8b", devices=[{"host": "qtrap-sim", "index": i}])
            for i, (p, port) in enumerate(ports.items())
        ],
        "meter": {
            "kind": "dcgm",
            "urls": [f"http://127.0.0.1:{port}/dcgm/metrics" for port in ports.values()],
            "settle_s": 0.3,
            **meter,
        },
    }


@pytest.fixture(scope="module")
def energy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnergySetup]:
    tmp = tmp_path_factory.mktemp("energy")
    ports = {"bf16": free_port(), "int4": free_port()}
    with server(_sim_fleet(tmp, ports), f"http://127.0.0.1:{ports['int4']}/health"):
        cfg = _proxy_cfg(ports)
        with proxy(tmp, cfg):
            wait_meter(f"http://127.0.0.1:{cfg['server']['port']}")  # type: ignore[index]
            yield EnergySetup(
                f"http://127.0.0.1:{cfg['server']['port']}",  # type: ignore[index]
                {p: f"http://127.0.0.1:{port}" for p, port in ports.items()},
            )


def _chat(
    url: str, precision: str, max_tokens: int, stream: bool, extra: dict[str, str] | None = None
) -> str:
    body = {
        "model": f"qwen3-8b@{precision}",
        "max_tokens": max_tokens,
        "stream": stream,
        "messages": [{"role": "user", "content": "word " * (5 + max_tokens % 50)}],
    }
    r = requests.post(url + "/v1/chat/completions", json=body, headers=extra or {}, timeout=60)
    assert r.status_code == 200
    return r.headers["x-qtrap-request-id"]


def _wait_final(url: str, ids: list[str], timeout_s: float = 20.0) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout_s
    while True:
        recs = [requests.get(f"{url}/qtrap/v1/requests/{i}", timeout=5).json() for i in ids]
        if all(r["final"] for r in recs):
            return recs
        assert time.monotonic() < deadline, [r["id"] for r in recs if not r["final"]]
        time.sleep(0.1)


@pytest.mark.parametrize("concurrency", [1, 8, 64])
def test_conservation_under_concurrent_load(energy: EnergySetup, concurrency: int) -> None:
    n = max(8, concurrency * 2)
    jobs = [("bf16" if i % 2 else "int4", 8 + (i * 37) % 120, i % 3 != 0) for i in range(n)]
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        ids = list(pool.map(lambda j: _chat(energy.url, *j), jobs))
    recs = _wait_final(energy.url, ids)
    for r in recs:
        assert r["energy_j"] is not None and r["energy_j"] > 0, json.dumps(r)
        assert r["meter"] == "dcgm" and r["error_bound_j"] is not None and r["j_per_token"] > 0
    report = requests.get(energy.url + "/qtrap/v1/energy", timeout=5).json()
    for d in report["devices"]:
        assert d["meter_up"] and d["updates"] > 5
        assert d["measured_j"] > 0
        assert abs(d["attributed_j"] + d["idle_j"] - d["measured_j"]) <= 0.001 * d["measured_j"]
        assert d["conservation_error_ratio"] <= 0.001


def test_attributed_energy_tracks_ground_truth(energy: EnergySetup) -> None:
    """Long requests run alone are attributed what the simulated GPU says they cost (within the meter's steps)."""
    rid = _chat(energy.url, "bf16", 150, stream=True)
    rec = _wait_final(energy.url, [rid])[0]
    truth = requests.get(f"{energy.sim_urls['bf16']}/sim/v1/requests/{rid}", timeout=5).json()
    assert truth["energy_j"] > 0
    assert rec["energy_j"] == pytest.approx(truth["energy_j"], rel=0.15)


def test_openai_sdk_sees_provisional_energy(energy: EnergySetup) -> None:
    client = openai.OpenAI(base_url=energy.url + "/v1", api_key="x", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model="qwen3-8b", messages=[{"role": "user", "content": "hi"}], max_tokens=20
    )
    assert raw.parse().usage is not None
    assert float(raw.headers["x-qtrap-energy-j-provisional"]) > 0
    chunks = list(
        client.chat.completions.create(
            model="qwen3-8b@int4",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=20,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    last = chunks[-1]
    assert last.usage is not None and last.usage.completion_tokens == 20
    extra = last.usage.model_extra or {}
    assert extra["qtrap"]["request_id"] and extra["qtrap"]["provisional"] and extra["energy_j"] > 0
    final = _wait_final(energy.url, [extra["qtrap"]["request_id"]])[0]
    assert final["energy_j"] > 0 and final["final"] is True


def test_chains_and_hops(energy: EnergySetup) -> None:
    cid = f"chain-{time.monotonic_ns()}"
    ids = [
        _chat(
            energy.url,
            "bf16",
            10 * hop,
            stream=hop % 2 == 1,
            extra={"x-qtrap-chain-id": cid, "x-qtrap-hop": str(hop)},
        )
        for hop in (1, 2, 3)
    ]
    _wait_final(energy.url, ids)
    chain = requests.get(f"{energy.url}/qtrap/v1/chains/{cid}", timeout=5).json()
    assert chain["final"] and chain["requests"] == 3 and [h["index"] for h in chain["hops"]] == [1, 2, 3]
    assert chain["energy_j"] == pytest.approx(sum(h["energy_j"] for h in chain["hops"]))
    assert requests.get(f"{energy.url}/qtrap/v1/chains/nope", timeout=5).status_code == 404
    metrics = requests.get(energy.url + "/metrics", timeout=5).text
    assert 'qtrap_hop_energy_joules_count{hop="3"' in metrics and cid not in metrics


def test_hop_split_inside_one_stream(tmp_path: Path) -> None:
    """`x-qtrap-hop-split: lines` on a simulator that answers a GSM8K problem step by step, one line per hop."""
    data = Path(__file__).resolve().parents[1] / "data" / "gsm8k-test.jsonl.gz"  # tests/data
    import gzip
    import json

    problem = json.loads(gzip.decompress(data.read_bytes()).decode().splitlines()[10])
    port = free_port()
    with server(
        [
            str(BIN / "qtrap-sim"),
            "--port",
            str(port),
            "--oracle-data",
            str(data),
            "--hop-accuracy",
            "1",
            "--gpu-index",
            "7",
        ],
        f"http://127.0.0.1:{port}/health",
    ):
        cfg = {
            "backends": [
                backend(
                    "oracle",
                    port,
                    "bf16",
                    pool="o",
                    model="qwen3-8b",
                    devices=[{"host": "qtrap-sim", "index": 7}],
                )
            ],
            "meter": {"kind": "dcgm", "urls": [f"http://127.0.0.1:{port}/dcgm/metrics"], "settle_s": 0.3},
        }
        with proxy(tmp_path, cfg):
            url = f"http://127.0.0.1:{cfg['server']['port']}"  # type: ignore[index]
            wait_meter(url)
            r = requests.post(
                url + "/v1/chat/completions",
                timeout=60,
                headers={"x-qtrap-hop-split": "lines"},
                json={
                    "model": "o",
                    "stream": True,
                    "max_tokens": 400,
                    "messages": [{"role": "user", "content": problem["question"]}],
                },
            )
            rid = r.headers["x-qtrap-request-id"]
            rec = _wait_final(url, [rid])[0]
            expected_hops = (
                len([ln for ln in problem["answer"].split("####")[0].splitlines() if ln.strip()]) + 1
            )
            assert len(rec["hops"]) == expected_hops  # reasoning lines plus the final answer line
            assert sum(h["energy_j"] for h in rec["hops"]) == pytest.approx(rec["energy_j"], rel=1e-9)
            assert sum(h["tokens"] for h in rec["hops"]) == rec["completion_tokens"]
            bad = requests.post(
                url + "/v1/chat/completions",
                timeout=10,
                headers={"x-qtrap-hop-split": "words"},
                json={"model": "o", "stream": True, "messages": [{"role": "user", "content": "x"}]},
            )
            assert bad.status_code == 400


def test_meter_down_keeps_serving_and_says_why(tmp_path: Path) -> None:
    sim_port, dead = free_port(), free_port()
    with server(
        [str(BIN / "qtrap-sim"), "--port", str(sim_port), "--step-ms", "5"],
        f"http://127.0.0.1:{sim_port}/health",
    ):
        cfg = {
            "backends": [backend("s", sim_port, devices=[{"host": "qtrap-sim", "index": 0}])],
            "meter": {"kind": "dcgm", "urls": [f"http://127.0.0.1:{dead}/metrics"], "settle_s": 0.2},
        }
        with proxy(tmp_path, cfg):
            url = f"http://127.0.0.1:{cfg['server']['port']}"  # type: ignore[index]
            rid = _chat(url, "bf16", 5, stream=False)
            rec = _wait_final(url, [rid], timeout_s=10)[0]
            assert rec["energy_j"] is None and "meter down" in rec["energy_null_reason"]
            metrics = requests.get(url + "/metrics", timeout=5).text
            assert 'qtrap_meter_up{gpu_device="qtrap-sim:0"} 0.0' in metrics
            energy = requests.get(url + "/qtrap/v1/energy", timeout=5).json()["devices"][0]
            assert energy["meter_up"] is False and "unreachable" in energy["meter_error"]


def test_energy_metrics_are_promtool_clean(energy: EnergySetup) -> None:
    import shutil
    import subprocess

    if shutil.which("promtool") is None:
        pytest.skip("promtool (Debian package prometheus) not installed")
    _chat(energy.url, "bf16", 5, stream=True)
    text = requests.get(energy.url + "/metrics", timeout=5).text
    for name in (
        "qtrap_gpu_energy_joules_total",
        "qtrap_gpu_idle_energy_joules_total",
        "qtrap_energy_joules_total",
        "qtrap_energy_conservation_error_ratio",
        "qtrap_meter_up",
        "qtrap_meter_last_update_age_seconds",
        "qtrap_request_energy_joules_bucket",
        "qtrap_inter_token_latency_seconds_bucket",
        "qtrap_gpu_power_watts",
    ):
        assert name in text, name
    # the proxy's device label is gpu_device (dcgm-exporter's `device` is the driver's nvidia0)
    assert (
        'qtrap_gpu_energy_joules_total{gpu_device="qtrap-sim:0"}' in text
        and "device=" not in text.replace("gpu_device=", "")
    )
    # the simulated H100s draw between their idle and peak power (W), as the meter counts it
    powers = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("qtrap_gpu_power_watts{")
    ]
    assert len(powers) == 2 and all(30 < p < 1000 for p in powers), powers
    # no series whose every label is empty
    for line in text.splitlines():
        if line.startswith("qtrap_") and "{" in line:
            labels = line[line.index("{") + 1 : line.index("}")]
            assert any(not v.endswith('=""') for v in labels.split(",")), line
    r = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr
