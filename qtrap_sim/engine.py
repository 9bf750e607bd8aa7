"""Continuous-batching engine running in real time.

Each step serves up to ``max_num_seqs`` running requests: a request's whole
prompt is prefilled in the step it is admitted (producing its first token);
afterwards it decodes one token per step. Waiting requests are admitted in
arrival order as slots free up. A step lasts what the performance model says,
scheduled against absolute deadlines so slow event-loop wake-ups do not
accumulate (the slip is measured and exported).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

from qtrap_sim.perf import PerfModel


@dataclass(slots=True, eq=False)
class SimRequest:
    id: str
    prompt_tokens: int
    max_tokens: int
    arrival: float = field(default_factory=time.monotonic)
    generated: int = 0
    prefilled: bool = False
    first_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None  # "length", "stop", "abort"
    # Incremented counts of new tokens, consumed by the API layer.
    _event: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    async def wait_progress(self) -> None:
        await self._event.wait()
        self._event.clear()


@dataclass(slots=True)
class EngineStats:
    steps: int = 0
    tokens: int = 0
    busy_s: float = 0.0
    slip_s_total: float = 0.0
    slip_s_max: float = 0.0


class Engine:
    def __init__(self, perf: PerfModel, max_num_seqs: int = 256, max_model_len: int = 32768) -> None:
        self.perf = perf
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.running: list[SimRequest] = []
        self.waiting: deque[SimRequest] = deque()
        self.stats = EngineStats()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="sim-engine")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def submit(self, req: SimRequest) -> None:
        self.waiting.append(req)
        self._wake.set()

    def finish(self, req: SimRequest, reason: str) -> None:
        """End a request early (``stop`` string seen, or ``abort`` when its client went away)."""
        if req.done:
            return
        req.finish_reason = reason
        req.finished_at = time.monotonic()
        if req in self.running:
            self.running.remove(req)
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        req._event.set()

    @property
    def kv_tokens(self) -> int:
        return sum(r.prompt_tokens + r.generated for r in self.running)

    async def _loop(self) -> None:
        deadline = time.monotonic()
        while True:
            if not self.running and not self.waiting:
                self._wake.clear()
                await self._wake.wait()
                deadline = time.monotonic()
            while self.waiting and len(self.running) < self.max_num_seqs:
                self.running.append(self.waiting.popleft())
            prefill = sum(r.prompt_tokens for r in self.running if not r.prefilled)
            decodes = sum(1 for r in self.running if r.prefilled)
            dt = self.perf.step_time_s(decodes, prefill)
            deadline += dt
            now = time.monotonic()
            if deadline > now:
                await asyncio.sleep(deadline - now)
            else:
                await asyncio.sleep(0)
            end = time.monotonic()
            slip = max(0.0, end - deadline)
            st = self.stats
            st.steps += 1
            st.busy_s += dt
            st.slip_s_total += slip
            st.slip_s_max = max(st.slip_s_max, slip)
            if slip > 0.25:  # hopelessly behind (machine overloaded): re-anchor instead of bursting
                deadline = end
            finished: list[SimRequest] = []
            for r in self.running:
                if not r.prefilled:
                    r.prefilled = True
                    r.first_token_at = end
                r.generated += 1
                st.tokens += 1
                if r.generated >= r.max_tokens:
                    r.finish_reason = "length"
                    r.finished_at = end
                    finished.append(r)
                r._event.set()
            for r in finished:
                self.running.remove(r)
