"""Automatic prefix caching as vLLM does it (on by default since its V1 engine), in whole blocks.

vLLM keeps the KV cache of every full block of a prompt (16 tokens by default) under a hash chained from the
blocks before it; a new prompt whose leading blocks hash the same reuses them and prefills only the rest.
In multi-hop reasoning each hop's prompt repeats the problem and the steps so far, so most of it is cached:
on an H200 under loadgen's synthetic chains vLLM 0.26 reported prefix cache hit rates of 93-95%
(docs/results/h200-vllm-2026-12-05). Without this the simulator would prefill every hop's whole prompt and
charge several times the prefill work the real engine does.

Tokens here are the simulator's (one per whitespace-separated word, ``textgen.count_tokens``). The cache
holds ``capacity_blocks`` blocks and forgets the least recently used; at least one token of a prompt is
always computed (vLLM recomputes the last token of a fully cached prompt to get its logits).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

BLOCK_TOKENS = 16  # vLLM's default --block-size on CUDA


@dataclass(slots=True)
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, found cached


class PrefixCache:
    def __init__(self, capacity_blocks: int = 8192, block_tokens: int = BLOCK_TOKENS) -> None:
        if capacity_blocks < 1 or block_tokens < 1:
            raise ValueError("capacity_blocks and block_tokens must be >= 1")
        self.block_tokens = block_tokens
        self.capacity_blocks = capacity_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self.stats = PrefixCacheStats()

    def __len__(self) -> int:
        return len(self._blocks)

    def admit(self, tokens: Sequence[str]) -> int:
        """Look a prompt up and remember its full blocks; returns how many of its tokens were cached."""
        b = self.block_tokens
        n_full = len(tokens) // b
        h = 0
        cached_blocks = 0
        matching = True
        blocks = self._blocks
        for i in range(n_full):
            h = hash((h, *tokens[i * b : (i + 1) * b]))
            if matching and h in blocks:
                blocks.move_to_end(h)
                cached_blocks += 1
                continue
            matching = False
            blocks[h] = None
        while len(blocks) > self.capacity_blocks:
            blocks.popitem(last=False)
        cached = min(cached_blocks * b, max(0, len(tokens) - 1))
        self.stats.queries += len(tokens)
        self.stats.hits += cached
        return cached
