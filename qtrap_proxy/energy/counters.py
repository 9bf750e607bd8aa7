"""A backend's own token counters: the work every client did on its GPUs, not only this proxy's.

Several proxy replicas in front of the same backend each see only the requests that reach them,
while each reads the same GPUs' energy. Without more facts each would hand a whole busy interval to
its own requests, and the fleet would count every joule once per replica. The backend knows the
total. With ``token_counters: true`` on a backend the proxy polls its ``/metrics`` and, in each
meter interval, the work the backend did beyond what this proxy's requests did is *foreign* work:
its share of the energy goes to the device's foreign bucket, not to this proxy's requests. Summed
over replicas, every joule is attributed once.

* vLLM counts ``vllm:prompt_tokens_total`` when a request's prefill completes and
  ``vllm:generation_tokens_total`` at every engine step: the backend's work in an interval is read
  from them directly.
* TGI observes ``tgi_request_input_length`` and ``tgi_request_generated_tokens`` per request (at
  its arrival and at its end), too late to say in which interval tokens were made. Its gauge
  ``tgi_batch_current_size`` (requests in the running batch) is live: in steady batched decoding
  every running request makes one token per step, so the backend's work in an interval is the
  batch size averaged over the interval times the work rate of one of this proxy's requests in
  it (the last such rate when none of this proxy's requests runs). The token sums are reported.

A poll's sample is stamped at the midpoint of the request and its response; counters between
samples are interpolated linearly, the gauge holds its value until the next sample. The backend's
view and the proxy's token timeline see the same work a few milliseconds apart and, for a prefill,
at different moments (the proxy spreads it over the time to the first token, vLLM counts it when it
completes), and interpolation spreads tokens over the poll period: in one interval the backend may
show less than the proxy saw, or a fraction of a token after the proxy's last request ended.
``ForeignLedger`` carries such differences forward, so that over time foreign work is what the
backend says it is; they fade with a half-life of ``DEBT_HALF_LIFE_S`` so that a lasting
disagreement does not silence (or invent) foreign work forever.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field

import aiohttp

from qtrap_common.background import STOP_TIMEOUT_S, Background
from qtrap_proxy.redact import redact_url, redact_urls_in

log = logging.getLogger("qtrap.energy")

DEBT_HALF_LIFE_S = 5.0
MIN_FOREIGN_WORK = 1.0  # work units (one decode token): less foreign work than this in an interval waits
KEEP_S = 120.0  # samples older than this (behind the newest) are dropped

# (prompt tokens, generated tokens, requests running) series per backend kind; a value is the sum over its
# label sets
SERIES: dict[str, tuple[str, str, str]] = {
    "vllm": ("vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_requests_running"),
    "tgi": ("tgi_request_input_length_sum", "tgi_request_generated_tokens_sum", "tgi_batch_current_size"),
}
DEFAULT_RATE = 20.0  # work units per second of one running request, until one of this proxy's is seen


@dataclass(slots=True)
class Sample:
    t: float
    prompt: float
    generated: float
    running: float = 0.0


def _sample_t(s: Sample) -> float:
    return s.t


@dataclass(slots=True)
class TokenCounter:
    """One backend's cumulative token counters, as polled."""

    backend: str
    kind: str
    url: str
    samples: deque[Sample] = field(default_factory=deque)
    up: bool = False
    error: str | None = "no reading yet"
    polls: int = 0
    resets: int = 0
    rate: float = DEFAULT_RATE  # running-batch timing: work per second of one running request, last seen
    # offsets added after a counter reset (a backend restart), so that the series stays cumulative
    _base_prompt: float = 0.0
    _base_generated: float = 0.0
    _raw_last: tuple[float, float] | None = None

    @property
    def by_batch(self) -> bool:
        """Whether the work in an interval comes from the running batch's size (TGI), not the token counters."""
        return self.kind == "tgi"

    def add(self, t: float, prompt: float, generated: float, running: float = 0.0) -> None:
        """A polled value of the backend's own counters at time ``t``."""
        if self._raw_last is not None and (prompt < self._raw_last[0] or generated < self._raw_last[1]):
            # the backend restarted: continue from where the series was (work in the gap is lost)
            self.resets += 1
            last = self.samples[-1]
            self._base_prompt, self._base_generated = last.prompt, last.generated
        self._raw_last = (prompt, generated)
        if self.samples and t <= self.samples[-1].t:
            return
        self.samples.append(Sample(t, self._base_prompt + prompt, self._base_generated + generated, running))
        while len(self.samples) > 2 and self.samples[1].t < t - KEEP_S:
            self.samples.popleft()
        self.polls += 1

    def covers(self, t: float) -> bool:
        """Whether a sample at or after ``t`` exists (the work up to ``t`` is known)."""
        return bool(self.samples) and self.samples[-1].t >= t

    def work(self, t0: float, t1: float, prefill_weight: float) -> float | None:
        """Work units (generated + prefill_weight x prompt tokens) the backend did in (t0, t1], or None
        where the samples do not cover the interval."""
        if len(self.samples) < 2 or self.samples[0].t > t0 or self.samples[-1].t < t1:
            return None
        p0, g0 = self._at(t0)
        p1, g1 = self._at(t1)
        return max(0.0, (g1 - g0) + prefill_weight * (p1 - p0))

    def running(self, t0: float, t1: float) -> float | None:
        """Requests in the running batch, averaged over (t0, t1]; each sample's value holds until the next."""
        s = self.samples
        if len(s) < 2 or s[0].t > t0 or s[-1].t < t1 or t1 <= t0:
            return None
        total = 0.0
        i = self._index_le(t0)
        while i + 1 < len(s) and s[i].t < t1:
            lo, hi = max(s[i].t, t0), min(s[i + 1].t, t1)
            if hi > lo:
                total += s[i].running * (hi - lo)
            i += 1
        return total / (t1 - t0)

    def _index_le(self, t: float) -> int:
        """Index of the last sample at or before ``t`` (0 when none is)."""
        return max(0, bisect.bisect_right(self.samples, t, key=_sample_t) - 1)

    def _at(self, t: float) -> tuple[float, float]:
        s = self.samples
        lo = self._index_le(t)
        hi = min(lo + 1, len(s) - 1)
        a, b = s[lo], s[hi]
        if b.t <= a.t or t <= a.t:
            return a.prompt, a.generated
        if t >= b.t:
            return b.prompt, b.generated
        f = (t - a.t) / (b.t - a.t)
        return a.prompt + f * (b.prompt - a.prompt), a.generated + f * (b.generated - a.generated)


