"""The closed loop: C chains in flight, warm-up, the steady-state window, chain and duration limits."""

from __future__ import annotations

import asyncio
from typing import Any

from loadgen.client import Exchange
from loadgen.datasets import synthetic
from loadgen.runner import LevelPlan, run_level


class StubClient:
    """Answers every hop correctly after a short sleep and records how many requests were in flight."""

    def __init__(self, delay_s: float = 0.002, fail_hop: int | None = None) -> None:
        self.delay_s = delay_s
        self.fail_hop = fail_hop
        self.inflight = 0
        self.peak = 0
        self.headers: list[dict[str, str]] = []

    async def chat(self, prompt: str, *, chain: str, hop: int, headers: dict[str, str]) -> Exchange:
        import time

        ex = Exchange(chain, hop, time.monotonic())
        self.headers.append(headers)
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.inflight -= 1
        ex.t_first = ex.t_end = time.monotonic()
        if hop == self.fail_hop:
            ex.error = "HTTP 502: down"
            return ex
        ex.status, ex.text, ex.completion_tokens = "ok", "1 + 1 = 2\n#### 2", 5
        return ex


def _run(client: Any, plan: LevelPlan, n: int = 50) -> Any:
    return asyncio.run(run_level(client, plan, synthetic(n, seed=1), "t"))


def test_closed_loop_keeps_c_chains_in_flight() -> None:
    client = StubClient()
    run = _run(client, LevelPlan("bf16", 4, 0, warmup=4, num_chains=12, duration_s=None))
    assert client.peak == 4
    assert len(run.chains) == 16 and sum(c.warmup for c in run.chains) == 4
    assert [c.index for c in run.chains] == list(range(16))
    assert all(len(c.exchanges) == c.problem.hops == c.planned for c in run.chains)
    assert run.window is not None
    w0, w1 = run.window
    measured = [c for c in run.chains if not c.warmup]
    assert w0 <= min(c.t_start for c in measured) < w0 + 0.001 and w1 <= run.t_end
    # chain and hop headers on every request, hops in order
    assert {h["x-qtrap-hop"] for h in client.headers} >= {"1", "2"}
    assert all(h["x-qtrap-chain-id"].startswith("t-") for h in client.headers)


def test_failed_hop_ends_the_chain_unscored() -> None:
    run = _run(StubClient(fail_hop=2), LevelPlan("bf16", 2, 0, warmup=0, num_chains=6, duration_s=None))
    for c in run.chains:
        assert c.score is None and len(c.exchanges) == 2 and c.exchanges[-1].status == "error"


def test_duration_bounds_the_level() -> None:
    run = _run(
        StubClient(delay_s=0.005), LevelPlan("bf16", 3, 0, warmup=3, num_chains=None, duration_s=0.3), n=1000
    )
    assert run.window is not None
    w0, w1 = run.window
    # no chain starts after the window closes; the window lasts about --duration
    assert 0.3 <= w1 - w0 < 0.3 + 0.5
    assert max(c.t_start for c in run.chains) <= w1
    assert 3 < len(run.chains) < 1000


def test_stop_event_cuts_the_level_short() -> None:
    async def go() -> Any:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.2, stop.set)
        client: Any = StubClient(delay_s=0.01)
        return await run_level(
            client, LevelPlan("bf16", 2, 0, 0, 10_000, None), synthetic(100, 1), "t", stop=stop
        )

    run = asyncio.run(go())
    assert run.interrupted and 0 < len(run.chains) < 10_000


def test_stream_mode_sends_one_split_request_per_problem() -> None:
    client = StubClient()
    run = _run(client, LevelPlan("bf16", 2, 0, warmup=0, num_chains=4, duration_s=None, hops_mode="stream"))
    assert all(len(c.exchanges) == 1 and c.planned == 1 and c.score is not None for c in run.chains)
    assert all(h["x-qtrap-hop-split"] == "lines" for h in client.headers)
