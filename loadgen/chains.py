"""The prompts a chain sends.

``--hops requests`` (default): a problem of H hops is a chain of H dependent requests.
Hop k sees the problem and the steps written at hops 1..k-1 and asks for step k
alone; hop H asks for the last step and the final answer::

    Problem: {question}

    Steps so far:
    Step 1: {what the model wrote at hop 1}
    Step 2: ...

    Write step {k} of {H} of the solution as one line, and nothing else.

(``Steps so far: none`` at hop 1; the last hop ends with ``Write step {H} of {H},
the last one, as one line, then the final answer on its own line as "#### <number>".``,
or ``"Answer: <option letter>"`` for MathQA.) What a hop wrote is carried forward as
its first non-empty line without a leading ``Step k:``, so a wrong step propagates as
it would in a real multi-hop agent.

``--hops stream``: one chain-of-thought request per problem, sent with
``x-qtrap-hop-split: lines`` so the proxy gives each line (step) its energy.
"""

from __future__ import annotations

import re

from loadgen.datasets import Problem

_THINK = re.compile(r"<think>.*?(?:</think>|\Z)", re.DOTALL)
_STEP_PREFIX = re.compile(r"^\s*(?:\*\*)?step\s*\d+\s*[:.)-]\s*(?:\*\*)?\s*", re.IGNORECASE)


def final_format(problem: Problem) -> str:
    return '"Answer: <option letter>"' if problem.dataset == "mathqa" else '"#### <number>"'


def hop_prompt(problem: Problem, hop: int, steps: list[str]) -> str:
    """The user message of hop ``hop`` (1-based) given the steps written so far."""
    h = problem.hops
    if not 1 <= hop <= h or len(steps) != hop - 1:
        raise ValueError(f"hop {hop} of {h} with {len(steps)} earlier steps")
    done = "\n".join(f"Step {i}: {s}" for i, s in enumerate(steps, 1))
    so_far = f"Steps so far:\n{done}" if steps else "Steps so far: none"
    if hop < h:
        ask = f"Write step {hop} of {h} of the solution as one line, and nothing else."
    else:
        ask = (
            f"Write step {h} of {h}, the last one, as one line, then the final answer on its own line "
            f"as {final_format(problem)}."
        )
    return f"Problem: {problem.question}\n\n{so_far}\n\n{ask}"


def stream_prompt(problem: Problem) -> str:
    """One request that reasons through the whole problem, one step per line."""
    return (
        "Solve the problem step by step, one step per line, then give the final answer on its own line "
        f"as {final_format(problem)}.\n\nProblem: {problem.question}"
    )


def strip_thinking(output: str) -> str:
    """The answer without a reasoning model's ``<think>...</think>`` block(s) (an unclosed one runs to the end)."""
    return _THINK.sub("", output) if "<think>" in output else output


def carried_step(output: str) -> str:
    """What a hop's output contributes to later prompts: its first non-empty line after any ``<think>`` block,
    without ``Step k:``."""
    for line in strip_thinking(output).splitlines():
        if line.strip():
            return _STEP_PREFIX.sub("", line).strip() or line.strip()
    return ""
