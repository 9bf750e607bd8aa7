"""Attributing measured GPU energy to requests, interval by interval, conserving every joule.

A meter reports a device's cumulative energy at its update instants (about every
100 ms for an H100's NVML counter). Each pair of consecutive updates is an
interval [t0, t1] holding E joules. The interval is settled once the facts are
in (every overlapping request has ended, or has streamed past the interval with
its prompt size known), or at the latest ``settle_s`` after it:

1. The part of the interval no request was in flight on the device goes to the
   device's idle bucket, at the device's idle power (configured, or learned from
   intervals with nothing in flight; in proportion to time until then); the
   rest, E_busy, to the requests in flight.
2. E_busy is split by work done in the interval (the work model), counted in
   rows through the model's layers:
   * decode tokens from the token timeline, each chunk's tokens spread over the
     time since the request's previous chunk (when the engine produced them);
   * prefill: ``prefill_weight`` (default 0.1: a prompt token passes the layers
     once as a decoded token does, but in a batch, at a fraction of a decode
     step's cost per token) x prompt tokens, spread evenly over the time
     from the request's start to its first chunk;
   * a non-streaming request's tokens, spread evenly over its duration once its
     usage is known;
   * a request whose work in the interval is unknown counts its time in flight at
     the average work rate of the requests whose work is known (pure time share
     when none is known).
   In steady batched decoding every request emits one token per step, so this is
   an equal share per step of the batch; a long prefill, during which the others
   wait, is paid by the request that brought it.
3. Policy ``full``: E_busy is split as it is, so a request's J/token is what the
   GPU really cost while it ran. Policy ``active``: the idle power times the busy
   time is taken out first and goes to the idle bucket (each request's part of it
   is reported as its ``idle_energy_j``).

4. Backends with ``token_counters: true`` (several proxy replicas, or other clients, in front of
   the same backend): the backend's own token counters give the work it did for everyone in the
   interval; what exceeds this proxy's requests' work on it is foreign work (counters.py), which
   takes its share of E_busy into the device's foreign bucket, and the interval counts as busy
   throughout. An interval also waits for the counters to cover it.

A request is final once the interval containing its end is settled. Its error
bound is the energy another work model could move: in each interval it shared,
min(its share, the others' share). Conservation holds by construction:
attributed + idle + foreign = measured over settled intervals, up to float rounding.

5. With an ``observer`` (routing by cost), each settled busy interval without foreign work, once the
   device's idle power is known (configured, or learnt from 10 idle intervals; a device never idle that
   long borrows the median of the other devices' ``idle_fallback_w``), tells it per backend: the mean requests in flight, the backend's share
   (by the split's weights) of the energy above idle power, and the output tokens it made.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from qtrap_proxy.energy import reasons
from qtrap_proxy.energy.counters import ForeignLedger, TokenCounter
from qtrap_proxy.energy.facts import EngineTimes
from qtrap_proxy.timeline import Timeline

Policy = Literal["full", "active"]
WorkModel = Literal["rows", "shared"]


class SharedFitEstimate(NamedTuple):
    """What the shared work model has learnt of a device."""

    shared_power_w: float  # the part shared by whatever runs, per busy second
    prefill_row_j: float  # energy of one prompt row through the linear layers
    decode_row_j: tuple[float, ...]  # of one decoded token, by the batch it was made in (DECODE_BATCH_EDGES)
    kv_read_j: float  # of one KV-cache token read by attention, beyond the busy time it adds
    # busy seconds one KV read and one prefilled row add to a step (the busy-time fit, shrunk by its standard
    # error toward 0 where the meter's data do not tell it apart from the steps and the decoded tokens)
    kv_read_s: float = 0.0
    prefill_row_s: float = 0.0

    def decode_row_at(self, batch: float) -> float:
        return self.decode_row_j[decode_bucket(batch)]


# the most of an interval's busy time the shared model gives to the KV reads and prefilled rows that added it
MAX_MOVED = 0.95

# decoded rows' buckets by the mean number of requests running in the interval: 1, 2-3, 4-7, 8 or more
DECODE_BATCH_EDGES = (1.5, 3.5, 7.5)


def decode_bucket(batch: float) -> int:
    return bisect.bisect_right(DECODE_BATCH_EDGES, batch)


class _NormalEquations:
    """Running sums of x x', x y and y^2 for a least-squares fit without intercept, older rows fading by the
    ``forget`` each new row brings; solved for non-negative coefficients, with their standard errors."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.n = 0
        self.weight = 0.0  # the faded count of rows
        self.s = [[0.0] * k for _ in range(k)]
        self.c = [0.0] * k
        self.yy = 0.0
        self.seen = [0.0] * k  # the faded count of rows where each x was not 0

    def add(self, x: list[float], y: float, forget: float) -> None:
        """One row; what came before fades by ``forget``."""
        lam, s, c = forget, self.s, self.c
        for i in range(self.k):
            xi = x[i]
            c[i] = lam * c[i] + xi * y
            row = s[i]
            for j in range(self.k):
                row[j] = lam * row[j] + xi * x[j]
            self.seen[i] = lam * self.seen[i] + (1.0 if xi != 0 else 0.0)
        self.yy = lam * self.yy + y * y
        self.weight = lam * self.weight + 1.0
        self.n += 1

    def solve(self) -> list[float] | None:
        return _nnls_normal(self.s, self.c)

    def standard_errors(self, b: list[float]) -> list[float]:
        """Each positive coefficient's standard error (the residual variance times the diagonal of the inverse
        normal matrix over the positive ones); 0 for those at zero, inf where that matrix is singular."""
        act = [i for i in range(self.k) if b[i] > 0]
        out = [0.0] * self.k
        if not act:
            return out
        rss = self.yy - 2 * sum(b[i] * self.c[i] for i in act)
        rss += sum(b[i] * self.s[i][j] * b[j] for i in act for j in act)
        var = max(0.0, rss) / max(1.0, self.weight - len(act))
        m = [[self.s[i][j] for j in act] for i in act]
        for pos, i in enumerate(act):
            unit = [1.0 if q == pos else 0.0 for q in range(len(act))]
            col = _solve(m, unit)
            out[i] = math.inf if col is None else math.sqrt(var * max(0.0, col[pos]))
        return out


class SharedRowsFit:
    """Online non-negative least squares, without intercept, of a device's busy energy per interval
    against what the requests did in it: E ~ p * busy_s + e_p * prefill_rows + e_d[b] * decode_rows
    + a * kv_reads. ``p`` is the power shared by whatever runs (weights streamed once per step,
    fixed overheads; W), ``e_p`` the energy of one prompt row through the linear layers, ``e_d[b]`` that of
    one decoded token made while the interval's mean batch (requests running) was in bucket ``b``
    (``DECODE_BATCH_EDGES``: a row's marginal energy is near zero while a step streams the weights and grows
    once it computes, so one per-row figure over all batches is a compromise that, where rows, reads and busy
    time move together, collapses onto busy time alone), ``a`` the energy of one KV-cache token read by
    attention (J). None of them may be negative (Lawson-Hanson's active set on the normal equations).
    Older intervals fade with the busy time since (``MEMORY_S``: e^(-t / 50 s), about 500 intervals at
    NVML's pace; a fit whose memory were counted in intervals would forget five times faster on a meter
    five times finer, and hold less than one load level).

    Busy seconds are a regressor, so the energy of the time a KV read or a prefilled row adds to a step is in
    ``p``, not in ``a`` or ``e_p``. A second fit, of each interval's busy seconds on its engine steps (the
    decoded tokens over the mean batch), its decoded tokens by batch bucket, its KV reads and its prefilled
    rows (``TIME_MEMORY_S``: longer, as a kernel's timing does not drift), says how much time a read and a
    prefilled row add, so the split can give that time's energy to whoever read or prefilled. Each is shrunk
    toward 0 by its standard error (b * b^2 / (b^2 + se^2)): where the reads move with the steps and decoded
    tokens the meter's data cannot say, and nothing is moved; and neither is used before reads (prompt rows)
    were seen in ``MIN_INTERVALS`` intervals."""

    MEMORY_S = 50.0
    TIME_MEMORY_S = 200.0
    DEFAULT_INTERVAL_S = 0.1  # an interval's length where the caller does not say (NVML's pace)
    MIN_INTERVALS = 20
    K = 3 + len(DECODE_BATCH_EDGES) + 1  # busy, prefill rows, decode rows by bucket, KV reads
    # time fit: steps, decode rows by bucket, KV reads, prefill rows
    KT = 1 + len(DECODE_BATCH_EDGES) + 1 + 2

    def __init__(self) -> None:
        self.energy = _NormalEquations(self.K)
        self.time = _NormalEquations(self.KT)
        self._cached: tuple[int, SharedFitEstimate | None] | None = None

    @property
    def n(self) -> int:
        return self.energy.n

    @classmethod
    def features(
        cls, busy_s: float, rows: float, kv_reads: float, decode_rows: float, batch: float
    ) -> list[float]:
        x = [0.0] * cls.K
        x[0], x[1], x[-1] = busy_s, max(0.0, rows - decode_rows), kv_reads
        x[2 + decode_bucket(batch)] = decode_rows
        return x

    @classmethod
    def time_features(cls, rows: float, kv_reads: float, decode_rows: float, batch: float) -> list[float]:
        x = [0.0] * cls.KT
        x[0] = decode_rows / batch  # engine steps: every running request decodes one token per step
        x[1 + decode_bucket(batch)] = decode_rows
        x[-2], x[-1] = kv_reads, max(0.0, rows - decode_rows)
        return x

    def add(
        self,
        busy_s: float,
        rows: float,
        energy_j: float,
        kv_reads: float = 0.0,
        decode_rows: float = 0.0,
        batch: float = 1.0,
        interval_s: float | None = None,
    ) -> None:
        """One busy interval: its busy seconds, its rows (prompt and decoded; ``decode_rows`` of them
        decoded, made at a mean ``batch`` of requests running), its energy, its KV reads and its length."""
        dt = self.DEFAULT_INTERVAL_S if interval_s is None else max(0.0, interval_s)
        self.energy.add(
            self.features(busy_s, rows, kv_reads, decode_rows, batch), energy_j, math.exp(-dt / self.MEMORY_S)
        )
        if decode_rows > 0 and batch > 0:
            self.time.add(
                self.time_features(rows, kv_reads, decode_rows, batch),
                busy_s,
                math.exp(-dt / self.TIME_MEMORY_S),
            )

    def estimate(self) -> SharedFitEstimate | None:
        """What the fit says, or None before ``MIN_INTERVALS`` intervals."""
        if self.n < self.MIN_INTERVALS or self.energy.s[0][0] <= 0:
            return None
        if self._cached is not None and self._cached[0] == self.n:
            return self._cached[1]
        b = self.energy.solve()
        est = None
        if b is not None:
            kv_s = prefill_s = 0.0
            if self.time.n >= self.MIN_INTERVALS:
                t = self.time.solve()
                if t is not None:
                    se = self.time.standard_errors(t)
                    # a time seen in fewer than MIN_INTERVALS intervals is one interval's noise, not a fact
                    kv_s, prefill_s = (
                        _shrunk(t[i], se[i]) if self.time.seen[i] >= self.MIN_INTERVALS else 0.0
                        for i in (-2, -1)
                    )
            est = SharedFitEstimate(b[0], b[1], tuple(b[2:-1]), b[-1], kv_s, prefill_s)
        self._cached = (self.n, est)
        return est


def _shrunk(b: float, se: float) -> float:
    """A coefficient shrunk toward 0 by its standard error: b^3 / (b^2 + se^2)."""
    if b <= 0 or math.isinf(se):
        return 0.0
    return b * b * b / (b * b + se * se)


def _nnls_normal(s: list[list[float]], c: list[float]) -> list[float] | None:
    """argmin over x >= 0 of x's' s x - 2 c'x (least squares given its normal equations): Lawson and Hanson's
    active set, on the problem scaled to a unit diagonal (busy seconds, rows and KV reads differ by 10^7)."""
    k = len(c)
    d = [math.sqrt(s[i][i]) if s[i][i] > 0 else 1.0 for i in range(k)]
    m = [[s[i][j] / (d[i] * d[j]) for j in range(k)] for i in range(k)]
    v = [c[i] / d[i] for i in range(k)]
    x = [0.0] * k
    active: list[int] = []  # the variables free to be positive
    barred: set[int] = set()  # singular with the active ones
    for _ in range(4 * k):
        grad = [v[i] - sum(m[i][j] * x[j] for j in range(k)) for i in range(k)]
        cand = [i for i in range(k) if i not in active and i not in barred and grad[i] > 1e-10]
        if not cand:
            break
        new = max(cand, key=lambda i: grad[i])
        active.append(new)
        for _ in range(4 * k):
            z = _solve([[m[i][j] for j in active] for i in active], [v[i] for i in active])
            if z is None:
                active.remove(new)
                barred.add(new)
                break
            if all(zi > 0 for zi in z):
                x = [0.0] * k
                for zi, i in zip(z, active, strict=True):
                    x[i] = zi
                break
            # step from x toward z until the first variable reaches zero, and drop it
            alpha = min(x[i] / (x[i] - zi) for zi, i in zip(z, active, strict=True) if zi <= 0)
            for zi, i in zip(z, active, strict=True):
                x[i] += alpha * (zi - x[i])
            active = [i for i in active if x[i] > 1e-14]
            x = [x[i] if i in active else 0.0 for i in range(k)]
            if not active:
                break
    if not any(xi > 0 for xi in x):
        return None
    return [x[i] / d[i] for i in range(k)]


def _solve(m: list[list[float]], v: list[float]) -> list[float] | None:
    """m x = v by Gaussian elimination with partial pivoting; None when m is (nearly) singular."""
    n = len(v)
    a = [[*row, rhs] for row, rhs in zip(m, v, strict=True)]
    scale = max((abs(x) for row in m for x in row), default=0.0)
    if scale <= 0:
        return None
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[piv][col]) <= 1e-12 * scale:
            return None
        a[col], a[piv] = a[piv], a[col]
        for r in range(n):
            if r != col:
                f = a[r][col] / a[col][col]
                for k in range(col, n + 1):
                    a[r][k] -= f * a[col][k]
    return [a[i][n] / a[i][i] for i in range(n)]


@dataclass(slots=True, eq=False)
class Tracked:
    """A request's energy account on the devices it runs on."""

    tl: Timeline
    devices: int = 1
    hop_split: bool = False
    energy_j: float = 0.0
    idle_energy_j: float = 0.0
    bound_j: float = 0.0
    hop_energy_j: list[float] = field(default_factory=list)
    pending_devices: int = 0  # devices whose interval containing the end is not settled yet
    energy_known: bool = True
    unknown_reason: str | None = None
    # the engine's own facts (facts.py): expected from its OTLP spans, placed on the proxy's clock once in
    engine: EngineTimes | None = None
    facts_expected: bool = False  # intervals that need them wait for them (at most facts_wait_s past the end)
    facts_wait_s: float = 0.0
    facts_missed: int = 0  # intervals split without them where they mattered
    facts_reason: str | None = None  # why the proxy's own view was used where facts were expected
    proxy_view_j: float = 0.0  # meter.compare_views: the energy the proxy's view alone would have given it

    @property
    def final(self) -> bool:
        return self.tl.end is not None and self.pending_devices == 0

    @property
    def facts(self) -> str:
        """``engine`` when the engine's facts placed this request's work in every interval where they
        mattered, else ``proxy`` (the proxy's own view: arrival to first chunk, or the whole duration)."""
        return "engine" if self.engine is not None and self.facts_missed == 0 else "proxy"

    def awaiting_facts(self, now: float) -> bool:
        """Whether the engine's facts are expected and not in yet (giving up ``facts_wait_s`` after the end)."""
        if not self.facts_expected or self.engine is not None:
            return False
        end = self.tl.end
        if end is not None and now > end + self.facts_wait_s:
            self.facts_expected = False
            self.facts_reason = self.facts_reason or reasons.FACTS_NEVER_CAME
            return False
        return True

    def needs_facts(self, t0: float) -> bool:
        """Whether the engine's facts place this request's work in an interval starting at ``t0``: before
        a stream's first chunk (its queue and its prefill are told apart only by them), anywhere in a
        non-streaming request (which shows no timing at all)."""
        tl = self.tl
        return not tl.stream or not tl.chunk_t or t0 < tl.chunk_t[0]

    def facts_in(self, t0: float, t1: float, now: float) -> bool:
        """Whether what this request did in (t0, t1] is known: its timeline says so (it has ended, or a
        stream has passed t1 with its prompt size known) and, where they matter, the engine's facts are in."""
        tl = self.tl
        if self.facts_expected and self.awaiting_facts(now) and self.needs_facts(t0):
            return False
        if tl.end is not None:
            return True
        return tl.stream and tl.prompt_tokens is not None and bool(tl.chunk_t) and tl.chunk_t[-1] > t1

    def work(self, t0: float, t1: float, prefill_weight: float) -> float | None:
        """Work units done in (t0, t1], or None where the timeline cannot say."""
        if self.engine is not None:
            return self._engine_work(self.engine, t0, t1, prefill_weight)
        return self.proxy_work(t0, t1, prefill_weight)

    def proxy_work(self, t0: float, t1: float, prefill_weight: float) -> float | None:
        """Work in (t0, t1] as the proxy alone sees it (its token timeline, no engine facts)."""
        tl = self.tl
        start, end = tl.start, tl.end
        lo, hi = max(t0, start), min(t1, end if end is not None else t1)
        if hi <= lo:
            return 0.0
        if not tl.stream:  # one answer at the end: spread its tokens evenly once they are known
            if end is None or tl.completion_tokens is None:
                return None
            total = tl.completion_tokens + prefill_weight * (tl.prefilled(tl.prompt_tokens) or 0)
            return total * (hi - lo) / max(end - start, 1e-9)
        times = tl.chunk_t
        first = times[0] if times else None
        w = 0.0
        if times:
            w += _decode_work(times, tl.chunk_tokens, t0, t1)
        prefill_end = first if first is not None else (end if end is not None else t1)
        p_lo, p_hi = max(t0, start), min(t1, prefill_end)
        if p_hi > p_lo:
            prefilled = tl.prefilled(tl.prompt_tokens)
            if first is None or prefilled is None:
                return None  # prefilling a prompt of unknown size
            w += prefill_weight * prefilled * (p_hi - p_lo) / max(first - start, 1e-9)
        return w

    def _engine_work(self, e: EngineTimes, t0: float, t1: float, prefill_weight: float) -> float | None:
        """Work in (t0, t1] where the engine said when each phase ran: none while queued; the prompt's rows
        over its prefill; a stream's tokens by its chunks, a non-streaming answer's evenly over its decode.
        Without a first-token time (TGI) all its rows are spread over its inference."""
        tl = self.tl
        lo, hi = max(t0, tl.start), min(t1, tl.end if tl.end is not None else t1)
        if hi <= lo:
            return 0.0
        prompt = tl.prefilled(e.prompt_tokens if e.prompt_tokens is not None else tl.prompt_tokens)
        generated = e.completion_tokens if e.completion_tokens is not None else tl.completion_tokens
        if e.first_token is None:
            if prompt is None or generated is None:
                return None
            return _spread(prefill_weight * prompt + generated, e.prefill_start, e.last_token, t0, t1)
        w = 0.0
        in_prefill = _spread(1.0, e.prefill_start, e.first_token, t0, t1)  # its share of the prefill
        if in_prefill > 0:
            if prompt is None:
                return None
            w += prefill_weight * prompt * in_prefill
        if tl.stream and tl.chunk_t:
            w += _decode_work(tl.chunk_t, tl.chunk_tokens, t0, t1)
        elif t1 >= e.first_token:
            if generated is None:
                return None
            # the first token closes the prefill step; the others over the decode
            w += _spread(min(1, generated), e.first_token, e.first_token, t0, t1)
            w += _spread(max(0, generated - 1), e.first_token, e.last_token, t0, t1)
        return w

    def rows_and_kv(
        self, t0: float, t1: float, engine_view: bool = True
    ) -> tuple[float, float, float] | None:
        """Rows this request put through the model in (t0, t1] (prompt and decoded tokens alike), the
        KV-cache tokens its attention read (its prefill the prompt once: prompt tokens its engine's prefix
        cache held are read but are no rows; each decoded token its context: prompt plus the tokens
        generated before it) and how many of the rows were decoded tokens. None where its work is unknown."""
        work = self.work if engine_view else self.proxy_work
        decode = work(t0, t1, 0.0)
        rows = work(t0, t1, 1.0)
        if decode is None or rows is None:
            return None
        tl = self.tl
        e = self.engine if engine_view else None
        prompt = (e.prompt_tokens if e is not None else None) or tl.prompt_tokens or 0
        if tl.stream:  # chunks before t0 at the request's mean tokens per chunk (no per-chunk sums)
            n = len(tl.chunk_t)
            per_chunk = tl.completion_tokens / n if tl.completion_tokens and n else 1.0
            before = bisect.bisect_right(tl.chunk_t, t0) * per_chunk
        else:
            total = (e.completion_tokens if e is not None else None) or tl.completion_tokens or 0
            lo = e.first_token if e is not None and e.first_token is not None else tl.start
            hi = e.last_token if e is not None else (tl.end if tl.end is not None else t1)
            before = total * min(1.0, max(0.0, (t0 - lo) / (hi - lo))) if hi > lo else 0.0
        # a prefill's attention reads the whole prompt once, its cached prefix included, while only the
        # uncached tokens are rows: the prompt rows' reads scaled up by prompt / prefilled
        prefilled = tl.prefilled(prompt) or 0
        reads = (rows - decode) * (prompt / prefilled if prefilled > 0 else 1.0)
        return rows, reads + decode * (prompt + before + decode / 2), decode

    def running_span(self, t0: float, t1: float, engine_view: bool = True) -> tuple[float, float]:
        """The part of (t0, t1] this request was running on the engine (empty: hi <= lo): from its prefill to
        its last token where the engine said so, else (the proxy's view) all the time it was in flight."""
        e = self.engine if engine_view else None
        tl = self.tl
        if e is not None:
            lo, hi = e.prefill_start, e.last_token
        else:
            lo, hi = tl.start, tl.end if tl.end is not None else t1
        return max(t0, lo), min(t1, hi)

    def chunk_weights(self, t0: float, t1: float) -> list[tuple[int, int]]:
        """(chunk index, tokens) of the chunks that arrived in (t0, t1]."""
        times = self.tl.chunk_t
        i = bisect.bisect_right(times, t0)
        j = bisect.bisect_right(times, t1)
        return [(k, self.tl.chunk_tokens[k]) for k in range(i, j)]


def _spread(total: float, a: float, b: float, t0: float, t1: float) -> float:
    """The part in (t0, t1] of ``total`` spread evenly over [a, b] (all of it at b when b <= a)."""
    if total == 0:
        return 0.0
    if b <= a:
        return total if t0 < b <= t1 else 0.0
    lo, hi = max(a, t0), min(b, t1)
    return total * (hi - lo) / (b - a) if hi > lo else 0.0


def _decode_work(times: list[float], tokens: list[int], t0: float, t1: float) -> float:
    """Decode tokens produced in (t0, t1]: chunk k's tokens spread evenly over (t[k-1], t[k]], the time the
    engine spent producing them (the first chunk's at its arrival: it closes the prefill). Spreading keeps a
    meter boundary that falls between two requests' chunks of one engine step from handing one of them the
    whole step."""
    n = len(times)
    i = bisect.bisect_right(times, t0)  # first chunk after t0
    if i >= n:
        return 0.0
    j = bisect.bisect_right(times, t1)  # chunks i..j-1 arrived in (t0, t1]
    w = 0.0
    for k in range(i, j):  # whole chunks, less the part of the first one before t0
        if k == 0:
            w += tokens[0]
            continue
        a, b = times[k - 1], times[k]
        w += tokens[k] * ((b - max(a, t0)) / (b - a) if b > a else 1.0)
    if j < n and j > 0:  # the chunk in progress at t1: its part after max(t0, previous chunk)
        a, b = times[j - 1], times[j]
        lo = max(a, t0)
        if t1 > lo and b > a:
            w += tokens[j] * (t1 - lo) / (b - a)
    return w


@dataclass(slots=True)
class Interval:
    t0: float
    t1: float
    energy_j: float


# (backend, device key, seconds, mean requests in flight, energy above idle J, output tokens)
OBSERVE_AFTER_IDLE = 10  # the observer hears of busy intervals once the idle power is learnt from this many
IntervalObserver = Callable[[str, str, float, float, float, float], None]


@dataclass(slots=True)
class DeviceAccount:
    """One device's intervals, the requests in flight on it, and its totals."""

    key: str
    policy: Policy = "full"
    settle_s: float = 10.0
    prefill_weight: float = 1.0
    idle_power_w: float | None = None  # for the active policy: configured, else estimated from idle intervals
    compare_views: bool = False  # also split each interval by the proxy's view alone (Tracked.proxy_view_j)
    work_model: WorkModel = "rows"
    fit: SharedRowsFit = field(default_factory=lambda: SharedRowsFit())
    measured_j: float = 0.0  # over settled intervals (what conservation is checked on)
    metered_j: float = 0.0  # everything the counter moved since the first reading, settled or not
    attributed_j: float = 0.0
    idle_j: float = 0.0
    settled_to: float | None = None  # end of the last settled interval
    first_t: float | None = None  # the meter's first reading: energy before it is unknown
    last_update_t: float | None = None
    last_counter_j: float | None = None
    updates: int = 0
    resets: int = 0
    tracked: list[Tracked] = field(default_factory=list)
    pending: deque[Interval] = field(default_factory=deque)
    busy_power_w: float | None = None  # recent power while requests were in flight (for provisional figures)
    # backends on this device whose own token counters are read (token_counters: true), by backend name
    counters: dict[str, TokenCounter] = field(default_factory=dict)
    foreign_j: float = 0.0  # energy of work the backends did for requests this proxy did not serve
    counter_gaps: int = 0  # intervals settled while a counted backend's counters did not cover them
    _foreign: dict[str, ForeignLedger] = field(default_factory=dict)
    _idle_est_w: float | None = None
    _idle_n: int = 0  # idle intervals the estimate has seen
    # the observer's idle power for a device never idle long enough to learn its own: the other devices'
    # (EnergyService.settle sets it; a backend busy without a pause would otherwise never be observed)
    idle_fallback_w: float | None = None
    # routing by cost (cost.py): told each settled busy interval's per-backend load, power and tokens
    observer: IntervalObserver | None = None

    def learnt_idle_w(self) -> float | None:
        """The idle power configured, or learnt from at least OBSERVE_AFTER_IDLE idle intervals; else None."""
        if self.idle_power_w is not None:
            return self.idle_power_w
        return self._idle_est_w if self._idle_n >= OBSERVE_AFTER_IDLE else None

    # -- requests ------------------------------------------------------------
    def track(self, tr: Tracked) -> None:
        self.tracked.append(tr)
        tr.pending_devices += 1

    # -- meter updates ---------------------------------------------------------
    def on_reading(self, t: float, counter_j: float) -> None:
        """A new counter value seen at time ``t`` (call only when the value changed)."""
        if self.last_counter_j is not None and self.last_update_t is not None:
            delta = counter_j - self.last_counter_j
            if delta < 0:  # the counter went backwards: a driver reload, never negative energy
                self.resets += 1
                delta = 0.0
            self.metered_j += delta
            self.pending.append(Interval(self.last_update_t, t, delta))
        if self.first_t is None:
            self.first_t = t
        self.last_update_t = t
        self.last_counter_j = counter_j
        self.updates += 1

    def settle(self, now: float) -> list[Tracked]:
        """Settle every interval whose facts are in; returns requests that became final."""
        done: list[Tracked] = []
        while self.pending:
            iv = self.pending[0]
            overlapping = [
                tr for tr in self.tracked if tr.tl.start < iv.t1 and (tr.tl.end is None or tr.tl.end > iv.t0)
            ]
            ready = all(tr.facts_in(iv.t0, iv.t1, now) for tr in overlapping) and all(
                c.covers(iv.t1) for c in self.counters.values() if c.up
            )
            if not ready and now >= iv.t1 + self.settle_s:  # waited long enough: split with what is known
                ready = True
                for tr in overlapping:
                    if tr.awaiting_facts(now) and tr.needs_facts(iv.t0):
                        tr.facts_missed += 1
                        tr.facts_reason = reasons.FACTS_TOO_LATE
            if not ready:
                break
            self.pending.popleft()
            self._settle_one(iv, overlapping)
            self.settled_to = iv.t1
            still: list[Tracked] = []
            for tr in self.tracked:
                if tr.tl.end is not None and tr.tl.end <= iv.t1:
                    if self.first_t is None or tr.tl.start < self.first_t:
                        tr.energy_known = False
                        tr.unknown_reason = reasons.first_reading_late(self.key)
                    tr.pending_devices -= 1
                    if tr.final:
                        done.append(tr)
                else:
                    still.append(tr)
            self.tracked = still
        return done

    def _settle_one(self, iv: Interval, overlapping: list[Tracked]) -> None:
        e = iv.energy_j
        self.measured_j += e
        dt = iv.t1 - iv.t0
        if dt <= 0:
            self.idle_j += e
            return
        # work per request; what the timeline cannot show counts time at the known requests' rate
        overlaps = [_overlap(tr.tl, iv) for tr in overlapping]
        weights = _fill_unknown([tr.work(iv.t0, iv.t1, self.prefill_weight) for tr in overlapping], overlaps)
        foreign_w = self._foreign_work(iv, overlapping, weights) if self.counters else 0.0
        if not overlapping and foreign_w <= 0:
            self.idle_j += e
            if e > 0:
                p = e / dt
                self._idle_est_w = p if self._idle_est_w is None else 0.9 * self._idle_est_w + 0.1 * p
                self._idle_n += 1
            return
        # busy: while any of this proxy's requests was in flight; the whole interval when the backend
        # worked for others too (when, within the interval, their requests ran is not known)
        busy_s = (
            dt
            if foreign_w > 0
            else _union_length(
                [
                    (max(iv.t0, tr.tl.start), min(iv.t1, tr.tl.end if tr.tl.end is not None else iv.t1))
                    for tr in overlapping
                ]
            )
        )
        # the idle part of the interval at idle power (when known), the rest is the requests'
        p_idle_known = self.idle_power_w if self.idle_power_w is not None else self._idle_est_w
        # A busy GPU draws at least its idle power, so the idle part takes at most the interval's own average
        # power: where the interval's measured length is short of the energy it holds (the counter's update
        # instant is seen up to one sampling period late) an idle estimate above that average would leave
        # nothing, and a request that ran would read 0 J.
        p_idle_here = min(p_idle_known, e / dt) if p_idle_known is not None else e / dt
        e_idle = p_idle_here * (dt - busy_s)
        e_busy = e - e_idle
        p = e / dt
        self.busy_power_w = p if self.busy_power_w is None else 0.7 * self.busy_power_w + 0.3 * p
        idle_part = 0.0
        if self.policy == "active":
            p_idle = self.idle_power_w if self.idle_power_w is not None else self._idle_est_w
            if p_idle is not None:
                idle_part = min(e_busy, p_idle * busy_s)
        self.idle_j += e_idle + idle_part
        to_split = e_busy - idle_part
        hop_weights: list[float] | None = (
            None  # the shared model's requests split their share over hops by rows
        )
        total_w = sum(weights)
        if total_w <= 0 and foreign_w <= 0:  # in flight but no work seen (queued, say): time share
            weights, total_w = overlaps, sum(overlaps)
            if total_w <= 0:
                weights, total_w = [1.0] * len(overlapping), float(len(overlapping))
        total_w += foreign_w
        foreign_share = to_split * foreign_w / total_w
        self.foreign_j += foreign_share
        if self.work_model == "shared" and foreign_w <= 0:
            shared = self._shared_split(iv, overlapping, overlaps, busy_s, e_busy, True, learn=True)
            if shared is not None:
                hop_weights, weights, total_w = weights, shared, 1.0
        if self.compare_views:
            self._proxy_view(
                iv, overlapping, overlaps, weights, total_w - foreign_w, foreign_w, to_split, busy_s
            )
        if self.observer is not None and foreign_w <= 0:
            p_obs = self.learnt_idle_w()
            if p_obs is None:
                p_obs = self.idle_fallback_w
            if p_obs is not None:
                self._observe(iv, e - p_obs * dt, overlapping, overlaps, weights, total_w)
        for i, (tr, w) in enumerate(zip(overlapping, weights, strict=True)):
            share = to_split * w / total_w
            tr.energy_j += share
            tr.idle_energy_j += idle_part * w / total_w
            tr.bound_j += min(share, to_split - share)
            self.attributed_j += share
            if tr.hop_split:
                _split_hops(tr, iv, share, w if hop_weights is None else hop_weights[i])

    def _observe(
        self,
        iv: Interval,
        dynamic_j: float,
        overlapping: list[Tracked],
        overlaps: list[float],
        weights: list[float],
        total_w: float,
    ) -> None:
        """Tell the observer each backend's mean requests in flight over the interval, its share of the
        energy above idle power (by the split's weights) and the output tokens it made in it."""
        observer = self.observer
        assert observer is not None
        dt = iv.t1 - iv.t0
        by: dict[str, list[float]] = {}
        for tr, ov, w in zip(overlapping, overlaps, weights, strict=True):
            name = tr.tl.backend
            if name is None:
                continue
            acc = by.setdefault(name, [0.0, 0.0, 0.0])
            tokens = tr.work(iv.t0, iv.t1, 0.0)
            if tokens is None or acc[2] < 0:
                acc[2] = -1.0  # a request's tokens in the interval are not known: the backend's are not
            else:
                acc[2] += tokens
            acc[0] += ov
            acc[1] += w
        for name, (ov, w, tokens) in by.items():
            if tokens >= 0:
                observer(name, self.key, dt, ov / dt, dynamic_j * w / total_w, tokens)

    def _proxy_view(
        self,
        iv: Interval,
        overlapping: list[Tracked],
        overlaps: list[float],
        weights: list[float],
        own_w: float,
        foreign_w: float,
        to_split: float,
        busy_s: float,
    ) -> None:
        """What each request would get of ``to_split`` under the proxy's view alone (same foreign work, same
        idle part): where no request here has engine facts it is the same split."""
        shared = None
        if (
            any(tr.engine is not None for tr in overlapping)
            and self.work_model == "shared"
            and foreign_w <= 0
        ):
            shared = self._shared_split(iv, overlapping, overlaps, busy_s, 0.0, False, learn=False)
        if shared is not None:
            alt, alt_w = shared, 1.0
        elif any(tr.engine is not None for tr in overlapping):
            alt = _fill_unknown(
                [tr.proxy_work(iv.t0, iv.t1, self.prefill_weight) for tr in overlapping], overlaps
            )
            alt_w = sum(alt)
            if alt_w <= 0 and foreign_w <= 0:
                alt, alt_w = overlaps, sum(overlaps)
                if alt_w <= 0:
                    alt, alt_w = [1.0] * len(overlapping), float(len(overlapping))
        else:
            alt, alt_w = weights, own_w
        total = alt_w + foreign_w
        for tr, w in zip(overlapping, alt, strict=True):
            tr.proxy_view_j += to_split * w / total

    def _shared_split(
        self,
        iv: Interval,
        overlapping: list[Tracked],
        overlaps: list[float],
        busy_s: float,
        e_busy: float,
        engine_view: bool,
        learn: bool,
    ) -> list[float] | None:
        """The ``shared`` work model: each request's fraction of the interval's busy energy. The device's
        energy while busy is learnt (SharedRowsFit) as a part proportional to busy time (weights streamed once
        per step, fixed overheads: at each moment shared equally by the requests running then), a part per
        prompt row and a part per decoded token at the interval's batch (each request's own rows), and a part
        per KV-cache read (each request's own reads); the busy time that reads and prefilled rows add (the
        busy-time fit) leaves the shared part, and their parts are the larger of the fit's figure for them and
        that time at the shared power. None until the fit has seen enough intervals to
        say how large each part is. The fractions sum to 1."""
        t0, t1 = iv.t0, iv.t1
        each = [tr.rows_and_kv(t0, t1, engine_view) for tr in overlapping]
        rows = _fill_unknown([None if b is None else b[0] for b in each], overlaps)
        kv = _fill_unknown([None if b is None else b[1] for b in each], overlaps)
        dec = _fill_unknown([None if b is None else min(b[2], b[0]) for b in each], overlaps)
        pre = [max(0.0, n - d) for n, d in zip(rows, dec, strict=True)]
        spans = [tr.running_span(t0, t1, engine_view) for tr in overlapping]
        total_pre, total_dec, total_kv = sum(pre), sum(dec), sum(kv)
        total_run = sum(max(0.0, hi - lo) for lo, hi in spans)
        batch = total_run / busy_s if busy_s > 0 else 1.0
        if learn and busy_s > 0:
            self.fit.add(busy_s, total_pre + total_dec, e_busy, total_kv, total_dec, batch, t1 - t0)
        est = self.fit.estimate()
        if est is None or total_run <= 0:
            return None
        # the time reads and prefilled rows added to the steps (at most MAX_MOVED of the busy time: the rest of
        # a step, its weights and overheads, is shared) is theirs: their part is the fit's energy for them, and
        # never less than that time at the shared power (the fit's per-read figure is the energy beyond the
        # time where the busy seconds took the time in, and the whole where they did not: the larger of the
        # two never counts the time twice)
        t_kv, t_pre = est.kv_read_s * total_kv, est.prefill_row_s * total_pre
        if t_kv + t_pre > MAX_MOVED * busy_s:
            scale = MAX_MOVED * busy_s / (t_kv + t_pre)
            t_kv, t_pre = t_kv * scale, t_pre * scale
        p = est.shared_power_w
        parts = (
            p * (busy_s - t_kv - t_pre),
            max(est.prefill_row_j * total_pre, p * t_pre),
            est.decode_row_at(batch) * total_dec,
            max(est.kv_read_j * total_kv, p * t_kv),
        )
        whole = sum(parts)
        if whole <= 0:
            return None
        f_run, f_pre, f_dec, f_kv = (x / whole for x in parts)
        # the shared part by each request's share of the time it ran: a step's shared energy goes equally to
        # the requests in it, so a request alone for part of the interval has all of that part
        share = _time_shares(spans)
        total_share = sum(share)
        return [
            f_run * r / total_share
            + (f_pre * n / total_pre if total_pre > 0 else 0.0)
            + (f_dec * d / total_dec if total_dec > 0 else 0.0)
            + (f_kv * k / total_kv if total_kv > 0 else 0.0)
            for r, n, d, k in zip(share, pre, dec, kv, strict=True)
        ]

    def _foreign_work(self, iv: Interval, overlapping: list[Tracked], weights: list[float]) -> float:
        """Work the counted backends did in the interval beyond this proxy's requests on them."""
        total = 0.0
        dt = iv.t1 - iv.t0
        for name, counter in self.counters.items():
            mine = [i for i, tr in enumerate(overlapping) if tr.tl.backend == name]
            own = sum(weights[i] for i in mine)
            if counter.by_batch:  # the running batch's size times one request's work rate
                running = counter.running(iv.t0, iv.t1)
                own_running = sum(_overlap(overlapping[i].tl, iv) for i in mine) / dt
                if own_running > 0.05 and own > 0:
                    counter.rate = own / (own_running * dt)
                backend_w = None if running is None else running * counter.rate * dt
            else:
                backend_w = counter.work(iv.t0, iv.t1, self.prefill_weight)
            if backend_w is None:
                self.counter_gaps += 1
                continue
            total += self._foreign.setdefault(name, ForeignLedger()).foreign(iv.t1, backend_w, own)
        return total

    def conservation_error_j(self) -> float:
        return self.attributed_j + self.idle_j + self.foreign_j - self.measured_j

    def conservation_error_ratio(self) -> float:
        return abs(self.conservation_error_j()) / self.measured_j if self.measured_j > 0 else 0.0


