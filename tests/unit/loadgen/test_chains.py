"""The prompts a chain sends and what a hop carries forward."""

from __future__ import annotations

import pytest

from loadgen.chains import carried_step, hop_prompt, stream_prompt
from loadgen.datasets import Problem

P = Problem("s", "synthetic", "Start with 5. Add 2. Multiply by 3. What is the result?", "21", 2)


def test_hop_prompts() -> None:
    first = hop_prompt(P, 1, [])
    assert first.startswith("Problem: Start with 5.") and "Steps so far: none" in first
    assert first.endswith("Write step 1 of 2 of the solution as one line, and nothing else.")
    last = hop_prompt(P, 2, ["5 + 2 = 7"])
    assert "Steps so far:\nStep 1: 5 + 2 = 7\n" in last
    assert last.endswith('as one line, then the final answer on its own line as "#### <number>".')
    mqa = Problem("m", "mathqa", "q\nOptions: a ) 1", "a", 1, (("a", "1"),))
    assert hop_prompt(mqa, 1, []).endswith('"Answer: <option letter>".')
    assert "one step per line" in stream_prompt(P)
    with pytest.raises(ValueError):
        hop_prompt(P, 3, ["a", "b"])
    with pytest.raises(ValueError):
        hop_prompt(P, 2, [])


def test_carried_step() -> None:
    assert carried_step("\n  Step 2: 7 * 3 = 21\n#### 21") == "7 * 3 = 21"
    assert carried_step("**Step 1:** 5 + 2 = 7") == "5 + 2 = 7"
    assert carried_step("<think>let me see\nhmm</think>\n5 + 2 = 7\nmore") == "5 + 2 = 7"
    assert carried_step("") == ""
