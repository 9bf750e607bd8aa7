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


VOCAB_SIZE = 151_936  # Qwen3's
_WORD_ID = {w: i for i, w in enumerate(_WORDS)}
_SEEN: dict[int, str] = {}  # ids of words outside the list, as tokenized in this process (detokenize's)


def token_ids(text: str) -> list[int]:
    """The ids of ``text``'s tokens (one per word, as :func:`count_tokens`): a word of the filler list is
    its index, any other a stable hash into the vocabulary above the list."""
    out = []
    for word in text.split():
        i = _WORD_ID.get(word)
        if i is None:
            h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "big")
            i = len(_WORDS) + h % (VOCAB_SIZE - len(_WORDS))
            _SEEN.setdefault(i, word)
        out.append(i)
    return out


def detokenize(ids: list[int]) -> str:
    """The text of token ids (words joined by spaces); an id never tokenized here reads ``<id>``."""
    return " ".join(_WORDS[i] if 0 <= i < len(_WORDS) else _SEEN.get(i, f"<{i}>") for i in ids)


def embedding(text: str, dimensions: int) -> list[float]:
    """A deterministic unit vector for ``text`` (the same text, the same vector)."""
    rng = random.Random(int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big"))
    v = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = sum(x * x for x in v) ** 0.5 or 1.0
    return [x / norm for x in v]


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
