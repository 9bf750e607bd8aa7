"""Text the simulated model writes: deterministic filler words, one word per token."""

from __future__ import annotations

import hashlib
import random
import re

_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "with",
    "was",
    "on",
    "be",
    "by",
    "this",
    "are",
    "at",
    "from",
    "or",
    "have",
    "an",
    "which",
    "one",
    "can",
    "not",
    "all",
    "were",
    "when",
    "we",
    "there",
    "been",
    "if",
    "more",
    "so",
    "some",
    "would",
    "what",
    "out",
    "other",
    "into",
    "time",
    "only",
    "new",
    "these",
    "two",
    "may",
    "first",
    "then",
    "do",
    "any",
    "like",
    "my",
    "now",
    "over",
    "such",
    "our",
    "man",
    "me",
    "even",
    "most",
    "made",
    "after",
    "also",
    "did",
    "many",
    "before",
    "must",
    "through",
    "back",
    "years",
    "where",
    "much",
    "your",
    "way",
    "well",
    "down",
    "should",
    "because",
    "each",
    "just",
    "those",
    "people",
    "how",
    "too",
    "little",
    "state",
    "good",
    "very",
    "make",
    "world",
    "still",
    "own",
    "see",
    "men",
    "work",
    "long",
    "get",
    "here",
    "between",
    "both",
    "life",
    "being",
    "under",
    "never",
    "day",
    "same",
    "another",
    "know",
    "while",
    "last",
    "might",
    "us",
    "great",
    "old",
    "year",
    "off",
    "come",
    "since",
    "against",
    "go",
    "came",
    "right",
    "used",
    "take",
    "three",
]


def count_tokens(text: str) -> int:
    """The simulator's tokenizer: one token per whitespace-separated word (at least 1)."""
    return max(1, len(text.split()))


class TextStream:
    """Renders token k of a request's answer; the same seed and prompt always give the same text."""

    __slots__ = ("_rng",)

    def __init__(self, prompt: str, seed: int | None, temperature: float) -> None:
        if seed is None and temperature > 0:
            self._rng = random.Random()
        else:
            basis = f"{seed}:{prompt}".encode()
            self._rng = random.Random(int.from_bytes(hashlib.blake2b(basis, digest_size=8).digest(), "big"))

    def next_words(self, n: int) -> str:
        rng = self._rng
        return "".join(" " + _WORDS[rng.randrange(len(_WORDS))] for _ in range(n))


_PIECE = re.compile(r"\s*\S+")


class ScriptedText:
    """Renders a fixed answer token by token (a token is a word with the whitespace before it); past its end,
    ``then``'s words (vLLM's ``ignore_eos``: generation runs on to max_tokens), or nothing."""

    __slots__ = ("_pieces", "_pos", "_then")

    def __init__(self, text: str, then: TextStream | None = None) -> None:
        self._pieces = _PIECE.findall(text)
        self._pos = 0
        self._then = then

    def __len__(self) -> int:
        return len(self._pieces)

    def next_words(self, n: int) -> str:
        out = "".join(self._pieces[self._pos : self._pos + n])
        past = self._pos + n - len(self._pieces)
        self._pos += n
        if past > 0 and self._then is not None:
            out += self._then.next_words(min(n, past))
        return out
