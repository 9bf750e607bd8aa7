"""Scoring as lm-evaluation-harness does (GSM8K strict/flexible, MathQA letters and values)."""

from __future__ import annotations

from loadgen.datasets import Problem
from loadgen.scoring import gsm8k_flexible, gsm8k_strict, score

GSM = Problem("g", "gsm8k", "q", "1234", 3)
MQA = Problem(
    "m",
    "mathqa",
    "q",
    "c",
    2,
    (("a", "38"), ("b", "27.675"), ("c", "30"), ("d", "data inadequate"), ("e", "none")),
)


def test_gsm8k_strict_and_flexible() -> None:
    assert gsm8k_strict("so\n#### 1,234.") == "1234"
    assert gsm8k_strict("#### $-5") is None  # the strict regex takes no $ (as lm-eval's)
    assert gsm8k_strict("#### -5") == "-5"
    assert gsm8k_flexible("It costs $1,234 in total.") == "1234"
    assert gsm8k_flexible("3 apples and 7 pears") == "7"
    assert gsm8k_flexible("no numbers") is None
    s = score(GSM, "3 + 4 = 7\n#### 1234")
    assert s.strict and s.flexible
    s = score(GSM, "The answer is 1234.0")
    assert not s.strict and s.flexible
    s = score(GSM, "#### 1234\nbut then 99")
    assert s.strict and not s.flexible
    assert not score(GSM, "#### 1235").strict


def test_thinking_is_not_the_answer() -> None:
    assert not score(GSM, "<think>maybe #### 1234</think>\n#### 99").strict
    assert score(GSM, "<think>1 2 3 4</think>\n#### 1234").flexible
    assert not score(GSM, "<think>#### 1234 never closed").strict


def test_mathqa_letter_or_value() -> None:
    assert score(MQA, "Answer: c ) 30").strict
    assert score(MQA, "the answer is (c)").strict
    s = score(MQA, "so we pick c )")
    assert not s.strict and s.flexible
    s = score(MQA, "x = 30")
    assert not s.strict and s.flexible
    assert not score(MQA, "Answer: a ) 38").flexible
    assert score(MQA, "nothing useful").extracted is None
