"""Synthetic problems and chain hops: what the oracle writes without any data files."""

from __future__ import annotations

import math
import random
import re

import pytest

from qtrap_sim.backend import SimBackend, SimBackendConfig
from qtrap_sim.chains import parse_hop, perturb_step, same_step
from qtrap_sim.oracle import Oracle
from qtrap_sim.synthetic import Synthetic, find_synthetic
from qtrap_sim.textgen import ScriptedText
from tests.unit.sim.chain_client import hop_prompt, play_oracle, strict_number

EXAMPLE = "Start with 17. Add 5. Multiply by 3. Subtract 4. What is the result?"  # 3 hops, 62
STEP = re.compile(r"^(-?\d+) ([-+*]) (\d+) = (-?\d+)$")


def _random_question(rng: random.Random, hops: int) -> str:
    parts = [f"Start with {rng.randint(-20, 60)}."]
    for _ in range(hops):
        op = rng.choice(["Add", "Subtract", "Multiply by"])
        parts.append(f"{op} {rng.randint(2, 5) if op == 'Multiply by' else rng.randint(1, 90)}.")
    return " ".join([*parts, "What is the result?"])


def _value(prev: int, sym: str, n: int) -> int:
    return prev + n if sym == "+" else prev - n if sym == "-" else prev * n


def test_synthetic_problems_are_found_anywhere_and_solved_exactly() -> None:
    prob = find_synthetic(f"Solve it step by step.\n\nProblem: {EXAMPLE}\nAnswer:")
    assert prob == Synthetic(EXAMPLE, 17, (("+", 5), ("*", 3), ("-", 4)))
    assert prob is not None and prob.hops == 3 and prob.answer == "62"
    # the last problem of a prompt is the one asked (worked examples come first)
    two = find_synthetic(f"Example: {EXAMPLE} 62\n\nStart with -3. Subtract 10. What is the result?")
    assert two is not None and (two.start, two.ops, two.answer) == (-3, (("-", 10),), "-13")
    assert find_synthetic("Start with 5. Divide by 2. What is the result?") is None
    assert find_synthetic("Start with 5. What is the result?") is None  # no ops, no problem
    assert Oracle([], 0.9).respond("What is the capital of France?", 1, 0.0) is None


def test_full_solution_format_and_extremes() -> None:
    prob = find_synthetic(EXAMPLE)
    assert prob is not None
    text, ok = Oracle([], 1.0).answer(prob, EXAMPLE, seed=1, temperature=0)
    assert ok and text == "Step 1: 17 + 5 = 22\nStep 2: 22 * 3 = 66\nStep 3: 66 - 4 = 62\n#### 62"
    reply = Oracle([], 0.0).respond(EXAMPLE, 1, 0.0)
    assert reply is not None and reply.outcome == {"dataset": "synthetic", "hops": 3, "correct": False}
    assert strict_number(reply.text) not in (None, "62")


def test_each_step_is_computed_from_the_line_before() -> None:
    oracle = Oracle([], 0.6)
    rng = random.Random(3)
    for i in range(200):
        question = _random_question(rng, rng.randint(1, 6))
        prob = find_synthetic(question)
        assert prob is not None
        reply = oracle.respond(question, i, 0.7)
        assert reply is not None
        *steps, final = reply.text.splitlines()
        assert len(steps) == prob.hops
        prev, all_right = prob.start, True
        for k, (line, (sym, n)) in enumerate(zip(steps, prob.ops, strict=True), 1):
            m = STEP.match(line.removeprefix(f"Step {k}: "))
            assert m and line.startswith(f"Step {k}: ")
            assert (int(m.group(1)), m.group(2), int(m.group(3))) == (prev, sym, n)
            all_right &= int(m.group(4)) == _value(prev, sym, n)
            prev = int(m.group(4))
        assert final == f"#### {prev}"
        # errors compound: the answer is right exactly when every step is
        assert reply.outcome["correct"] is all_right is (str(prev) == prob.answer)


def test_hop_prompts_match_the_protocol_text() -> None:
    # the exact text loadgen sends, spelled out once
    assert hop_prompt(EXAMPLE, "synthetic", 1, 3, []) == (
        f"Problem: {EXAMPLE}\n\nSteps so far: none\n\n"
        "Write step 1 of 3 of the solution as one line, and nothing else."
    )
    assert hop_prompt("Q", "mathqa", 2, 2, ["add(n0,n1)"]) == (
        "Problem: Q\n\nSteps so far:\nStep 1: add(n0,n1)\n\n"
        'Write step 2 of 2, the last one, as one line, then the final answer on its own line as "Answer: <option letter>".'
    )


def test_hop_requests_are_parsed_as_loadgen_writes_them() -> None:
    assert parse_hop(EXAMPLE) is None
    first = parse_hop(hop_prompt(EXAMPLE, "synthetic", 1, 3, []))
    assert first is not None and (first.step, first.of, first.earlier, first.last) == (1, 3, {}, False)
    last = parse_hop(hop_prompt(EXAMPLE, "synthetic", 3, 3, ["17 + 5 = 22", "Step 2: 22 * 3 = 66"]))
    assert last is not None and (last.step, last.of, last.last) == (3, 3, True)
    assert last.earlier == {1: "17 + 5 = 22", 2: "22 * 3 = 66"}  # a doubled ``Step i:`` is dropped too
    # the last instruction counts, lower case too
    again = parse_hop("Write step 1 of 2 of the solution.\nSteps so far:\nStep 1: x\n\nwrite step 2 of 2")
    assert again is not None and (again.step, again.of, again.earlier) == (2, 2, {1: "x"})