def _overlap(tl: Timeline, iv: Interval) -> float:
    return max(0.0, min(iv.t1, tl.end if tl.end is not None else iv.t1) - max(iv.t0, tl.start))


def _fill_unknown(values: list[float | None], overlaps: list[float]) -> list[float]:
    """Unknown amounts become time in flight at the known requests' average rate."""
    known_v = sum(v for v in values if v is not None)
    known_s = sum(o for v, o in zip(values, overlaps, strict=True) if v is not None)
    rate = known_v / known_s if known_v > 0 and known_s > 0 else 0.0
    return [v if v is not None else o * rate for v, o in zip(values, overlaps, strict=True)]


def _split_hops(tr: Tracked, iv: Interval, share: float, weight: float) -> None:
    """Give a request's interval share to its hops by the tokens of its chunks in the interval."""
    if weight <= 0 or share <= 0:
        return
    chunks = tr.chunk_weights(iv.t0, iv.t1)
    decode = float(sum(n for _, n in chunks))
    # whatever is not decode (prefill, unknown work) belongs to the hop in progress at the interval's start
    rest = share * max(0.0, 1.0 - decode / weight) if weight > 0 else share
    hops = tr.tl.chunk_hop or []
    _add_hop(tr, _hop_at(hops, bisect.bisect_right(tr.tl.chunk_t, iv.t0)), rest)
    if decode > 0:
        per_token = (share - rest) / decode
        for k, n in chunks:
            _add_hop(tr, hops[k] if k < len(hops) else (hops[-1] if hops else 0), per_token * n)


