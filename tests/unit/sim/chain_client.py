"""The client side of the chain-hop protocol, as loadgen speaks it, for tests of the simulator."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from qtrap_sim.oracle import Oracle

_PREFIX = re.compile(r"^\s*Step \d+:\s*")
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")  # lm-evaluation-harness' GSM8K strict match


def hop_prompt(question: str, dataset: str, hop: int, hops: int, steps: list[str]) -> str:
    """The user message of hop ``hop`` of ``hops``, given what the earlier hops wrote."""
    done = "\n".join(f"Step {i}: {s}" for i, s in enumerate(steps, 1))
    so_far = f"Steps so far:\n{done}" if steps else "Steps so far: none"
    if hop < hops:
        ask = f"Write step {hop} of {hops} of the solution as one line, and nothing else."
    else:
        final = '"Answer: <option letter>"' if dataset == "mathqa" else '"#### <number>"'
        ask = f"Write step {hops} of {hops}, the last one, as one line, then the final answer on its own line as {final}."
    return f"Problem: {question}\n\n{so_far}\n\n{ask}"


def carried(output: str) -> str:
    """What a hop's output contributes to later prompts: its first line, without a leading ``Step k:``."""
    return _PREFIX.sub("", output.splitlines()[0]).strip()


def play(ask: Callable[[str], str], question: str, dataset: str, hops: int) -> tuple[str, list[str]]:
    """Play a chain through ``ask`` (prompt -> model output): (the last hop's output, the carried steps)."""
    steps: list[str] = []
    out = ""
    for k in range(1, hops + 1):
        out = ask(hop_prompt(question, dataset, k, hops, steps))
        steps.append(carried(out))
    return out, steps


def play_oracle(
    oracle: Oracle, question: str, dataset: str, hops: int, seed: int
) -> tuple[str, list[str], list[dict[str, Any]]]:
    """A chain through ``Oracle.respond``: (last output, carried steps, each hop's outcome)."""
    outcomes: list[dict[str, Any]] = []

    def ask(prompt: str) -> str:
        reply = oracle.respond(prompt, seed, 0.7)
        assert reply is not None, prompt
        outcomes.append(reply.outcome)
        return reply.text

    out, steps = play(ask, question, dataset, hops)
    return out, steps, outcomes


def strict_number(text: str) -> str | None:
    m = STRICT.search(text)
    return m.group(1).replace(",", "").replace("$", "").rstrip(".") if m else None
