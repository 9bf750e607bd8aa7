"""Continuous-batching engine running in real time.

Each step serves up to ``max_num_seqs`` running requests: a request's prompt,
less what the prefix cache holds (``prefix_cache.py``), is prefilled in the step
it is admitted (producing its first token);
afterwards it decodes one token per step. Waiting requests are admitted in
arrival order as slots free up. A step lasts what the performance model says,
scheduled against absolute deadlines so slow event-loop wake-ups do not
accumulate (the slip is measured and exported).

Energy: each step's modelled energy goes to the simulated GPU's counter, and to
the requests in the step as their ground truth: every request pays the marginal
energy of its own rows (1 per decode, its prompt length when prefilling) and of
the context its attention reads (the time they add to the step included), plus an equal share of the rest of the step
(weights streamed once, fixed overheads, idle power). For a cost that is a
shared part plus additive parts this is each request's Shapley value; it is
deliberately not "step energy split by tokens".
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from qtrap_common.background import Background
from qtrap_sim.gpu import SimGPU
from qtrap_sim.perf import PerfModel


@dataclass(slots=True, eq=False)
class SimRequest:
    id: str
    prompt_tokens: int
    max_tokens: int
    cached_tokens: int = 0  # leading prompt tokens found in the prefix cache: not prefilled again
    arrival: float = field(default_factory=time.monotonic)
    generated: int = 0
    prefilled: bool = False
    admitted_at: float | None = None  # moved from waiting to running (vLLM's first SCHEDULED event)
    first_token_at: float | None = None
    last_token_at: float | None = None  # its last token (vLLM's last_token_ts): set when it finishes
    finished_at: float | None = None
    finish_reason: str | None = None  # "length", "stop", "abort"
    stop_at_end: bool = False  # the answer ends at max_tokens by itself (finish_reason "stop")
    true_energy_j: float = 0.0  # ground truth under the performance model
    steps: int = 0
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
    request_energy_j: float = 0.0  # energy given to requests (the rest of the GPU's energy is idle)


class Engine(Background):
    task_name = "sim-engine"

    def __init__(
        self, perf: PerfModel, max_num_seqs: int = 256, max_model_len: int = 32768, gpu: SimGPU | None = None
    ) -> None:
        self.perf = perf
        self.gpu = gpu
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.running: list[SimRequest] = []
        self.waiting: deque[SimRequest] = deque()
        self.stats = EngineStats()
        self._wake = asyncio.Event()
        # called after each step with (prompt tokens whose prefill completed, tokens generated, how many of
        # those were decoded by requests past their prefill, seconds since the previous step ended: the
        # inter-token latency of each of those), as an engine's iteration stats are: the backend's token
        # counters and per-step histograms follow it
        self.on_step: Callable[[int, int, int, float], None] | None = None
        self._last_step_end = 0.0  # every running request past its prefill got its latest token then

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
            if req.prefilled:
                req.last_token_at = self._last_step_end
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        req._event.set()

    @property
    def kv_tokens(self) -> int:
        return sum(r.prompt_tokens + r.generated for r in self.running)

    async def _run(self) -> None:
        deadline = time.monotonic()
        busy_since: float | None = None  # end of the previous step while work continues
        while True:
            if not self.running and not self.waiting:
                busy_since = None
                self._wake.clear()
                await self._wake.wait()
                deadline = time.monotonic()
            if self.waiting and len(self.running) < self.max_num_seqs:
                admitted = time.monotonic()
                while self.waiting and len(self.running) < self.max_num_seqs:
                    r = self.waiting.popleft()
                    r.admitted_at = admitted
                    self.running.append(r)
            batch = list(self.running)  # who pays for this step, even if aborted during it
            rows = ctx = 0
            for r in batch:
                if r.prefilled:
                    rows += 1
                    ctx += r.prompt_tokens + r.generated
                else:  # prefill: every uncached prompt token is a row; attention reads the prompt once
                    rows += r.prompt_tokens - r.cached_tokens
                    ctx += r.prompt_tokens
            cost = self.perf.step(rows, ctx)
            dt = cost.time_s
            start = time.monotonic()
            # between back-to-back steps the GPU is not idle: the gap belongs to this step
            t_from = busy_since if busy_since is not None else start
            if self.gpu is not None:
                self.gpu.begin_step(t_from, cost.energy_j / dt if dt > 0 else self.perf.idle_power_w)
            deadline = max(deadline, start - 0.25) + dt
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
            # wall time beyond the modelled step (event-loop slip, scheduling gaps) draws idle power,
            # shared by the step's requests
            energy = cost.energy_j + self.perf.idle_power_w * max(0.0, (end - t_from) - dt)
            busy_since = end
            if self.gpu is not None:
                self.gpu.end_step(end, energy)
            st.request_energy_j += energy
            shared = (energy - rows * cost.row_j - ctx * cost.ctx_j) / len(batch)
            for r in batch:
                if r.prefilled:
                    r.true_energy_j += shared + cost.row_j + cost.ctx_j * (r.prompt_tokens + r.generated)
                else:
                    r.true_energy_j += (
                        shared
                        + cost.row_j * (r.prompt_tokens - r.cached_tokens)
                        + cost.ctx_j * r.prompt_tokens
                    )
                r.steps += 1
            finished: list[SimRequest] = []
            prefilled_tokens = generated_now = first_tokens = 0
            for r in self.running:
                if not r.prefilled:
                    r.prefilled = True
                    r.first_token_at = end
                    prefilled_tokens += r.prompt_tokens
                    first_tokens += 1
                r.generated += 1
                generated_now += 1
                st.tokens += 1
                if r.generated >= r.max_tokens:
                    r.finish_reason = "stop" if r.stop_at_end else "length"
                    r.finished_at = r.last_token_at = end
                    finished.append(r)
                r._event.set()
            for r in finished:
                self.running.remove(r)
            self._last_step_end = end
            if self.on_step is not None:
                # a decoding request got its previous token when the previous step ended (t_from)
                self.on_step(prefilled_tokens, generated_now, generated_now - first_tokens, end - t_from)
