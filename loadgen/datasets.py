"""Problems to replay: GSM8K and MathQA (hub or local files) and synthetic arithmetic chains.

A problem's *hops* are the reasoning steps a chain replays, counted as follows
(there is no single standard, so qtrap states its own):

* GSM8K: the non-empty lines of the reference solution before ``####``;
* MathQA: the operations in ``linear_formula`` (``|``-separated);
* synthetic: the number of operations, exactly.

Local files use the upstream formats: GSM8K as JSON lines ``{"question", "answer"}``
(openai/grade-school-math), MathQA as a JSON array (or JSON lines) of
``{"Problem", "options", "correct", "linear_formula", ...}`` (the MathQA release); either may be
gzip-compressed (a ``.gz`` name or gzip's magic bytes), e.g. ``gsm8k-test.jsonl.gz``.
Without a file, GSM8K comes from the hub as ``openai/gsm8k`` (config ``main``) and
MathQA as ``allenai/math_qa`` through the ``datasets`` library.
"""

from __future__ import annotations

import ast
import contextlib
import gzip
import json
import random
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATASETS = ("synthetic", "gsm8k", "mathqa")
HUB = {"gsm8k": ("openai/gsm8k", "main"), "mathqa": ("allenai/math_qa", None)}
_CALC = re.compile(r"<<[^>]*>>")
_OPTION = re.compile(r"([a-e])\s*\)\s*(.*)")
_GZIP_MAGIC = b"\x1f\x8b"


class DatasetError(ValueError):
    """A dataset that cannot be loaded; the message is one line for the CLI."""


@dataclass(frozen=True, slots=True)
class Problem:
    id: str
    dataset: str  # synthetic | gsm8k | mathqa
    question: str  # the text a model sees (MathQA: with its options)
    answer: str  # gsm8k/synthetic: the number; mathqa: the correct option letter
    hops: int
    options: tuple[tuple[str, str], ...] = ()  # MathQA (letter, value)
    raw: dict[str, Any] | None = field(default=None, compare=False, repr=False)  # the source row


# -- GSM8K -------------------------------------------------------------------------------------------


def gsm8k_hops(solution: str) -> int:
    body = solution.rpartition("####")[0]
    return sum(1 for line in body.splitlines() if line.strip())


def gsm8k_answer(solution: str) -> str:
    return solution.rpartition("####")[2].strip().replace(",", "")


def gsm8k_problem(i: int, row: dict[str, Any]) -> Problem:
    question, solution = row["question"], row["answer"]
    if not isinstance(question, str) or not isinstance(solution, str) or "####" not in solution:
        raise ValueError("needs a question and an answer ending in '#### N'")
    return Problem(
        f"gsm8k-{i}", "gsm8k", question.strip(), gsm8k_answer(solution), max(1, gsm8k_hops(solution)), raw=row
    )


# -- MathQA ------------------------------------------------------------------------------------------


def parse_options(options: str | list[str]) -> tuple[tuple[str, str], ...]:
    """``a ) 38 , b ) 27.675 , ...`` -> (("a", "38"), ("b", "27.675"), ...). Some MathQA rows hold a
    list (or its Python repr, ``"['a ) 2 : 3', ...]"``) instead."""
    if isinstance(options, str) and options.strip().startswith("["):
        with contextlib.suppress(ValueError, SyntaxError):
            options = ast.literal_eval(options.strip())
    parts = options if isinstance(options, list) else re.split(r"\s*,\s*(?=[a-e]\s*\))", options.strip())
    out = []
    for part in parts:
        m = _OPTION.match(part.strip())
        if m:
            out.append((m.group(1), m.group(2).strip()))
    return tuple(out)


def mathqa_hops(linear_formula: str) -> int:
    return sum(1 for op in linear_formula.split("|") if op.strip())


def mathqa_problem(i: int, row: dict[str, Any]) -> Problem:
    options = parse_options(row["options"])
    correct = str(row["correct"]).strip().lower()
    if not options or correct not in dict(options):
        raise ValueError(f"options {row['options']!r} do not include the correct letter {correct!r}")
    shown = " , ".join(f"{k} ) {v}" for k, v in options)
    question = f"{row['Problem'].strip()}\nOptions: {shown}"
    hops = max(1, mathqa_hops(row["linear_formula"]))
    return Problem(f"mathqa-{i}", "mathqa", question, correct, hops, options, raw=row)