def test_a_synthetic_chain_hop_by_hop() -> None:
    out, steps, outcomes = play_oracle(Oracle([], 1.0), EXAMPLE, "synthetic", 3, seed=0)
    assert steps == ["17 + 5 = 22", "22 * 3 = 66", "66 - 4 = 62"]
    assert out == "66 - 4 = 62\n#### 62"
    assert [o["hop"] for o in outcomes] == [1, 2, 3] and {o["hops"] for o in outcomes} == {3}
    assert [o["correct"] for o in outcomes] == [None, None, True]
    assert all(o["dataset"] == "synthetic" and o["step_correct"] for o in outcomes)
    out, steps, outcomes = play_oracle(Oracle([], 0.0), EXAMPLE, "synthetic", 3, seed=0)
    assert outcomes[-1]["correct"] is False and strict_number(out) != "62"
    assert not any(o["step_correct"] for o in outcomes)


def test_a_hop_carries_on_from_the_value_the_prompt_gives() -> None:
    oracle = Oracle([], 1.0)
    # a wrong step 1 (written earlier, by whichever model) propagates through a perfect step 2 and 3
    r2 = oracle.respond(hop_prompt(EXAMPLE, "synthetic", 2, 3, ["17 + 5 = 30"]), 0, 0.0)
    assert r2 is not None and r2.text == "30 * 3 = 90" and r2.outcome["step_correct"] is True
    r3 = oracle.respond(hop_prompt(EXAMPLE, "synthetic", 3, 3, ["17 + 5 = 30", r2.text]), 0, 0.0)
    assert r3 is not None and r3.text == "90 - 4 = 86\n#### 86" and r3.outcome["correct"] is False
    # a step with a negative value
    neg = "Start with 3. Subtract 10. Multiply by 2. What is the result?"
    r = oracle.respond(hop_prompt(neg, "synthetic", 2, 2, ["3 - 10 = -7"]), 0, 0.0)
    assert r is not None and r.text == "-7 * 2 = -14\n#### -14" and r.outcome["correct"] is True


def test_replies_are_deterministic_per_seed_and_prompt() -> None:
    oracle = Oracle([], 0.5)
    prompts = [hop_prompt(EXAMPLE, "synthetic", k, 3, ["17 + 5 = 22"] * (k - 1)) for k in (1, 2, 3)]
    first = [oracle.respond(p, 11, 0.7) for p in prompts]
    assert first == [oracle.respond(p, 11, 0.7) for p in prompts]
    texts = {(r.text if r else None) for s in range(40) for r in [oracle.respond(prompts[0], s, 0.7)]}
    assert len(texts) > 1  # other seeds, other outcomes


def test_chain_accuracy_is_p_to_the_hops_over_400_chains() -> None:
    p_hop, hops, n = 0.9, 3, 400
    oracle = Oracle([], p_hop)
    rng = random.Random(20240611)
    correct = 0
    for i in range(n):
        question = _random_question(rng, hops)
        prob = find_synthetic(question)
        assert prob is not None
        out, _, outcomes = play_oracle(oracle, question, "synthetic", hops, seed=i)
        ok = outcomes[-1]["correct"]
        assert ok is (strict_number(out) == prob.answer)  # what the sim says is what a scorer sees
        # a chain is right exactly when each of its hops was
        assert ok is all(o["step_correct"] for o in outcomes)
        correct += ok
    expected = p_hop**hops  # 0.729
    se = math.sqrt(expected * (1 - expected) / n)  # 0.0222
    assert abs(correct / n - expected) <= 5 * se, (correct, n)


def test_perturbed_steps_change_a_number() -> None:
    rng = random.Random(1)
    for line in ["Janet sells 16 - 3 - 4 = 9 duck eggs a day.", "subtract(n1,n2)", "He paid $80,000 for it"]:
        for _ in range(50):
            wrong = perturb_step(line, rng)
            assert not same_step(wrong, line)
            assert re.sub(r"[\d,.]+", "#", wrong.rstrip(".")) == re.sub(r"[\d,.]+", "#", line.rstrip("."))
            assert "-" not in wrong.replace("16 - 3 - 4", "")  # a non-negative number stays non-negative
    assert not same_step(perturb_step("Add them up.", rng), "Add them up.")
    assert same_step("Step 3:  Janet SELLS 9", "janet sells   9")


def test_backend_answers_synthetic_problems_without_data_files() -> None:
    backend = SimBackend(SimBackendConfig(step_ms=1.0, hop_accuracy=1.0))
    req, text = backend.new_request("r1", hop_prompt(EXAMPLE, "synthetic", 1, 3, []), 40, 100, 0, 0.0)
    assert isinstance(text, ScriptedText) and len(text) == req.max_tokens == 5 and req.stop_at_end
    assert text.next_words(5) == "17 + 5 = 22"
    assert backend.truth_record(req)["oracle"] == {
        "dataset": "synthetic",
        "hops": 3,
        "hop": 1,
        "step_correct": True,
        "correct": None,
    }
    # an answer longer than max_tokens is cut at max_tokens, as before
    req, text = backend.new_request("r2", EXAMPLE, 20, 4, 0, 0.0)
    assert req.max_tokens == 4 and not req.stop_at_end
    assert backend.truth_record(req)["oracle"] == {"dataset": "synthetic", "hops": 3, "correct": True}
    req, _ = backend.new_request("r3", "tell me a story", 4, 7, 0, 0.0)
    assert req.max_tokens == 7 and backend.truth_record(req)["oracle"] is None


@pytest.mark.parametrize("bad", ["Start with 5. Add 3.", "start with 5. add 3. what is the result?"])
def test_near_misses_are_not_synthetic(bad: str) -> None:
    assert find_synthetic(bad) is None
