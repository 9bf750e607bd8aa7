"""Scoring answers as lm-evaluation-harness does.

GSM8K (and the synthetic chains, which answer in the same format):
* strict match: the first ``#### N`` (regex ``#### (\\-?[0-9\\.\\,]+)``), then ``,``, ``$``
  and a trailing ``.`` stripped;
* flexible extract: the last number in the output (``(-?[$0-9.,]{2,})|(-?[0-9]+)``).
Numbers compare by value (``18``, ``18.0`` and ``18.00`` are the same answer).

MathQA (generation, not log-likelihood): the option letter after ``Answer:`` (strict),
or else a lone option letter ``c )`` / ``(c)`` or an option's value in the output (flexible).

A reasoning model's ``<think>...</think>`` block is removed before scoring.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from loadgen.chains import strip_thinking
from loadgen.datasets import Problem

_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEX = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_LETTER_STRICT = re.compile(r"answer\s*(?:is)?\s*[:=]?\s*\(?\s*([a-e])\s*\)?(?![a-z])", re.IGNORECASE)
_LETTER_LOOSE = re.compile(r"(?<![a-z])\(?([a-e])\s*\)(?![a-z])", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Score:
    strict: bool
    flexible: bool
    extracted: str | None  # what the strict (else flexible) rule extracted


def _clean(num: str) -> str:
    return num.replace(",", "").replace("$", "").rstrip(".")


def same_number(a: str, b: str) -> bool:
    try:
        return abs(float(_clean(a)) - float(_clean(b))) < 1e-6
    except ValueError:
        return _clean(a).strip() == _clean(b).strip()


def gsm8k_strict(text: str) -> str | None:
    m = _STRICT.search(text)
    return _clean(m.group(1)) if m else None


def gsm8k_flexible(text: str) -> str | None:
    found = [a or b for a, b in _FLEX.findall(text)]
    found = [f for f in found if any(c.isdigit() for c in f)]
    return _clean(found[-1]) if found else None


def mathqa_strict(text: str) -> str | None:
    found = _LETTER_STRICT.findall(text)
    return found[-1].lower() if found else None


def mathqa_flexible(text: str, options: tuple[tuple[str, str], ...]) -> str | None:
    letter = mathqa_strict(text)
    if letter is not None:
        return letter
    found = _LETTER_LOOSE.findall(text)
    if found:
        return str(found[-1]).lower()
    tail = text.strip().splitlines()[-1] if text.strip() else ""
    num = gsm8k_flexible(tail)
    for k, v in options:
        numeric = gsm8k_flexible(v) == _clean(v)
        if v and (
            (numeric and num is not None and same_number(num, v))
            or (not numeric and v.lower() in tail.lower())
        ):
            return k
    return None


def score(problem: Problem, output: str) -> Score:
    """Score the answer part of ``output`` (a ``<think>`` block is not the answer)."""
    output = strip_thinking(output)
    if problem.dataset == "mathqa":
        s, f = mathqa_strict(output), mathqa_flexible(output, problem.options)
        return Score(s == problem.answer, f == problem.answer, s or f)
    s, f = gsm8k_strict(output), gsm8k_flexible(output)
    return Score(
        s is not None and same_number(s, problem.answer),
        f is not None and same_number(f, problem.answer),
        s or f,
    )
