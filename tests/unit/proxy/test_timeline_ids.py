"""Request ids are unguessable: each carries 128 random bits, so one id tells nothing about another."""

from __future__ import annotations

import itertools
import re

from qtrap_proxy.timeline import new_request_id


def test_ids_are_128_random_bits_each() -> None:
    ids = [new_request_id() for _ in range(2000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)
    # no shared per-process prefix and no counter: consecutive ids differ early and by far more than 1
    assert len({i[:8] for i in ids}) > 1990
    nums = [int(i, 16) for i in ids]
    assert all(abs(b - a) > 2**64 for a, b in itertools.pairwise(nums))
    # about half of the 128 bits flip between consecutive ids
    flips = [bin(a ^ b).count("1") for a, b in itertools.pairwise(nums)]
    assert 56 < sum(flips) / len(flips) < 72
