"""Oracle answers: the simulator "solves" GSM8K, MathQA and synthetic problems it recognises.

When a prompt contains a problem from the ``--oracle-data`` files, or a synthetic
arithmetic chain (always recognised, no data needed; format in
``qtrap_sim.synthetic``), the sim writes an answer in the dataset's format that is
correct with probability

    p_hop(model, precision) ** hops

so errors compound with the number of reasoning hops, and lower precisions can
be made less accurate per hop. Hops are counted as loadgen counts them: GSM8K,
the non-empty solution lines before ``####``; MathQA, the operations in
``linear_formula``; synthetic, the operations. Wrong answers look like answers (a
nearby wrong number, or another option letter), so scoring has to do real work.

Single request (no hop instruction in the prompt): the whole solution, one step
per line, then the final answer: GSM8K, the reference solution lines and
``#### N``; MathQA, ``Step k: {operation}`` lines and ``Answer: {letter} ) {value}``;
synthetic, ``Step k: {prev} {+|-|*} {n} = {value}`` lines (each computed from the
line before, each right with probability p_hop) and ``#### N``.

Chain hops: a prompt whose last ``Write step {k} of {H}`` (or ``write ...``) asks for
step k of H, in the form loadgen sends::

    Problem: {question}

    Steps so far:
    Step 1: {what hop 1 wrote}
    ...

    Write step {k} of {H} of the solution as one line, and nothing else.

(``Steps so far: none`` at k = 1; the last hop asks for step H "the last one ...
then the final answer on its own line as "#### <number>"" or "Answer: <option
letter>"".) The reply is ONE line for step k, WITHOUT a ``Step k:`` prefix (the
client writes ``Step k: `` before it in later prompts; a leading ``Step i:`` in
what it echoes is ignored all the same):

* GSM8K / MathQA: the reference step k (k clamped to the problem's own steps;
  MathQA's is the operation, e.g. ``subtract(n1,n2)``), with its last number
  changed with probability 1 - p_hop;
* synthetic: ``{prev} {+|-|*} {n} = {value}`` for op k, where ``prev`` is the last
  integer of the prompt's ``Step k-1:`` line (the start value at k = 1), the value
  right with probability p_hop.

At the last hop (k >= H) a second line gives the final answer: ``#### N``
(GSM8K, synthetic) or ``Answer: {letter} ) {value}`` (MathQA). A synthetic chain
is right when N is the true result (a wrong earlier step propagates through the
values); a GSM8K / MathQA chain is right when every earlier step in the prompt
matches the reference step (ignoring case and spacing) and the last hop is right,
so a chain of H hops is right with probability p_hop ** H either way. The outcome
(``/sim/v1/requests/{id}``, ``oracle``) of a hop request has ``dataset``,
``hops`` (H), ``hop`` (k), ``step_correct`` (this hop's step) and ``correct``
(the chain's final answer; None before the last hop).

Answers are deterministic for a given seed and prompt (or temperature 0).

Default per-hop accuracies (``DEFAULT_HOP_ACCURACY``) are assumptions derived
from public figures, to be replaced by your own evaluation (docs/calibration.md):
BF16 from the GSM8K (4-shot) accuracy the Qwen3 Technical Report (2025) gives for
the base models, Qwen3-8B-Base 89.8% and Qwen3-0.6B-Base 59.6%, spread over the
3.65 hops a GSM8K test problem has on average by the count above (4,819 lines
over 1,319 problems): p = accuracy ** (1 / 3.65). Quantised precisions assume
GSM8K losses of 0.5 points for 8-bit and FP8, 2.0 (8B) / 5.0 (0.6B) points for
fused INT4 and 2.5 / 6.0 for NF4, following the direction reported in "An
Empirical Study of Qwen3 Quantization" (Zheng et al., May 2025): 8-bit close to
lossless, 4-bit weight-only losing more, and more so for small models.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from qtrap_sim.chains import HopRequest, parse_hop, perturb_step, same_step, strip_step
from qtrap_sim.synthetic import Synthetic, find_synthetic, last_int, solve, step

# per-hop accuracy by (model, kernel); p ** 3.2 gives the GSM8K accuracy implied
DEFAULT_HOP_ACCURACY: dict[str, dict[str, float]] = {
    "qwen3-8b": {
        "bf16": 0.9710,
        "fp8_w8a8": 0.9695,
        "int8_w8a8": 0.9695,
        "int8_dequant": 0.9695,
        "bnb_int8": 0.9695,
        "int4_tinygemm": 0.9650,
        "int4_w4a16": 0.9650,  # the same INT4 weight-only format, vLLM's Machete kernel (H200 profile)
        "bnb_nf4": 0.9635,
    },
    "qwen3-0.6b": {
        "bf16": 0.8679,
        "fp8_w8a8": 0.8659,
        "int8_w8a8": 0.8659,
        "int8_dequant": 0.8659,
        "bnb_int8": 0.8659,
        "int4_tinygemm": 0.8474,
        "int4_w4a16": 0.8474,
        "bnb_nf4": 0.8431,
    },
}
_WINDOW = 8  # words of a question used to recognise it in a prompt
_CALC = re.compile(r"<<[^>]*>>")
_WORD = re.compile(r"\S+")


class OracleDataError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Reply:
    """What the oracle writes for a prompt, and its outcome for the ground truth."""

    text: str
    outcome: dict[str, Any]  # dataset, hops, correct (+ hop, step_correct for a chain hop)


@dataclass(frozen=True, slots=True)
class Problem:
    dataset: str  # "gsm8k" | "mathqa"
    question: str
    steps: tuple[str, ...]
    answer: str  # GSM8K: the number; MathQA: the correct letter
    options: tuple[tuple[str, str], ...] = ()  # MathQA (letter, value)

    @property
    def hops(self) -> int:
        return len(self.steps)


def _norm_words(text: str) -> list[str]:
    return [w.lower().strip(".,?!;:\"'") for w in _WORD.findall(text)]


def parse_mathqa_options(text: str) -> tuple[tuple[str, str], ...]:
    out = []
    for part in re.split(r"\s*,\s*(?=[a-e]\s*\))", text.strip()):
        m = re.match(r"([a-e])\s*\)\s*(.*)", part.strip())
        if m:
            out.append((m.group(1), m.group(2).strip()))
    return tuple(out)


def load_problems(path: str | Path) -> list[Problem]:
    """GSM8K (.jsonl with question/answer) or MathQA (.json array with Problem/options/correct), either
    possibly gzip-compressed (a ``.gz`` name or gzip's magic bytes)."""
    return list(_load(str(Path(path).resolve())))


@cache
def _load(path: str) -> tuple[Problem, ...]:
    import gzip
    import zlib

    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise OracleDataError(f"cannot read oracle data {p}: {e.strerror or e}") from e
    if p.suffix.lower() == ".gz" or data.startswith(b"\x1f\x8b"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a cut-off file, EOFError
            why = " ".join(str(e).split()) or type(e).__name__
            raise OracleDataError(f"cannot read oracle data {p}: not a valid gzip file ({why})") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OracleDataError(f"oracle data {p} is not UTF-8 text") from e
    problems: list[Problem] = []
    try:
        if text.lstrip().startswith("["):
            for i, row in enumerate(json.loads(text)):
                try:
                    ops = [o for o in row["linear_formula"].split("|") if o.strip()]
                    steps = tuple(f"Step {k + 1}: {op.strip()}" for k, op in enumerate(ops))
                    problems.append(
                        Problem(
                            "mathqa",
                            row["Problem"],
                            steps or ("Step 1: read the options",),
                            row["correct"].strip(),
                            parse_mathqa_options(row["options"]),
                        )
                    )
                except (KeyError, AttributeError, TypeError) as e:
                    raise OracleDataError(f"{p}: MathQA item {i} lacks {e}") from e
        else:
            for i, line in enumerate(text.splitlines()):
                if not line.strip():
                    continue
                row = json.loads(line)
                try:
                    body, _, final = row["answer"].rpartition("####")
                    steps = tuple(_CALC.sub("", s).strip() for s in body.splitlines() if s.strip())
                    problems.append(Problem("gsm8k", row["question"], steps, final.strip().replace(",", "")))
                except (KeyError, AttributeError, TypeError) as e:
                    raise OracleDataError(f"{p}: GSM8K line {i + 1} lacks {e}") from e
    except json.JSONDecodeError as e:
        raise OracleDataError(f"{p}: not GSM8K JSON lines or a MathQA JSON array: {e}") from e
    if not problems:
        raise OracleDataError(f"{p}: no problems found")
    return tuple(problems)


class Oracle:
    def __init__(self, problems: list[Problem], hop_accuracy: float) -> None:
        if not 0.0 <= hop_accuracy <= 1.0:
            raise ValueError(f"hop accuracy must be within [0, 1], got {hop_accuracy}")
        self.hop_accuracy = hop_accuracy
        self._index: dict[tuple[str, ...], Problem] = {}
        for prob in problems:
            words = _norm_words(prob.question)
            if len(words) >= 3:
                self._index.setdefault(tuple(words[:_WINDOW]), prob)

    @classmethod
    def from_files(cls, paths: list[str], hop_accuracy: float) -> Oracle:
        problems: list[Problem] = []
        for path in paths:
            problems.extend(load_problems(path))
        return cls(problems, hop_accuracy)

    def __len__(self) -> int:
        return len(self._index)

    def find(self, prompt: str) -> Problem | None:
        """The first known problem whose question's opening words appear in ``prompt``."""
        index = self._index
        if not index:
            return None
        words = _norm_words(prompt)
        for i in range(len(words)):
            prob = index.get(tuple(words[i : i + _WINDOW]))
            if prob is not None:
                return prob
        # a question shorter than the window
        for n in range(3, _WINDOW):
            for i in range(len(words) - n + 1):
                prob = index.get(tuple(words[i : i + n]))
                if prob is not None:
                    return prob
        return None

    def respond(self, prompt: str, seed: int | None, temperature: float) -> Reply | None:
        """The oracle's reply to ``prompt``: a whole solution or one chain hop; None for an unknown problem."""
        prob: Problem | Synthetic | None = find_synthetic(prompt) or self.find(prompt)
        if prob is None:
            return None
        hop = parse_hop(prompt)
        if hop is None:
            text, correct = self.answer(prob, prompt, seed, temperature)
            return Reply(text, {"dataset": prob.dataset, "hops": prob.hops, "correct": correct})
        rng = _rng(seed, prompt, temperature)
        if isinstance(prob, Synthetic):
            text, step_ok, final = self._synthetic_hop(prob, hop, rng)
        else:
            text, step_ok, final = self._dataset_hop(prob, hop, rng)
        outcome = {
            "dataset": prob.dataset,
            "hops": hop.of,
            "hop": hop.step,
            "step_correct": step_ok,
            "correct": final,
        }
        return Reply(text, outcome)

    def answer(
        self, prob: Problem | Synthetic, prompt: str, seed: int | None, temperature: float
    ) -> tuple[str, bool]:
        """(whole answer text, whether it is correct). Deterministic for temperature 0 or a given seed."""
        rng = _rng(seed, prompt, temperature)
        if isinstance(prob, Synthetic):
            return solve(prob, self.hop_accuracy, rng)
        correct = rng.random() < self.hop_accuracy**prob.hops
        lines = list(prob.steps)
        lines.append(_final_line(prob, correct, rng))
        return "\n".join(lines), correct

    def _synthetic_hop(
        self, prob: Synthetic, hop: HopRequest, rng: random.Random
    ) -> tuple[str, bool, bool | None]:
        prev = prob.start
        for i in range(hop.step - 1, 0, -1):  # the value the previous written step reached
            value = last_int(hop.earlier.get(i, ""))
            if value is not None:
                prev = value
                break
        sym, n = prob.op(hop.step)
        right = rng.random() < self.hop_accuracy
        truth = prob.value_after(hop.step) if hop.step <= prob.hops else None
        line, value = step(prev, sym, n, right, rng, truth)
        if not hop.last:
            return line, right, None
        return f"{line}\n#### {value}", right, str(value) == prob.answer

    def _dataset_hop(
        self, prob: Problem, hop: HopRequest, rng: random.Random
    ) -> tuple[str, bool, bool | None]:
        def reference(i: int) -> str:
            return strip_step(prob.steps[min(i, prob.hops) - 1])

        right = rng.random() < self.hop_accuracy
        line = reference(hop.step)
        if not right:
            line = perturb_step(line, rng)
        if not hop.last:
            return line, right, None
        earlier_ok = all(
            i in hop.earlier and same_step(hop.earlier[i], reference(i)) for i in range(1, hop.step)
        )
        correct = earlier_ok and right
        return f"{line}\n{_final_line(prob, correct, rng)}", right, correct


def _rng(seed: int | None, prompt: str, temperature: float) -> random.Random:
    if seed is None and temperature > 0:
        return random.Random()
    return random.Random(int.from_bytes(hashlib.blake2b(f"{seed}:{prompt}".encode(), digest_size=8).digest()))


def _final_line(prob: Problem, correct: bool, rng: random.Random) -> str:
    """``#### N`` (GSM8K) or ``Answer: {letter} ) {value}`` (MathQA), right when ``correct``."""
    if prob.dataset == "gsm8k":
        return f"#### {prob.answer if correct else _wrong_number(prob.answer, rng)}"
    letters = [letter for letter, _ in prob.options] or ["a", "b", "c", "d", "e"]
    wrong = [x for x in letters if x != prob.answer] or letters
    letter = prob.answer if correct else rng.choice(wrong)
    value = dict(prob.options).get(letter, "")
    return f"Answer: {letter} ) {value}".rstrip()


def _wrong_number(answer: str, rng: random.Random) -> str:
    try:
        value = float(answer)
    except ValueError:
        return answer + "1"
    delta = rng.choice([-10, -2, -1, 1, 2, 3, 10]) * (
        1 if abs(value) < 100 else max(1, int(abs(value)) // 50)
    )
    wrong = value + delta
    return str(int(wrong)) if wrong == int(wrong) else f"{wrong:.2f}"


def default_hop_accuracy(model: str, kernel: str | None) -> float:
    table = DEFAULT_HOP_ACCURACY.get(model, DEFAULT_HOP_ACCURACY["qwen3-8b"])
    return table.get(kernel or "bf16", table["bf16"])
