"""The simulator's tokenizer and embeddings (/tokenize, /detokenize, /v1/embeddings)."""

from __future__ import annotations

import math

from qtrap_sim.textgen import VOCAB_SIZE, count_tokens, detokenize, embedding, token_ids


def test_token_ids_round_trip_and_agree_with_count_tokens() -> None:
    text = "the year  qtrapword-1 three"
    ids = token_ids(text)
    assert len(ids) == count_tokens(text) == 4
    assert all(0 <= i < VOCAB_SIZE for i in ids)
    assert ids == token_ids(text)  # stable
    assert detokenize(ids) == "the year qtrapword-1 three"  # whitespace normalised to single spaces
    assert detokenize([VOCAB_SIZE + 5]) == f"<{VOCAB_SIZE + 5}>"  # never tokenized here


def test_embedding_is_a_deterministic_unit_vector() -> None:
    a, b = embedding("one two", 8), embedding("one two", 8)
    assert a == b and len(a) == 8
    assert math.isclose(sum(x * x for x in a), 1.0, rel_tol=1e-9)
    assert embedding("other", 8) != a
