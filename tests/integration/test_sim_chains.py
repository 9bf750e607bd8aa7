"""A synthetic reasoning chain played hop by hop against a real qtrap-sim server (no data files)."""

from __future__ import annotations

import re

import pytest
import requests

from tests.helpers import free_port, sim
from tests.unit.sim.chain_client import play, strict_number

QUESTION = "Start with 12. Add 30. Multiply by 2. Subtract 5. Add 7. What is the result?"
TRUE_STEPS = ["12 + 30 = 42", "42 * 2 = 84", "84 - 5 = 79", "79 + 7 = 86"]


@pytest.mark.parametrize("hop_accuracy", ["1.0", "0.0"])
def test_a_four_hop_synthetic_chain_over_http(hop_accuracy: str) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    ids: list[str] = []

    def ask(prompt: str) -> str:
        rid = f"chain-{hop_accuracy}-{len(ids) + 1}"
        ids.append(rid)
        r = requests.post(
            url + "/v1/chat/completions",
            headers={"x-request-id": rid},
            timeout=60,
            json={
                "model": "qwen3-8b",
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 64,
                "temperature": 0,
                "seed": 5,
            },
        )
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop"  # the step ended before max_tokens
        return str(choice["message"]["content"])

    with sim(port, "--step-ms", "1", "--hop-accuracy", hop_accuracy):
        out, steps = play(ask, QUESTION, "synthetic", 4)
        truth = [requests.get(f"{url}/sim/v1/requests/{rid}", timeout=5).json()["oracle"] for rid in ids]
        # the whole problem in one request gets the whole solution
        whole = ask(f"Solve the problem step by step.\n\nProblem: {QUESTION}")

    assert [t["hop"] for t in truth] == [1, 2, 3, 4]
    assert all(t["dataset"] == "synthetic" and t["hops"] == 4 for t in truth)
    assert [t["correct"] for t in truth[:3]] == [None, None, None]
    # each hop carries on from the value the previous hop reached
    for prev, line in zip(["= 12", *steps[:-1]], steps, strict=True):
        assert line.split(" ")[0] == prev.rsplit(" ", 1)[-1]
    assert re.fullmatch(r"-?\d+ [-+*] \d+ = -?\d+\n#### -?\d+", out)
    if hop_accuracy == "1.0":
        assert steps == TRUE_STEPS and strict_number(out) == "86" and truth[3]["correct"] is True
        assert whole.splitlines() == [f"Step {k}: {s}" for k, s in enumerate(TRUE_STEPS, 1)] + ["#### 86"]
    else:
        assert all(s != t for s, t in zip(steps, TRUE_STEPS, strict=True))
        assert strict_number(out) not in (None, "86") and truth[3]["correct"] is False
        assert strict_number(whole) not in (None, "86")