@dataclass(slots=True)
class ForeignLedger:
    """Per device and backend: the backend's work beyond this proxy's, interval by interval.

    The balance carries what the two views have not yet agreed on: a shortfall (the proxy saw work the
    counters show later) is paid off by later foreign work, and a residue below ``MIN_FOREIGN_WORK``
    (interpolation spreading the last tokens of this proxy's own requests past their end) waits
    rather than making a whole interval busy for a fraction of a token. The balance fades with a
    half-life of ``DEBT_HALF_LIFE_S``."""

    balance: float = 0.0
    t: float | None = None

    def foreign(self, t1: float, backend_work: float, own_work: float) -> float:
        if self.t is not None and self.balance != 0.0:
            self.balance *= math.pow(0.5, max(0.0, t1 - self.t) / DEBT_HALF_LIFE_S)
        self.t = t1
        self.balance += backend_work - own_work
        if self.balance >= MIN_FOREIGN_WORK:
            out, self.balance = self.balance, 0.0
            return out
        return 0.0


def parse_counters(text: str, kind: str) -> tuple[float, float, float]:
    """(prompt tokens, generated tokens, requests running) from a Prometheus text page: each the sum of its
    series. Only those series' lines are looked at (a vLLM page holds hundreds of histogram lines)."""
    names = SERIES[kind]
    totals = [0.0, 0.0, 0.0]
    seen = [False, False, False]
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        for i, name in enumerate(names):
            if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
                try:
                    rest = line.rsplit("}", 1)[1] if line[len(name)] == "{" else line[len(name) :]
                    value = float(rest.split()[0])
                except (ValueError, IndexError):
                    raise ValueError(f"cannot read {name}: {line[:120]!r}") from None
                totals[i] += value
                seen[i] = True
    missing = [n for n, s in zip(names, seen, strict=True) if not s]
    if missing:
        raise ValueError("no " + " or ".join(missing) + " on the page")
    return totals[0], totals[1], totals[2]


class CounterPoller(Background):
    """Polls each counted backend's ``/metrics`` every ``interval_s``."""

    task_name = "qtrap-token-counters"

    def __init__(self, counters: list[TokenCounter], interval_s: float, timeout_s: float = 2.0) -> None:
        self.counters = counters
        self.interval_s = interval_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self.first_round = asyncio.Event()  # set once every counter has been polled once (read or not)

    async def _run(self) -> None:
        while True:
            t_next = time.monotonic() + self.interval_s
            await self.poll_once()
            self.first_round.set()
            await asyncio.sleep(max(0.0, t_next - time.monotonic()))

    async def poll_once(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        await asyncio.gather(*(self._poll(c) for c in self.counters))

    async def _poll(self, c: TokenCounter) -> None:
        assert self._session is not None
        t_send = time.monotonic()
        try:
            async with self._session.get(c.url) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                text = await resp.text()
            t_recv = time.monotonic()
            prompt, generated, running = parse_counters(text, c.kind)
        except (aiohttp.ClientError, TimeoutError, ValueError, UnicodeDecodeError) as e:
            if c.up:
                log.warning("token counters of %s unreadable: %s", c.backend, redact_urls_in(str(e)))
            where = redact_url(c.url)
            c.up, c.error = (
                False,
                redact_urls_in(
                    f"{where}: {type(e).__name__}: {e}" if str(e) else f"{where}: {type(e).__name__}"
                ),
            )
            return
        if not c.up:
            log.info("token counters of %s are up", c.backend)
        c.up, c.error = True, None
        c.add(t_send + (t_recv - t_send) / 2, prompt, generated, running)

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> bool:
        """Stop polling and close the session, within ``timeout_s``; True if both finished in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        ok = await super().stop(timeout_s)
        session, self._session = self._session, None
        if session is not None:
            try:
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    await session.close()
            except TimeoutError:
                log.error(
                    "closing the token counters' HTTP session took longer than %.3g s; left open", timeout_s
                )
                ok = False
        return ok
