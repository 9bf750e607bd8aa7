"""Oracle answers against the GSM8K and MathQA test sets (tests/data)."""

from __future__ import annotations

import gzip
import math
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from qtrap_sim.oracle import Oracle, OracleDataError, Problem, load_problems, parse_mathqa_options
from tests.unit.sim.chain_client import hop_prompt, play_oracle

DATA = Path(__file__).resolve().parents[2] / "data"  # tests/data (README.md there: sources, licences)
GSM8K = DATA / "gsm8k-test.jsonl.gz"
MATHQA = DATA / "mathqa-test.json.gz"

STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")  # lm-evaluation-harness' GSM8K strict match


def _strict(text: str) -> str | None:
    m = STRICT.search(text)
    return m.group(1).replace(",", "").replace("$", "").rstrip(".") if m else None


def test_hop_counts_match_the_dataset_notes() -> None:
    gsm = load_problems(GSM8K)
    hops = Counter(min(p.hops, 9) for p in gsm)
    assert len(gsm) == 1319
    assert [hops[h] for h in range(2, 10)] == [326, 371, 297, 175, 87, 40, 20, 3]
    mq = load_problems(MATHQA)
    assert len(mq) == 2985
    assert sum(p.hops for p in mq) / len(mq) == pytest.approx(4.36, abs=0.01)
    assert max(p.hops for p in mq) == 23 and min(p.hops for p in mq) == 1


def test_recognises_problems_inside_prompts() -> None:
    gsm = load_problems(GSM8K)
    oracle = Oracle(gsm, 1.0)
    target = gsm[42]
    prompt = (
        f"Solve step by step.\n\nQuestion: {gsm[1].question[:20]}...\n\nQuestion: {target.question}\nAnswer:"
    )
    assert oracle.find(prompt) is target
    assert oracle.find("What is the capital of France?") is None


def test_answer_formats_and_correctness_extremes() -> None:
    gsm = load_problems(GSM8K)
    prob = gsm[0]
    right, ok = Oracle(gsm, 1.0).answer(prob, prob.question, seed=1, temperature=0)
    assert ok and _strict(right) == prob.answer and right.count("\n") == prob.hops
    wrong, ok = Oracle(gsm, 0.0).answer(prob, prob.question, seed=1, temperature=0)
    assert not ok and _strict(wrong) not in (None, prob.answer)
    mq = load_problems(MATHQA)
    text, ok = Oracle(mq, 1.0).answer(mq[0], mq[0].question, seed=None, temperature=0)
    assert ok and text.endswith("Answer: a ) 38")
    text, ok = Oracle(mq, 0.0).answer(mq[0], mq[0].question, seed=None, temperature=0)
    assert not ok and re.search(r"Answer: ([b-e]) \)", text)


def test_temperature_zero_is_deterministic() -> None:
    gsm = load_problems(GSM8K)
    o = Oracle(gsm, 0.5)
    first = [o.answer(p, p.question, None, 0.0) for p in gsm[:50]]
    assert first == [o.answer(p, p.question, None, 0.0) for p in gsm[:50]]


@pytest.mark.parametrize("path", [GSM8K, MATHQA])
def test_accuracy_matches_configured_probability_over_1000_chains(path: Path) -> None:
    problems = load_problems(path)
    p_hop = 0.9
    oracle = Oracle(problems, p_hop)
    rng = random.Random(7)
    sample = [rng.choice(problems) for _ in range(1000)]
    correct = 0
    by_hops: dict[int, list[bool]] = {}
    for i, prob in enumerate(sample):
        text, ok = oracle.answer(prob, prob.question, seed=i, temperature=0.7)
        scored = (
            (_strict(text) == prob.answer)
            if prob.dataset == "gsm8k"
            else text.endswith(f"Answer: {prob.answer} ) {dict(prob.options).get(prob.answer, '')}".rstrip())
        )
        assert scored == ok  # what the sim says it did is what a scorer sees
        correct += ok
        by_hops.setdefault(prob.hops, []).append(ok)
    expected = [p_hop**p.hops for p in sample]
    mean = sum(expected)
    sd = math.sqrt(sum(q * (1 - q) for q in expected))
    assert abs(correct - mean) <= 3.5 * sd, (correct, mean, sd)
    # errors compound per hop: short chains are right more often than long ones
    short = [ok for h, oks in by_hops.items() if h <= 3 for ok in oks]
    long = [ok for h, oks in by_hops.items() if h >= 6 for ok in oks]
    assert sum(short) / len(short) > sum(long) / len(long)


def test_bad_data_files(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(OracleDataError, match="GSM8K line 1 lacks 'answer'"):
        load_problems(tmp_path / "a.jsonl")
    (tmp_path / "b.json").write_text("[1, 2")
    with pytest.raises(OracleDataError, match="not GSM8K JSON lines or a MathQA JSON array"):
        load_problems(tmp_path / "b.json")
    (tmp_path / "c.jsonl").write_text("\n")
    with pytest.raises(OracleDataError, match="no problems"):
        load_problems(tmp_path / "c.jsonl")


def test_gzip_data_files(tmp_path: Path) -> None:
    text = '{"question": "Tom has 2 apples and buys 3 more. How many now?", "answer": "2+3=<<2+3=5>>5\\n#### 5"}\n'
    (tmp_path / "g.jsonl").write_text(text)
    (tmp_path / "g.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "g2.jsonl").write_bytes(gzip.compress(text.encode()))  # gzip's magic bytes, no .gz name
    plain = load_problems(tmp_path / "g.jsonl")
    assert load_problems(tmp_path / "g.jsonl.gz") == load_problems(tmp_path / "g2.jsonl") == plain
    assert plain[0].answer == "5" and plain[0].hops == 1
    good = gzip.compress(text.encode())
    for name, data in {"plain.jsonl.gz": text.encode(), "cut.jsonl.gz": good[: len(good) // 2]}.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(OracleDataError, match=r"cannot read oracle data .* not a valid gzip file") as e:
            load_problems(tmp_path / name)
        assert "\n" not in str(e.value)


def test_mathqa_options_parse() -> None:
    assert parse_mathqa_options("a ) 38 , b ) 27.675 , c ) 30 , d ) data inadequate , e ) none of these") == (
        ("a", "38"),
        ("b", "27.675"),
        ("c", "30"),
        ("d", "data inadequate"),
        ("e", "none of these"),
    )


# -- chain hops ----------------------------------------------------------------------------------------


def _reference(prob: Problem, k: int) -> str:
    return re.sub(r"^Step \d+: ", "", prob.steps[min(k, prob.hops) - 1])


@pytest.mark.parametrize("path", [GSM8K, MATHQA])
def test_hops_write_the_reference_steps_then_the_answer(path: Path) -> None:
    problems = load_problems(path)
    prob = next(p for p in problems if p.hops == 4)
    out, steps, outcomes = play_oracle(Oracle(problems, 1.0), prob.question, prob.dataset, 4, seed=3)
    # one line per hop, without a ``Step k:`` prefix: the reference steps
    assert steps == [_reference(prob, k) for k in range(1, 5)]
    assert all(not s.startswith("Step") for s in steps)
    assert [o["hop"] for o in outcomes] == [1, 2, 3, 4] and {o["hops"] for o in outcomes} == {4}
    assert [o["correct"] for o in outcomes] == [None, None, None, True]
    assert {o["dataset"] for o in outcomes} == {prob.dataset}
    if prob.dataset == "gsm8k":
        assert out == f"{steps[-1]}\n#### {prob.answer}" and _strict(out) == prob.answer
    else:
        assert out == f"{steps[-1]}\nAnswer: {prob.answer} ) {dict(prob.options)[prob.answer]}"
    out, steps, outcomes = play_oracle(Oracle(problems, 0.0), prob.question, prob.dataset, 4, seed=3)
    assert all(s != _reference(prob, k) for k, s in enumerate(steps, 1))  # every step has a number changed
    assert outcomes[-1]["correct"] is False
    if prob.dataset == "gsm8k":
        assert _strict(out) not in (None, prob.answer)
    else:
        assert re.search(r"\nAnswer: ([a-e]) \)", out) and f"Answer: {prob.answer} )" not in out


def test_a_wrong_earlier_step_makes_the_chain_wrong() -> None:
    gsm = load_problems(GSM8K)
    prob = next(p for p in gsm if p.hops == 3)
    oracle = Oracle(gsm, 1.0)
    good = [_reference(prob, 1), _reference(prob, 2)]
    # case and spacing do not matter, a ``Step i:`` the client left in does not either
    echoed = [f"Step 1: {good[0].upper()}", good[1].replace(" ", "  ")]
    r = oracle.respond(hop_prompt(prob.question, "gsm8k", 3, 3, echoed), 0, 0.0)
    assert r is not None and r.outcome["correct"] is True and _strict(r.text) == prob.answer
    bad = [good[0], good[1] + " and 1 more"]
    r = oracle.respond(hop_prompt(prob.question, "gsm8k", 3, 3, bad), 0, 0.0)
    assert r is not None and r.outcome["correct"] is False and r.outcome["step_correct"] is True
    assert r.text.startswith(_reference(prob, 3) + "\n#### ") and _strict(r.text) != prob.answer
    # hops past the problem's own steps repeat its last step
    r = oracle.respond(hop_prompt(prob.question, "gsm8k", 5, 6, good), 0, 0.0)
    assert r is not None and r.text == _reference(prob, 3) and r.outcome["hops"] == 6


@pytest.mark.parametrize("path", [GSM8K, MATHQA])
def test_chain_accuracy_matches_p_to_the_hops_over_400_chains(path: Path) -> None:
    problems = load_problems(path)
    p_hop = 0.9
    oracle = Oracle(problems, p_hop)
    rng = random.Random(11)
    # the problem the oracle recognises (MathQA repeats some questions' opening words)
    sample = [p for p in (oracle.find(rng.choice(problems).question) for _ in range(400)) if p is not None]
    assert len(sample) == 400
    correct = 0
    for i, prob in enumerate(sample):
        out, _, outcomes = play_oracle(oracle, prob.question, prob.dataset, prob.hops, seed=i)
        ok = outcomes[-1]["correct"]
        scored = (
            _strict(out) == prob.answer
            if prob.dataset == "gsm8k"
            else re.search(rf"\nAnswer: {prob.answer} \)", out) is not None
        )
        assert scored is ok  # what the sim says it did is what a scorer sees
        assert ok is all(o["step_correct"] for o in outcomes)
        correct += ok
    expected = [p_hop**p.hops for p in sample]
    sd = math.sqrt(sum(q * (1 - q) for q in expected))
    assert abs(correct - sum(expected)) <= 5 * sd, (correct, sum(expected), sd)
