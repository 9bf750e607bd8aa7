"""Dataset loaders and hop counting (GSM8K / MathQA from ../shared/data, synthetic chains)."""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter
from pathlib import Path

import pytest

from loadgen import datasets
from loadgen.datasets import DatasetError

DATA = Path(__file__).resolve().parents[4] / "shared" / "data"
GSM8K = DATA / "gsm8k" / "test.jsonl"
MATHQA = DATA / "mathqa" / "test.json"
needs_data = pytest.mark.skipif(not GSM8K.exists(), reason="development data (../shared/data) not present")


@needs_data
def test_gsm8k_hops_match_the_published_distribution() -> None:
    probs = datasets.load("gsm8k", GSM8K)
    assert len(probs) == 1319
    counts = Counter(p.hops for p in probs)
    # ../shared/data/README.md: non-empty lines before ####
    assert [counts[h] for h in range(2, 9)] == [326, 371, 297, 175, 87, 40, 20]
    assert sum(v for h, v in counts.items() if h >= 9) == 3
    first = probs[0]
    assert first.question.startswith("Janet") and first.answer == "18" and first.dataset == "gsm8k"


@needs_data
def test_mathqa_hops_count_linear_formula_operations() -> None:
    probs = datasets.load("mathqa", MATHQA)
    assert len(probs) == 2985
    hops = [p.hops for p in probs]
    assert round(statistics.mean(hops), 2) == 4.36 and statistics.median(hops) == 4
    assert (min(hops), max(hops)) == (1, 23)
    p = probs[0]
    assert p.answer in dict(p.options) and "Options: a )" in p.question and len(p.options) == 5


def test_synthetic_chains_have_exact_hops_and_answers() -> None:
    probs = datasets.synthetic(300, seed=7, min_hops=2, max_hops=6)
    assert {p.hops for p in probs} == {2, 3, 4, 5, 6}
    for p in probs:
        m = re.fullmatch(r"Start with (-?\d+)\. (.*) What is the result\?", p.question)
        assert m is not None, p.question
        value = int(m.group(1))
        ops = re.findall(r"(Add|Subtract|Multiply by) (\d+)\.", m.group(2))
        assert len(ops) == p.hops
        for op, n in ops:
            value = value + int(n) if op == "Add" else value - int(n) if op == "Subtract" else value * int(n)
        assert str(value) == p.answer
    assert datasets.synthetic(5, seed=7) == datasets.synthetic(5, seed=7)
    assert datasets.synthetic(5, seed=7) != datasets.synthetic(5, seed=8)


def test_bad_files_give_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="cannot read data file"):
        datasets.load("gsm8k", tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"\n')
    with pytest.raises(DatasetError, match="not JSON lines"):
        datasets.load("gsm8k", bad)
    bad.write_text(json.dumps({"question": "q", "answer": "no final line"}) + "\n")
    with pytest.raises(DatasetError, match=r"gsm8k item 1 .*####"):
        datasets.load("gsm8k", bad)
    bad.write_text(
        json.dumps(
            [{"Problem": "p", "options": "a ) 1 , b ) 2", "correct": "c", "linear_formula": "add(n0,n1)|"}]
        )
    )
    with pytest.raises(DatasetError, match="do not include the correct letter"):
        datasets.load("mathqa", bad)
    bad.write_text(json.dumps([{"Problem": "p"}]))
    with pytest.raises(DatasetError, match="lacks"):
        datasets.load("mathqa", bad)
    with pytest.raises(DatasetError, match="unknown dataset"):
        datasets.load("squad", bad)
    for e in (DatasetError("x"),):
        assert "\n" not in str(e)


def test_hub_failure_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DatasetError) as e:
        datasets.load("gsm8k")
    assert "openai/gsm8k" in str(e.value) and "--data-file" in str(e.value) and "\n" not in str(e.value)


@needs_data
def test_source_rows_round_trip_for_the_simulator(tmp_path: Path) -> None:
    from qtrap_sim.oracle import load_problems

    for name, path in (("gsm8k", GSM8K), ("mathqa", MATHQA)):
        probs = datasets.load(name, path)[:20]
        out = datasets.write_source(probs, tmp_path / f"{name}.data")
        sim = load_problems(out)
        assert [p.hops for p in sim] == [p.hops for p in probs]