# -- synthetic ---------------------------------------------------------------------------------------


def synthetic(n: int, seed: int, min_hops: int = 2, max_hops: int = 6) -> list[Problem]:
    """Arithmetic chains with an exact hop count and a known answer, e.g.
    ``Start with 17. Add 5. Multiply by 3. Subtract 4. What is the result?`` (3 hops, answer 62)."""
    if not 1 <= min_hops <= max_hops:
        raise DatasetError(f"synthetic hops must satisfy 1 <= min <= max, got {min_hops}..{max_hops}")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        value = rng.randint(2, 60)
        parts = [f"Start with {value}."]
        for _ in range(rng.randint(min_hops, max_hops)):
            op = rng.choice(("add", "sub", "mul") if abs(value) < 500 else ("add", "sub"))
            if op == "mul":
                k = rng.randint(2, 5)
                parts.append(f"Multiply by {k}.")
                value *= k
            elif op == "add":
                k = rng.randint(1, 90)
                parts.append(f"Add {k}.")
                value += k
            else:
                k = rng.randint(1, 90)
                parts.append(f"Subtract {k}.")
                value -= k
        parts.append("What is the result?")
        out.append(Problem(f"synthetic-{i}", "synthetic", " ".join(parts), str(value), len(parts) - 2))
    return out


# -- loading -----------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    """A data file's text, gunzipped first when it is named ``*.gz`` or starts with gzip's magic bytes."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"cannot read data file {path}: {e.strerror or e}") from e
    if path.suffix.lower() == ".gz" or data.startswith(_GZIP_MAGIC):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a cut-off file, EOFError
            why = " ".join(str(e).split()) or type(e).__name__
            raise DatasetError(f"cannot read data file {path}: not a valid gzip file ({why})") from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"data file {path} is not UTF-8 text") from e


def _rows(path: Path) -> list[dict[str, Any]]:
    text = _read_text(path)
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise DatasetError(f"data file {path} is not JSON lines or a JSON array: {e}") from e
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DatasetError(f"data file {path} must hold JSON objects, one per problem")
    return rows


def _hub_rows(name: str, split: str) -> list[dict[str, Any]]:
    repo, config = HUB[name]
    try:
        import datasets  # the hub path only; local files and synthetic problems do not need it
    except ImportError as e:
        raise DatasetError(
            f"loading {repo} from the hub needs the `datasets` package; or pass --data-file"
        ) from e
    try:
        ds = datasets.load_dataset(repo, config, split=split)
    except Exception as e:  # the hub client raises many kinds (offline, 404, auth, script datasets)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DatasetError(
            f"cannot load {repo} ({split}) from the hub: {first}; pass --data-file FILE"
        ) from e
    return [dict(r) for r in ds]


def load(
    name: str, data_file: str | Path | None = None, *, split: str = "test", n: int = 0, seed: int = 0
) -> list[Problem]:
    """Every problem of a dataset (``n`` for synthetic); raises DatasetError with a one-line message."""
    if name == "synthetic":
        if data_file is not None:
            raise DatasetError("--data-file does not apply to --dataset synthetic")
        return synthetic(max(n, 1), seed)
    if name not in HUB:
        raise DatasetError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    rows = _rows(Path(data_file)) if data_file is not None else _hub_rows(name, split)
    make = gsm8k_problem if name == "gsm8k" else mathqa_problem
    problems = []
    for i, row in enumerate(rows):
        try:
            problems.append(make(i, row))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            where = data_file or HUB[name][0]
            what = f"lacks {e}" if isinstance(e, KeyError) else str(e)
            raise DatasetError(f"{where}: {name} item {i + 1} {what}") from e
    if not problems:
        raise DatasetError(f"{data_file or HUB[name][0]}: no problems")
    return problems


def write_source(problems: list[Problem], path: Path) -> Path:
    """The problems' source rows in their upstream format (GSM8K JSON lines, MathQA JSON array), e.g. for a
    simulator's ``--oracle-data`` when the problems came from the hub."""
    rows = [p.raw for p in problems if p.raw is not None]
    if problems and problems[0].dataset == "mathqa":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
