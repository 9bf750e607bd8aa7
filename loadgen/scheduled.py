"""Replaying chains under a time-varying load (``--schedule``).

Closed loop (``--schedule-unit concurrency``): worker k runs chains while the schedule's value, rounded,
is above k. A worker looks at the target only between chains, so a drop in concurrency takes effect as
chains end (none is cut mid-hop) and a rise starts new chains at once. Open loop (``chains/s``): a chain
starts at each arrival, however many are in flight. ``requests/s``: each arrival sends one request: the
next hop of the longest-waiting chain whose previous hop has answered, else the first hop of a new chain.
When the schedule ends no chain starts; chains in flight run to their end (the drain; with
``requests/s`` their remaining hops go out without waiting for arrivals).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from loadgen.datasets import Problem
from loadgen.runner import Chain, LevelRun, _rare_collections, run_chain
from loadgen.schedule import Schedule, arrival_times


@dataclass(slots=True)
class SchedulePlan:
    label: str  # the precision pinned or the routing policy
    schedule: Schedule
    unit: str = "concurrency"  # concurrency | chains/s | requests/s
    arrivals: str = "poisson"  # open loop only
    hops_mode: str = "requests"
    seed: int = 0
    report_scores: bool = False
    tick_s: float = 0.05  # how often the closed loop re-reads a continuous curve


@dataclass(slots=True)
class ScheduleResult:
    """One schedule's chains and times (``time.monotonic()``): ``t0`` its start, ``t_sched_end`` the end of
    the schedule (no chain starts after it), ``t_end`` the end of the drain."""

    plan: SchedulePlan
    run: LevelRun
    t0: float = 0.0
    t_sched_end: float = 0.0
    t_end: float = 0.0
    targets: list[tuple[float, int]] = field(default_factory=list)  # closed loop: (t, concurrency) changes


@_rare_collections
async def run_schedule(
    client: Any,
    plan: SchedulePlan,
    problems: Sequence[Problem],
    chain_prefix: str,
    *,
    stop: asyncio.Event | None = None,
    on_chain: Callable[[Chain], None] | None = None,
) -> ScheduleResult:
    """Replay ``problems`` (cycled) under ``plan.schedule``; ``stop`` (Ctrl-C) ends it early, abandoning
    the requests in flight."""
    stop = stop or asyncio.Event()
    peak = plan.schedule.peak()
    run = LevelRun(plan.label, round(peak) if plan.unit == "concurrency" else 0, 0)
    out = ScheduleResult(plan, run)
    out.t0 = run.t_start = time.monotonic()
    dur = plan.schedule.duration_s
    next_index = 0
    tasks: set[asyncio.Task[Any]] = set()

    def new_chain() -> Chain:
        nonlocal next_index
        i = next_index
        next_index += 1
        problem = problems[i % len(problems)]
        planned = 1 if plan.hops_mode == "stream" else problem.hops
        chain = Chain(f"{chain_prefix}-{i}", i, problem, warmup=False, planned=planned)
        run.chains.append(chain)
        return chain

    async def finish(chain: Chain) -> None:
        if chain.score is not None and plan.report_scores:
            await client.report_score(chain.id, chain.score.strict, chain.problem.hops)
        if on_chain is not None:
            on_chain(chain)

    async def closed_loop() -> None:
        target = 0
        ended = False
        cond = asyncio.Condition()

        async def worker(k: int) -> None:
            while True:
                async with cond:
                    await cond.wait_for(lambda: ended or k < target)
                    if ended:
                        return
                chain = new_chain()
                await run_chain(client, chain, plan.hops_mode)
                await finish(chain)

        workers = [asyncio.create_task(worker(k)) for k in range(max(1, round(peak)))]
        tasks.update(workers)
        changes = plan.schedule.changes()
        while not stop.is_set():
            t = time.monotonic() - out.t0
            if t >= dur:
                break
            new = round(plan.schedule.value_at(t))
            if new != target:
                target = new
                out.targets.append((t, new))
                async with cond:
                    cond.notify_all()
            # sleep to the next step edge, or a tick for a continuous curve
            later = [c for c in changes if c > t]
            wait = (later[0] - t) if changes and later else (dur - t if changes else plan.tick_s)
            await _sleep_or_stop(min(wait, dur - t), stop)
        out.t_sched_end = time.monotonic()
        ended = True
        async with cond:
            cond.notify_all()
        await asyncio.gather(*workers)

    async def open_loop() -> None:
        times = arrival_times(plan.schedule, plan.arrivals, random.Random(plan.seed))
        waiting: deque[asyncio.Future[None]] = deque()
        draining = False

        async def gate() -> None:
            if draining:
                return
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiting.append(fut)
            await fut

        async def one(chain: Chain) -> None:
            await run_chain(client, chain, plan.hops_mode, gate if plan.unit == "requests/s" else None)
            await finish(chain)

        for at in times:
            delay = out.t0 + at - time.monotonic()
            if delay > 0:
                await _sleep_or_stop(delay, stop)
            if stop.is_set():
                break
            while waiting and waiting[0].done():
                waiting.popleft()
            if plan.unit == "requests/s" and waiting:
                waiting.popleft().set_result(None)
                continue
            t = asyncio.create_task(one(new_chain()))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        if not stop.is_set():
            await _sleep_or_stop(out.t0 + dur - time.monotonic(), stop)
        out.t_sched_end = time.monotonic()
        draining = True
        while waiting:
            fut = waiting.popleft()
            if not fut.done():
                fut.set_result(None)
        while tasks:
            await asyncio.gather(*list(tasks))

    body = asyncio.create_task(closed_loop() if plan.unit == "concurrency" else open_loop())
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({body, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if body not in done:  # Ctrl-C: requests in flight are abandoned, their chains left unscored
        run.interrupted = True
        for t in (body, *tasks):
            t.cancel()
        await asyncio.gather(body, *tasks, return_exceptions=True)
        out.t_sched_end = out.t_sched_end or time.monotonic()
    else:
        body.result()
    stopper.cancel()
    out.t_end = run.t_end = time.monotonic()
    run.window = (out.t0, out.t_end)
    return out


async def _sleep_or_stop(seconds: float, stop: asyncio.Event) -> None:
    if seconds <= 0:
        return
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass
