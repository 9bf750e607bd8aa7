"""Synthetic arithmetic chains: problems the oracle always recognises, with an exact hop count.

A synthetic problem reads, exactly::

    Start with {a}. {op 1} {op 2} ... What is the result?

where each op is ``Add {n}.``, ``Subtract {n}.`` or ``Multiply by {n}.`` (integers;
``a`` may be negative, ``n >= 1``). Its hops are its ops; its answer is the integer
reached by applying them in order. The oracle finds it anywhere in a prompt (the
last one when there are several, so worked examples may come first).

Each step is written as ``{prev} {+|-|*} {n} = {value}``, computed from the value
the previous step reached, and is right with probability ``p_hop``; a wrong step
has a nearby wrong value, which the later steps carry on from. The ops are
injective (``n >= 1``) and a wrong value is never the step's true value (a slip
does not repair an earlier one), so once a value is wrong it stays wrong: a
solution is right exactly when every step is, with probability ``p_hop ** hops``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import ClassVar

_QUESTION = re.compile(
    r"Start with (-?\d+)\.((?:\s*(?:Add|Subtract|Multiply by)\s+-?\d+\.)+)\s*What is the result\?"
)
_OP = re.compile(r"(Add|Subtract|Multiply by)\s+(-?\d+)\.")
_SYMBOL = {"Add": "+", "Subtract": "-", "Multiply by": "*"}
_INT = re.compile(r"-?\d+")
_DELTAS = (-10, -2, -1, 1, 2, 3, 10)


@dataclass(frozen=True, slots=True)
class Synthetic:
    question: str
    start: int
    ops: tuple[tuple[str, int], ...]  # (symbol: "+" | "-" | "*", operand)

    dataset: ClassVar[str] = "synthetic"

    @property
    def hops(self) -> int:
        return len(self.ops)

    @property
    def answer(self) -> str:
        return str(self.value_after(len(self.ops)))

    def value_after(self, k: int) -> int:
        """The true value after the first ``k`` ops."""
        value = self.start
        for sym, n in self.ops[:k]:
            value = apply(value, sym, n)
        return value

    def op(self, k: int) -> tuple[str, int]:
        """Op ``k`` (1-based), clamped to the problem's ops."""
        return self.ops[min(max(k, 1), len(self.ops)) - 1]


def find_synthetic(prompt: str) -> Synthetic | None:
    """The last synthetic problem in ``prompt``, if any."""
    if "Start with" not in prompt:
        return None
    matches = list(_QUESTION.finditer(prompt))
    if not matches:
        return None
    last = matches[-1]
    ops = tuple((_SYMBOL[m.group(1)], int(m.group(2))) for m in _OP.finditer(last.group(2)))
    return Synthetic(last.group(0), int(last.group(1)), ops)


def apply(value: int, sym: str, n: int) -> int:
    if sym == "+":
        return value + n
    if sym == "-":
        return value - n
    return value * n


def wrong_int(value: int, rng: random.Random) -> int:
    """A nearby integer other than ``value`` (the oracle's wrong-number style, exact for large values)."""
    return value + rng.choice(_DELTAS) * (1 if abs(value) < 100 else max(1, abs(value) // 50))


def step(
    prev: int, sym: str, n: int, right: bool, rng: random.Random, truth: int | None = None
) -> tuple[str, int]:
    """(``"{prev} {sym} {n} = {value}"``, value): ``prev {sym} n`` when ``right``, else a nearby wrong
    value other than ``truth`` (the step's true value: a slip never repairs an earlier one)."""
    value = apply(prev, sym, n)
    if not right:
        exact = value
        value = wrong_int(exact, rng)
        while value == truth:
            value = wrong_int(exact, rng)
    return f"{prev} {sym} {n} = {value}", value


def last_int(text: str) -> int | None:
    """The last integer in ``text`` (the value a written step reached), or None."""
    found = _INT.findall(text)
    return int(found[-1]) if found else None


def solve(prob: Synthetic, hop_accuracy: float, rng: random.Random) -> tuple[str, bool]:
    """The whole solution, ``Step k: ...`` per op then ``#### {value}``, and whether it is right."""
    lines = []
    value = prob.start
    for k, (sym, n) in enumerate(prob.ops, 1):
        line, value = step(value, sym, n, rng.random() < hop_accuracy, rng, prob.value_after(k))
        lines.append(f"Step {k}: {line}")
    lines.append(f"#### {value}")
    return "\n".join(lines), str(value) == prob.answer
