"""Prefix caching as vLLM does it, and vLLM's ``ignore_eos``, in the simulator."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import requests

from qtrap_sim.engine import SimRequest
from qtrap_sim.prefix_cache import PrefixCache
from tests.helpers import free_port, sim

SYNTHETIC = "Start with 17. Add 5. Multiply by 3. Subtract 4. What is the result?"  # the oracle answers it


def _words(n: int, start: int = 0) -> list[str]:
    return [f"w{i}" for i in range(start, start + n)]


def test_whole_leading_blocks_are_reused() -> None:
    c = PrefixCache(block_tokens=16)
    first = _words(40)
    assert c.admit(first) == 0  # nothing cached yet; its two full blocks are now
    # the same 32 leading tokens, then different ones: two blocks reused, the rest prefilled
    assert c.admit(first[:32] + _words(20, 1000)) == 32
    # a prefix that diverges inside the first block reuses nothing (hashes chain from the start)
    assert c.admit(["x", *first[1:40]]) == 0
    assert c.stats.queries == 40 + 52 + 40 and c.stats.hits == 32


def test_a_fully_cached_prompt_still_computes_one_token() -> None:
    c = PrefixCache(block_tokens=16)
    p = _words(32)
    c.admit(p)
    assert c.admit(p) == 31


def test_least_recently_used_blocks_are_forgotten() -> None:
    c = PrefixCache(capacity_blocks=4, block_tokens=16)
    a, b = _words(64), _words(64, 500)
    c.admit(a)
    assert len(c) == 4
    c.admit(b)  # four new blocks push a's out
    assert len(c) == 4 and c.admit(a) == 0
    with pytest.raises(ValueError):
        PrefixCache(capacity_blocks=0)


def test_cached_tokens_are_not_prefill_rows() -> None:
    r = SimRequest("r", prompt_tokens=100, max_tokens=8, cached_tokens=96)
    assert r.prompt_tokens - r.cached_tokens == 4


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    port = free_port()
    with sim(port, "--model", "qwen3-8b", "--gpu", "h200", "--precision", "int4", "--step-ms", "1"):
        yield f"http://127.0.0.1:{port}"


def _complete(url: str, **body: object) -> dict[str, object]:
    r = requests.post(
        url + "/v1/completions", json={"model": "qwen3-8b", "temperature": 0, **body}, timeout=30
    )
    assert r.status_code == 200, r.text
    doc: dict[str, object] = r.json()
    return doc


def _counter(url: str, name: str) -> float:
    text = requests.get(url + "/metrics", timeout=10).text
    m = re.search(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M)
    assert m, name
    return float(m.group(1))


def test_ignore_eos_runs_an_answer_to_max_tokens(url: str) -> None:
    short = _complete(url, prompt=SYNTHETIC, max_tokens=200)
    usage = short["usage"]
    assert isinstance(usage, dict) and usage["completion_tokens"] < 200  # the oracle's answer ends itself
    assert short["choices"][0]["finish_reason"] == "stop"  # type: ignore[index]
    long = _complete(url, prompt=SYNTHETIC, max_tokens=200, ignore_eos=True)
    assert long["usage"]["completion_tokens"] == 200  # type: ignore[index]
    assert long["choices"][0]["finish_reason"] == "length"  # type: ignore[index]
    # the answer itself comes first, then filler
    assert long["choices"][0]["text"].startswith(short["choices"][0]["text"])  # type: ignore[index]
    bad = requests.post(
        url + "/v1/completions",
        json={"model": "qwen3-8b", "prompt": "hi", "ignore_eos": "yes"},
        timeout=10,
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "ignore_eos"


def test_prefix_cache_metrics_count_a_repeated_prompt(url: str) -> None:
    prompt = " ".join(_words(80, 7000))
    q0, h0 = _counter(url, "vllm:prefix_cache_queries_total"), _counter(url, "vllm:prefix_cache_hits_total")
    _complete(url, prompt=prompt, max_tokens=2)
    _complete(url, prompt=prompt, max_tokens=2)
    q1, h1 = _counter(url, "vllm:prefix_cache_queries_total"), _counter(url, "vllm:prefix_cache_hits_total")
    assert q1 - q0 == 160  # both prompts' tokens looked up
    assert h1 - h0 == 79  # the second found all 80 but the last, which is always computed
