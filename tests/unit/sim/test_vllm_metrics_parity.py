"""qtrap_sim's vLLM /metrics against what a real vLLM 0.26.0 exported (docs/results/h200-vllm-2026-12-05).

The simulator exports the families of real vLLM it has the facts for, with vLLM's names, types and labels,
and their histograms add up to the requests served: per-request token counts to the usage the clients got,
per-step token counts to the prompt and generated tokens, the phase times to each other.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from qtrap_sim.backend import _StepHistogram
from tests.helpers import free_port, sim

SERVER_JSON = (
    Path(__file__).resolve().parents[3] / "docs/results/h200-vllm-2026-12-05/qwen3-8b/protocol/server.json"
)
MODEL = "qwen3-8b"
STEP_S = 0.01  # --step-ms 10 --per-seq-us 0: every engine step is modelled as 10 ms, whatever its batch

# From server.json's `metric_families` (real vLLM 0.26.0, qwen3-8b): the ones the simulator exports, with
# their types in vLLM (vllm/v1/metrics/loggers.py).
FAMILIES = {
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:generation_tokens_total": "counter",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:iteration_tokens_total": "histogram",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:num_preemptions_total": "counter",
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:prefix_cache_hits_total": "counter",
    "vllm:prefix_cache_queries_total": "counter",
    "vllm:prompt_tokens_total": "counter",
    "vllm:request_decode_time_seconds": "histogram",
    "vllm:request_generation_tokens": "histogram",
    "vllm:request_inference_time_seconds": "histogram",
    "vllm:request_prefill_time_seconds": "histogram",
    "vllm:request_prompt_tokens": "histogram",
    "vllm:request_queue_time_seconds": "histogram",
    "vllm:request_success_total": "counter",
    "vllm:request_time_per_output_token_seconds": "histogram",
    "vllm:time_to_first_token_seconds": "histogram",
}
LABELS = 'engine="0",model_name="qwen3-8b"'  # server.json's `metrics_labels`

STREAM_OPTIONS = {"include_usage": True, "continuous_usage_stats": True}
PROMPT = "Summarise the history of the transistor in a few short sentences, please."
SYNTHETIC = "Start with 17. Add 5. Multiply by 3. Subtract 4. What is the result?"  # the oracle answers it


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    port = free_port()
    # two slots for four requests: two of them wait (queue time); every step is modelled as 10 ms
    with sim(port, "--model", MODEL, "--step-ms", "10", "--per-seq-us", "0", "--max-num-seqs", "2"):
        yield f"http://127.0.0.1:{port}"


def _stream(url: str, path: str, body: dict[str, Any]) -> dict[str, int]:
    """POST a streaming request; the usage of its final chunk (every content chunk must carry usage too)."""
    with requests.post(url + path, json={**body, "stream": True}, stream=True, timeout=30) as r:
        assert r.status_code == 200
        chunks = [
            json.loads(line[6:])
            for line in r.iter_lines(decode_unicode=True)
            if line.startswith("data: ") and line != "data: [DONE]"
        ]
    assert all("usage" in c for c in chunks)  # continuous_usage_stats
    assert chunks[-1]["choices"] == []
    usage: dict[str, int] = chunks[-1]["usage"]
    return usage


def _plain(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = requests.post(url + path, json=body, timeout=30)
    assert r.status_code == 200
    doc: dict[str, Any] = r.json()
    return doc


@pytest.fixture(scope="module")
def served(url: str) -> dict[str, Any]:
    """Four concurrent requests (two streams, a plain chat, a completion cut by a stop string); then /metrics."""
    chat = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 12}
    jobs = {
        "chat_stream": lambda: _stream(
            url, "/v1/chat/completions", {**chat, "stream_options": STREAM_OPTIONS}
        ),
        "completion_stream": lambda: _stream(
            url,
            "/v1/completions",
            {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "stream_options": STREAM_OPTIONS},
        ),
        "chat": lambda: _plain(url, "/v1/chat/completions", chat)["usage"],
        "stopped": lambda: _plain(
            url,
            "/v1/completions",
            {"model": MODEL, "prompt": SYNTHETIC, "max_tokens": 40, "stop": ["="], "temperature": 0},
        ),
    }
    out: dict[str, Any] = {}

    def run(name: str) -> None:
        out[name] = jobs[name]()

    threads = [threading.Thread(target=run, args=(name,)) for name in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(out) == set(jobs)
    stopped = out.pop("stopped")
    assert stopped["choices"][0]["finish_reason"] == "stop"  # ended by engine.finish, not at max_tokens
    out["stopped"] = stopped["usage"]
    time.sleep(3 * STEP_S)  # a step begun before the stopped request ended has ended too

    def steps() -> int:
        n: int = requests.get(url + "/sim/v1/energy", timeout=5).json()["steps"]
        return n

    before = steps()
    text = requests.get(url + "/metrics", timeout=5).text
    return {"usage": out, "text": text, "steps": (before, steps())}


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text) if f.name.startswith("vllm:")}


def _value(fams: dict[str, Any], family: str, suffix: str = "") -> float:
    """A sample of a family (the base name as the parser gives it), summed over label sets."""
    fam = fams[family]
    return sum(s.value for s in fam.samples if s.name == fam.name + suffix)


def _buckets(fams: dict[str, Any], family: str) -> list[float]:
    """A histogram's count per bucket (not cumulative), in bound order, +Inf last."""
    fam = fams[family]
    rows = sorted((float(s.labels["le"]), s.value) for s in fam.samples if s.name == fam.name + "_bucket")
    cumulative = [v for _, v in rows]
    return [b - a for a, b in zip([0.0, *cumulative], cumulative, strict=False)]


