"""/metrics of the proxy and of qtrap_sim: parseable, promtool-clean, bounded labels."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Fleet


def _families(url: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    text = requests.get(url, timeout=5).text
    out: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        out[fam.name] = [(s.name, s.labels, s.value) for s in fam.samples]
    return out


def test_proxy_metrics_after_traffic(fleet: Fleet) -> None:
    r = requests.post(
        fleet.v1 + "/chat/completions",
        timeout=30,
        headers={"x-qtrap-chain-id": "c-123"},
        json={"model": "qwen3-8b@int4", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
    )
    assert r.status_code == 200
    requests.post(fleet.v1 + "/chat/completions", json={"model": "no-such-model", "messages": []}, timeout=10)
    fams = _families(fleet.proxy_url + "/metrics")
    reqs = fams["qtrap_requests"]
    assert any(lb["precision"] == "int4" and lb["status"] == "ok" and v >= 1 for _, lb, v in reqs)
    assert any(lb["status"] == "bad_request" and lb["pool"] == "" for _, lb, v in reqs)
    toks = {
        (lb["precision"], lb["kind"]): v for _, lb, v in fams["qtrap_tokens"] if lb["backend"] == "sim-int4"
    }
    assert toks[("int4", "completion")] >= 3
    assert "qtrap_time_to_first_token_seconds" in fams and "qtrap_request_duration_seconds" in fams
    assert all(v == 0 for _, _, v in fams["qtrap_inflight_requests"])
    # labels never carry ids or what a client typed as model
    text = requests.get(fleet.proxy_url + "/metrics", timeout=5).text
    assert "c-123" not in text and "no-such-model" not in text and r.headers["x-qtrap-request-id"] not in text


def test_sim_exports_vllm_metric_names(fleet: Fleet) -> None:
    fams = _families(f"http://127.0.0.1:{fleet.bf16_port}/metrics")
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens",
        "vllm:generation_tokens",
        "vllm:time_to_first_token_seconds",
        "vllm:e2e_request_latency_seconds",
        "vllm:request_success",
    ):
        assert name in fams, name
    fams = _families(f"http://127.0.0.1:{fleet.tgi_port}/metrics")
    assert "tgi_queue_size" in fams and "tgi_batch_current_size" in fams


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed"
)
def test_promtool_check_metrics_clean(fleet: Fleet) -> None:
    requests.get(fleet.proxy_url + "/health", timeout=10)  # fills qtrap_backend_up too
    text = requests.get(fleet.proxy_url + "/metrics", timeout=5).text
    r = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr
