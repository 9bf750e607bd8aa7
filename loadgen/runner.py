"""Closed-loop replay of reasoning chains at a fixed concurrency.

At concurrency C, C workers each run one chain at a time and start the next
problem as soon as theirs ends, so C chains are always in flight. The first
``warmup`` chains of a level are replayed but left out of the figures. The
steady-state window (as the ML.ENERGY benchmark measures) opens when the first
measured chain starts, by which time all C workers are busy, and closes when the
first worker finds no work left (or ``duration`` has passed): from then on the
level drains and fewer than C chains are in flight. Energy and throughput are
taken over requests that lie wholly inside the window.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

from loadgen.chains import carried_step, hop_prompt, stream_prompt
from loadgen.client import ChatClient, Exchange
from loadgen.datasets import Problem
from loadgen.scoring import Score, score
from qtrap_common import wire


@dataclass(slots=True)
class Chain:
    id: str
    index: int  # position in the level's problem sequence
    problem: Problem
    warmup: bool
    planned: int = 1  # requests the chain sends when nothing fails
    exchanges: list[Exchange] = field(default_factory=list)
    score: Score | None = None  # None when a request of the chain failed
    t_start: float = 0.0
    t_end: float = 0.0

    @property
    def ok(self) -> bool:
        return self.score is not None


@dataclass(slots=True)
class LevelRun:
    precision: str
    concurrency: int
    repeat: int
    chains: list[Chain] = field(default_factory=list)
    t_start: float = 0.0
    t_end: float = 0.0
    window: tuple[float, float] | None = None
    interrupted: bool = False

    @property
    def exchanges(self) -> list[Exchange]:
        return [e for c in self.chains for e in c.exchanges]


async def run_chain(
    client: ChatClient,
    chain: Chain,
    hops_mode: str,
    before_hop: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Send the chain's requests one after another. ``before_hop`` (open loop on requests): awaited before
    each hop after the first, which then goes out at the next arrival."""
    p = chain.problem
    chain.t_start = time.monotonic()
    try:
        if hops_mode == "stream":
            ex = await client.chat(
                stream_prompt(p),
                chain=chain.id,
                hop=1,
                headers={wire.CHAIN_ID: chain.id, wire.HOP: "1", wire.HOP_SPLIT: "lines"},
            )
            chain.exchanges.append(ex)
            if ex.status == "ok":
                chain.score = score(p, ex.text)
            return
        steps: list[str] = []
        for hop in range(1, p.hops + 1):
            if before_hop is not None and hop > 1:
                await before_hop()
            ex = await client.chat(
                hop_prompt(p, hop, steps),
                chain=chain.id,
                hop=hop,
                headers={wire.CHAIN_ID: chain.id, wire.HOP: str(hop)},
            )
            chain.exchanges.append(ex)
            if ex.status != "ok":
                return
            steps.append(carried_step(ex.text))
        chain.score = score(p, chain.exchanges[-1].text)
    finally:
        chain.t_end = time.monotonic()


@dataclass(slots=True)
class LevelPlan:
    precision: str
    concurrency: int
    repeat: int
    warmup: int  # chains
    num_chains: int | None  # measured chains, or
    duration_s: float | None  # seconds of steady state
    hops_mode: str = "requests"
    report_scores: bool = (
        False  # POST each chain's verdict to the proxy (it exports qtrap_chains_scored_total)
    )


_P = ParamSpec("_P")
_T = TypeVar("_T")
GC_THRESHOLD = 100_000  # net allocations between young collections during a level (CPython's default: 700)


def _rare_collections(fn: Callable[_P, Coroutine[Any, Any, _T]]) -> Callable[_P, Coroutine[Any, Any, _T]]:
    """Collect cyclic garbage rarely while ``fn`` runs. With thousands of requests in flight, each keeping
    a hundred or so young objects alive, every young-generation collection walks them all and finds next
    to nothing (requests free their objects by reference counting): at 2,000 streams collections took
    5-15% of the time, in pauses of up to 0.1 s (docs/benchmarks.md). They still happen, every 100,000
    net allocations."""

    @functools.wraps(fn)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        old = gc.get_threshold()
        gc.set_threshold(max(old[0], GC_THRESHOLD), *old[1:])
        try:
            return await fn(*args, **kwargs)
        finally:
            gc.set_threshold(*old)

    return wrapper


@_rare_collections
async def run_level(
    client: ChatClient,
    plan: LevelPlan,
    problems: Sequence[Problem],
    chain_prefix: str,
    *,
    stop: asyncio.Event | None = None,
    on_chain: Callable[[Chain], None] | None = None,
    on_window: Callable[[str, float], None] | None = None,
) -> LevelRun:
    """Replay ``problems`` (cycled) in a closed loop; ``stop`` ends the level early (Ctrl-C)."""
    if plan.concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    run = LevelRun(plan.precision, plan.concurrency, plan.repeat)
    run.t_start = time.monotonic()
    next_index = 0
    window_open: float | None = None
    window_close: float | None = None
    stop = stop or asyncio.Event()

    def more() -> bool:
        if stop.is_set():
            return False
        if plan.num_chains is not None and next_index >= plan.warmup + plan.num_chains:
            return False
        if plan.duration_s is not None and window_open is not None:
            return time.monotonic() < window_open + plan.duration_s
        return True

    async def worker() -> None:
        nonlocal next_index, window_open, window_close
        while more():
            i = next_index
            next_index += 1
            if i >= plan.warmup and window_open is None:
                window_open = time.monotonic()
                if on_window is not None:
                    on_window("open", window_open)
            problem = problems[i % len(problems)]
            planned = 1 if plan.hops_mode == "stream" else problem.hops
            chain = Chain(f"{chain_prefix}-{i}", i, problem, warmup=i < plan.warmup, planned=planned)
            run.chains.append(chain)
            await run_chain(client, chain, plan.hops_mode)
            if chain.score is not None and plan.report_scores:
                await client.report_score(chain.id, chain.score.strict, chain.problem.hops)
            if on_chain is not None:
                on_chain(chain)
        if window_close is None:
            window_close = time.monotonic()
            if on_window is not None and window_open is not None:
                on_window("close", window_close)

    tasks: list[asyncio.Task[Any]] = [asyncio.create_task(worker()) for _ in range(plan.concurrency)]
    stopper: asyncio.Task[Any] = asyncio.create_task(stop.wait())
    pending: set[asyncio.Task[Any]] = set(tasks)
    while pending:
        done, pending = await asyncio.wait(pending | {stopper}, return_when=asyncio.FIRST_COMPLETED)
        pending.discard(stopper)
        if stopper in done:
            # Ctrl-C: cut the level short; requests in flight are abandoned and their chains left unscored
            run.interrupted = True
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            pending = set()
        for t in done:
            exc = None if t is stopper else t.exception()
            if exc is not None:
                raise exc
    stopper.cancel()
    run.t_end = time.monotonic()
    if window_open is not None:
        run.window = (window_open, window_close if window_close is not None else run.t_end)
    return run