def test_families_names_types_and_labels_match_real_vllm(served: dict[str, Any]) -> None:
    text = served["text"]
    if SERVER_JSON.exists():  # the list above is a copy of the committed measurement
        real = json.loads(SERVER_JSON.read_text())
        assert set(FAMILIES) <= set(real["metric_families"])
        assert real["metrics_labels"] == [LABELS]
    # named as real vLLM's exposition names them (`# TYPE` lines, as bench/gpu/vllm_protocol.py reads them)
    types = dict(re.findall(r"^# TYPE (vllm:\S+) (\S+)$", text, re.M))
    assert types == FAMILIES  # all of them, and no vLLM family that real vLLM lacks
    for line in text.splitlines():
        if line.startswith("vllm:"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("{", 1)[1].split("}", 1)[0]))
            extra = set(labels) - {"engine", "model_name"}
            assert labels["engine"] == "0" and labels["model_name"] == MODEL, line
            assert extra <= ({"le"} if "_bucket{" in line else {"finished_reason"}), line
    assert re.search(rf"^vllm:num_requests_running\{{{re.escape(LABELS)}\}} ", text, re.M)


def test_histograms_add_up_to_the_requests_served(served: dict[str, Any]) -> None:
    usage = list(served["usage"].values())
    n = len(usage)
    prompt = sum(u["prompt_tokens"] for u in usage)
    completion = sum(u["completion_tokens"] for u in usage)
    assert all(u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] for u in usage)
    assert [u["completion_tokens"] for u in usage].count(12) == 3  # the stopped one wrote fewer
    fams = _families(served["text"])

    def count(f: str) -> float:
        return _value(fams, f, "_count")

    def total(f: str) -> float:
        return _value(fams, f, "_sum")

    # counters and gauges: everything finished, nothing preempted
    assert _value(fams, "vllm:prompt_tokens", "_total") == prompt
    assert _value(fams, "vllm:generation_tokens", "_total") == completion
    assert _value(fams, "vllm:request_success", "_total") == n
    assert _value(fams, "vllm:num_preemptions", "_total") == 0
    assert _value(fams, "vllm:num_requests_running") == _value(fams, "vllm:num_requests_waiting") == 0
    # per request: one observation each, the tokens the clients were told of
    for f in (
        "vllm:e2e_request_latency_seconds",
        "vllm:time_to_first_token_seconds",
        "vllm:request_queue_time_seconds",
        "vllm:request_prefill_time_seconds",
        "vllm:request_decode_time_seconds",
        "vllm:request_inference_time_seconds",
        "vllm:request_time_per_output_token_seconds",
        "vllm:request_prompt_tokens",
        "vllm:request_generation_tokens",
    ):
        assert count(f) == n, f
    assert total("vllm:request_prompt_tokens") == prompt
    assert total("vllm:request_generation_tokens") == completion
    # per engine step: prompt tokens of the prefills plus the tokens generated, one observation per step
    assert total("vllm:iteration_tokens_total") == prompt + completion
    assert served["steps"][0] <= count("vllm:iteration_tokens_total") <= served["steps"][1]
    assert count("vllm:iteration_tokens_total") >= 12  # at least one step per token of the longest
    # every token after a request's first is one inter-token latency; together they are the decode times
    assert count("vllm:inter_token_latency_seconds") == completion - n
    itl, decode = total("vllm:inter_token_latency_seconds"), total("vllm:request_decode_time_seconds")
    assert itl == pytest.approx(decode, rel=1e-9)
    # phases: queued + prefill = time to first token; prefill + decode = inference; e2e covers both
    queue, prefill = total("vllm:request_queue_time_seconds"), total("vllm:request_prefill_time_seconds")
    inference = total("vllm:request_inference_time_seconds")
    assert prefill + decode == pytest.approx(inference, rel=1e-9)
    assert queue + prefill == pytest.approx(total("vllm:time_to_first_token_seconds"), rel=1e-9)
    assert total("vllm:e2e_request_latency_seconds") >= queue + inference - 1e-9
    assert queue > 0 and prefill > 0 and itl > 0  # two slots for four requests: two waited
    # time per output token: each request's mean inter-token latency, so within the range of those
    # (the simulated steps are timed against deadlines, not exactly STEP_S apart: no exact values here)
    itl_buckets, tpot_buckets = (
        _buckets(fams, "vllm:inter_token_latency_seconds"),
        _buckets(fams, "vllm:request_time_per_output_token_seconds"),
    )
    lo = next(i for i, k in enumerate(itl_buckets) if k)
    hi = max(i for i, k in enumerate(itl_buckets) if k)
    assert sum(tpot_buckets[lo : hi + 1]) == n, (itl_buckets, tpot_buckets)


def test_step_histogram_matches_prometheus_histogram() -> None:
    """The inter-token histogram takes (value, count) in one call; it exposes what Histogram would."""
    buckets = (0.01, 0.025, 0.05)
    samples = [(0.01, 3), (0.02, 2), (0.3, 1), (0.001, 4)]  # 0.01 sits in le="0.01": bounds are inclusive
    reference = CollectorRegistry()
    h = Histogram("vllm:x", "doc", ("model_name", "engine"), buckets=buckets, registry=reference)
    for v, k in samples:
        for _ in range(k):
            h.labels(MODEL, "0").observe(v)
    mine = CollectorRegistry()
    step = _StepHistogram("vllm:x", "doc", buckets, {"model_name": MODEL, "engine": "0"})
    mine.register(step)
    for v, k in samples:
        step.observe(v, k)

    def lines(reg: CollectorRegistry) -> list[str]:
        return [ln for ln in generate_latest(reg).decode().splitlines() if "vllm:x_created" not in ln]

    assert lines(mine) == lines(reference)
    assert 'vllm:x_bucket{engine="0",le="0.01",model_name="qwen3-8b"} 7.0' in lines(mine)