def _hop_at(hops: list[int], chunk_index: int) -> int:
    """The hop in progress before chunk ``chunk_index`` arrives."""
    if chunk_index == 0 or not hops:
        return 0
    return hops[min(chunk_index, len(hops)) - 1]


def _add_hop(tr: Tracked, hop: int, joules: float) -> None:
    while len(tr.hop_energy_j) <= hop:
        tr.hop_energy_j.append(0.0)
    tr.hop_energy_j[hop] += joules


def _time_shares(spans: list[tuple[float, float]]) -> list[float]:
    """Each span's integral of 1 / (spans covering t) over its own length: the time each request had to
    itself, shared equally with whoever ran beside it (empty spans, hi <= lo, get 0). They sum to the length
    of the spans' union."""
    events: list[tuple[float, int, int]] = []
    for i, (lo, hi) in enumerate(spans):
        if hi > lo:
            events.append((lo, 1, i))
            events.append((hi, -1, i))
    events.sort()
    out = [0.0] * len(spans)
    cum = 0.0  # the integral of 1 / n(t) so far
    live = 0
    last = events[0][0] if events else 0.0
    for t, kind, i in events:
        if live > 0:
            cum += (t - last) / live
        last = t
        if kind > 0:
            out[i] = -cum
            live += 1
        else:
            out[i] += cum
            live -= 1
    return out


def _union_length(spans: list[tuple[float, float]]) -> float:
    total, cur_lo, cur_hi = 0.0, -math.inf, -math.inf
    for lo, hi in sorted(spans):
        if hi <= lo:
            continue
        if lo > cur_hi:
            if cur_hi > cur_lo:
                total += cur_hi - cur_lo
            cur_lo, cur_hi = lo, hi
        else:
            cur_hi = max(cur_hi, hi)
    if cur_hi > cur_lo:
        total += cur_hi - cur_lo
    return total
