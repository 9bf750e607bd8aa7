"""qtrap_sim as a server with the calibrated H100 profile: clients, energy counter, ground truth."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from text_generation import Client

from tests.helpers import free_port, sim


@pytest.fixture(scope="module")
def int4_sim() -> Iterator[str]:
    port = free_port()
    with sim(port, "--model", "qwen3-8b", "--precision", "int4"):
        yield f"http://127.0.0.1:{port}"


def _counter(url: str) -> int:
    for fam in text_string_to_metric_families(requests.get(url + "/dcgm/metrics", timeout=5).text):
        if fam.name == "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION":
            return int(fam.samples[0].value)
    raise AssertionError("no energy counter")


def test_openai_sdk_directly(int4_sim: str) -> None:
    client = openai.OpenAI(base_url=int4_sim + "/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(
        model="qwen3-8b", messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )
    assert r.usage is not None and r.usage.completion_tokens == 5
    chunks = list(
        client.completions.create(
            model="qwen3-8b", prompt="x y", max_tokens=4, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="x", max_tokens=1)


def test_metrics_parse_with_vllm_and_dcgm_fields(int4_sim: str) -> None:
    names = {
        f.name for f in text_string_to_metric_families(requests.get(int4_sim + "/metrics", timeout=5).text)
    }
    assert {
        "vllm:num_requests_running",
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        "DCGM_FI_DEV_POWER_USAGE",
    } <= names


def test_ground_truth_conserves_and_charges_prefill(int4_sim: str) -> None:
    before = requests.get(int4_sim + "/sim/v1/energy", timeout=5).json()
    long_prompt = " ".join(["word"] * 1500)
    jobs = {"short": "five words of prompt here", "long": long_prompt}
    ids: dict[str, str] = {}

    def call(name: str, prompt: str) -> None:
        rid = f"truth-{name}-{time.monotonic_ns()}"
        ids[name] = rid
        r = requests.post(
            int4_sim + "/v1/completions",
            headers={"x-request-id": rid},
            timeout=60,
            json={"model": "qwen3-8b", "prompt": prompt, "max_tokens": 40},
        )
        assert r.status_code == 200

    threads = [threading.Thread(target=call, args=item) for item in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    truth = {n: requests.get(f"{int4_sim}/sim/v1/requests/{rid}", timeout=5).json() for n, rid in ids.items()}
    assert truth["short"]["completion_tokens"] == truth["long"]["completion_tokens"] == 40
    # same output tokens, mostly the same steps: a token-proportional split would charge them alike;
    # the model charges the 1,500-token prefill to the request that brought it
    assert truth["long"]["energy_j"] > 1.3 * truth["short"]["energy_j"]
    after = requests.get(int4_sim + "/sim/v1/energy", timeout=5).json()
    given = after["requests_j"] - before["requests_j"]
    assert given == pytest.approx(truth["short"]["energy_j"] + truth["long"]["energy_j"], rel=1e-9)
    assert after["energy_j"] == pytest.approx(after["requests_j"] + after["idle_j"], rel=1e-12)
    assert requests.get(int4_sim + "/sim/v1/requests/nope", timeout=5).status_code == 404


def test_counter_under_load_is_monotonic_and_tracks_energy(int4_sim: str) -> None:
    stop = time.monotonic() + 1.5

    def load() -> None:
        while time.monotonic() < stop:
            requests.post(
                int4_sim + "/v1/completions",
                timeout=30,
                json={"model": "qwen3-8b", "prompt": "a", "max_tokens": 20},
            )

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    seen = []
    while time.monotonic() < stop:
        seen.append(_counter(int4_sim))
        time.sleep(0.01)
    for t in threads:
        t.join()
    assert all(b >= a for a, b in itertools.pairwise(seen))
    distinct = sorted(set(seen))
    assert 8 <= len(distinct) <= 25  # about one update per 100 ms over 1.5 s
    exact_j = requests.get(int4_sim + "/sim/v1/energy", timeout=5).json()["energy_j"]
    assert _counter(int4_sim) / 1000 == pytest.approx(exact_j, abs=0.15 * 700)  # at most one update behind


def test_tgi_client_directly() -> None:
    port = free_port()
    with sim(port, "--model", "qwen3-0.6b", "--precision", "bf16", "--api", "tgi"):
        client = Client(f"http://127.0.0.1:{port}")
        assert client.generate("hello", max_new_tokens=3).details.generated_tokens == 3
        assert len(list(client.generate_stream("hello", max_new_tokens=4))) == 4


def test_oracle_answers_through_the_api() -> None:
    from pathlib import Path

    data = Path(__file__).resolve().parents[1] / "data" / "gsm8k-test.jsonl.gz"  # tests/data
    import gzip
    import json
    import re

    problem = json.loads(gzip.decompress(data.read_bytes()).decode().splitlines()[3])
    port = free_port()
    with sim(
        port,
        "--model",
        "qwen3-8b",
        "--precision",
        "int4",
        "--oracle-data",
        str(data),
        "--hop-accuracy",
        "1.0",
    ):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="qwen3-8b",
            max_tokens=500,
            temperature=0,
            messages=[{"role": "user", "content": f"Question: {problem['question']}\nAnswer step by step."}],
            extra_headers={"x-request-id": "oracle-1"},
        )
        r = raw.parse()
        text = r.choices[0].message.content or ""
        assert r.choices[0].finish_reason == "stop"  # the answer ended before max_tokens
        m = re.search(r"#### (\-?[0-9\.\,]+)", text)
        assert m and m.group(1) == problem["answer"].rsplit("#### ", 1)[1].strip()
        truth = requests.get(f"http://127.0.0.1:{port}/sim/v1/requests/oracle-1", timeout=5).json()
        assert truth["oracle"]["correct"] is True and truth["oracle"]["dataset"] == "gsm8k"
        assert truth["completion_tokens"] == r.usage.completion_tokens if r.usage else False
        # an unknown prompt gets filler of the requested length
        r2 = client.completions.create(model="qwen3-8b", prompt="tell me a story", max_tokens=7)
        assert (
            r2.usage is not None
            and r2.usage.completion_tokens == 7
            and r2.choices[0].finish_reason == "length"
        )


def test_a_stop_that_is_not_strings_is_a_client_error_not_a_500(int4_sim: str) -> None:
    """The fuzz test's find (through the proxy): `stop: true` made both APIs answer 500."""
    chat = {"model": "qwen3-8b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    port = free_port()
    with sim(port, "--api", "tgi", "--step-ms", "1"):
        for stop in (True, 5, [1], {"a": "b"}):
            for stream in (False, True):
                body = {**chat, "stop": stop, "stream": stream}
                r = requests.post(int4_sim + "/v1/chat/completions", json=body, timeout=10)
                assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text
            for path in ("/generate", "/generate_stream"):
                tgi = {"inputs": "hi", "parameters": {"max_new_tokens": 2, "stop": stop}}
                r = requests.post(f"http://127.0.0.1:{port}{path}", json=tgi, timeout=10)
                assert r.status_code == 422 and r.json()["error_type"] == "validation", r.text
        ok = requests.post(int4_sim + "/v1/chat/completions", json={**chat, "stop": ["x", "y"]}, timeout=10)
        assert ok.status_code == 200
        tgi = {"inputs": "hi", "parameters": {"max_new_tokens": 2, "stop": ["x"]}}
        assert requests.post(f"http://127.0.0.1:{port}/generate", json=tgi, timeout=10).status_code == 200
