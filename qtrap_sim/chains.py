"""Chain hops: reading a hop request's prompt, and writing a wrong reasoning step.

A hop request asks for one step of a solution, given the steps written so far
(the protocol is described in ``qtrap_sim.oracle``). This module parses such a
prompt into the step asked for (``k`` of ``H``) and the earlier steps by number,
and perturbs a reference step into a wrong one (a number changed).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

HOP_INSTRUCTION = re.compile(r"[Ww]rite step (\d+) of (\d+)")
_SO_FAR = "Steps so far:"
_STEP_LINE = re.compile(r"^[ \t]*Step (\d+):[ \t]*(.*?)[ \t]*$", re.MULTILINE)
_STEP_PREFIX = re.compile(r"^\s*Step \d+:\s*")
# a number as written in a step: 80,000 / 2.50 / 16 (a minus sign stays outside, so the sign is kept)
_NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?")
_DELTAS = (-10, -2, -1, 1, 2, 3, 10)


@dataclass(frozen=True, slots=True)
class HopRequest:
    step: int  # k, 1-based
    of: int  # H, the hops of the chain
    earlier: dict[int, str] = field(default_factory=dict)  # step number -> what was written there

    @property
    def last(self) -> bool:
        return self.step >= self.of


def parse_hop(prompt: str) -> HopRequest | None:
    """The hop asked for by the last ``Write step k of H`` in ``prompt``, with the earlier steps, or None."""
    found = list(HOP_INSTRUCTION.finditer(prompt))
    if not found:
        return None
    ask = found[-1]
    head = prompt[: ask.start()]
    so_far = head.rfind(_SO_FAR)
    section = head[so_far + len(_SO_FAR) :] if so_far >= 0 else head
    earlier: dict[int, str] = {}
    for m in _STEP_LINE.finditer(section):
        earlier.setdefault(int(m.group(1)), strip_step(m.group(2)))
    return HopRequest(max(1, int(ask.group(1))), max(1, int(ask.group(2))), earlier)


def strip_step(text: str) -> str:
    """``text`` without a leading ``Step i:``."""
    return _STEP_PREFIX.sub("", text, count=1).strip()


def same_step(a: str, b: str) -> bool:
    """Whether two written steps are the same, ignoring a ``Step i:`` prefix, case and spacing."""
    return strip_step(a).lower().split() == strip_step(b).lower().split()


def _nearby(number: str, rng: random.Random) -> str:
    value = float(number.replace(",", ""))
    delta = rng.choice(_DELTAS) * (1 if value < 100 else max(1, int(value) // 50))
    if value + delta < 0:  # keep a non-negative number non-negative
        delta = -delta
    wrong = value + delta
    return str(int(wrong)) if wrong == int(wrong) else f"{wrong:.2f}"


def perturb_step(line: str, rng: random.Random) -> str:
    """``line`` with its last number changed to a nearby wrong one (a line without numbers gets one)."""
    numbers = list(_NUMBER.finditer(line))
    if not numbers:
        return f"{line.rstrip('.')}, plus {rng.randint(1, 9)}."
    m = numbers[-1]
    return line[: m.start()] + _nearby(m.group(0), rng) + line[m.end() :]
