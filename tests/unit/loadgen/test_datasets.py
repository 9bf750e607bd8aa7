"""Dataset loaders and hop counting (the GSM8K / MathQA test sets in tests/data, synthetic chains)."""

from __future__ import annotations

import gzip
import json
import re
import statistics
from collections import Counter
from pathlib import Path

import pytest

from loadgen import datasets
from loadgen.datasets import DatasetError

DATA = Path(__file__).resolve().parents[2] / "data"  # tests/data (README.md there: sources, licences)
GSM8K = DATA / "gsm8k-test.jsonl.gz"
MATHQA = DATA / "mathqa-test.json.gz"


def test_gsm8k_hops_match_the_published_distribution() -> None:
    probs = datasets.load("gsm8k", GSM8K)
    assert len(probs) == 1319
    counts = Counter(p.hops for p in probs)
    # non-empty lines before #### (tests/data/README.md)
    assert [counts[h] for h in range(2, 9)] == [326, 371, 297, 175, 87, 40, 20]
    assert sum(v for h, v in counts.items() if h >= 9) == 3
    first = probs[0]
    assert first.question.startswith("Janet") and first.answer == "18" and first.dataset == "gsm8k"


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


def test_gzip_files_load_like_plain_ones(tmp_path: Path) -> None:
    rows = [{"question": f"Q{i}?", "answer": f"step one\nstep two\n#### {i}"} for i in range(3)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    plain = tmp_path / "g.jsonl"
    plain.write_text(text)
    named = tmp_path / "g.jsonl.gz"
    named.write_bytes(gzip.compress(text.encode()))
    unnamed = tmp_path / "g-compressed.jsonl"  # gzip's magic bytes without the .gz name
    unnamed.write_bytes(gzip.compress(text.encode()))
    expected = datasets.load("gsm8k", plain)
    assert datasets.load("gsm8k", named) == datasets.load("gsm8k", unnamed) == expected
    assert [p.answer for p in expected] == ["0", "1", "2"] and {p.hops for p in expected} == {2}
    mq = tmp_path / "m.json.gz"
    mq.write_bytes(
        gzip.compress(
            json.dumps(
                [
                    {
                        "Problem": "p",
                        "options": "a ) 1 , b ) 2",
                        "correct": "b",
                        "linear_formula": "add(n0,n1)|",
                    }
                ]
            ).encode()
        )
    )
    assert datasets.load("mathqa", mq)[0].answer == "b"


def test_corrupt_gzip_files_give_one_line_errors(tmp_path: Path) -> None:
    good = gzip.compress(b'{"question": "q", "answer": "a\n#### 1"}\n')
    cases = {
        "plain.jsonl.gz": b'{"question": "q", "answer": "a\n#### 1"}\n',  # named .gz but not compressed
        "cut.jsonl.gz": good[: len(good) // 2],  # cut off mid-stream
        "cut-unnamed.jsonl": good[: len(good) // 2],  # gzip magic, no .gz name
        "garbled.jsonl.gz": good[:10] + b"\xff" * 20 + good[30:],  # a damaged deflate stream
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DatasetError, match=r"cannot read data file .* not a valid gzip file") as e:
            datasets.load("gsm8k", tmp_path / name)
        assert "\n" not in str(e.value), name
    (tmp_path / "latin1.jsonl.gz").write_bytes(gzip.compress("caf\xe9".encode("latin-1")))
    with pytest.raises(DatasetError, match="is not UTF-8 text"):
        datasets.load("gsm8k", tmp_path / "latin1.jsonl.gz")
    (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(b'{"question": "q"\n'))
    with pytest.raises(DatasetError, match="not JSON lines"):
        datasets.load("gsm8k", tmp_path / "bad.jsonl.gz")


def test_hub_failure_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # Offline, so that the hub client fails at once instead of retrying an unreachable hub for
    # about 20 s. `datasets` and `huggingface_hub` read HF_HUB_OFFLINE once, when imported (here
    # or by an earlier test), so the flags they read are set as well as the variables.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    hub_datasets = pytest.importorskip("datasets")
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hub_datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DatasetError) as e:
        datasets.load("gsm8k")
    assert "openai/gsm8k" in str(e.value) and "--data-file" in str(e.value) and "\n" not in str(e.value)


def test_source_rows_round_trip_for_the_simulator(tmp_path: Path) -> None:
    from qtrap_sim.oracle import load_problems

    for name, path in (("gsm8k", GSM8K), ("mathqa", MATHQA)):
        probs = datasets.load(name, path)[:20]
        out = datasets.write_source(probs, tmp_path / f"{name}.data")
        sim = load_problems(out)
        assert [p.hops for p in sim] == [p.hops for p in probs]
