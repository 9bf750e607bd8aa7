"""Routing by cost (``pools.<name>.routing: cost``): the online cost model and the decision.

The objective is the fleet's energy per correct answer. Every replica draws its idle power whether it serves
or not, so idle power is counted once per replica, not per request: what a routing decision changes is the
power drawn above idle. A request's cost on a replica is the replica's dynamic energy per token (power above
idle over output tokens per second) at its load once the request joins it: small on a busy replica, whose
power is already spread over a large batch; the whole single-stream figure on an idle one.

The model. Per backend (replica) and per device it runs on, a curve of its dynamic power (the device's
power above its idle power, this backend's share when several share a device) and its output token rate
against its load (requests in flight), learnt from every settled meter interval (``observe_interval``,
fed by energy/attribution.py as each interval settles: seconds after the fact, not after the request
ends). Intervals fall into load buckets (costseed.bucket of the interval's rounded mean load: 1, 2-3,
4-7, ..., 256+; intervals under half a request are not used); each bucket keeps decayed means of load, power and rate, weighted by the interval's length
(an observation's weight halves every ``cost.decay_s`` seconds, so the curve follows drift). The origin (no
load, no dynamic power, no tokens) is known. The cost at load n is power over rate at n + 1, each linearly
interpolated between the curve's points (past the last point, the last point's), summed over the backend's
devices. Power over rate at one point is used rather than the slope between two (the strict marginal
cost): a slope between two noisy points is far noisier than their ratio, and under batching the two rank
replicas alike. An optional loadgen report seeds a curve per precision (costseed.read_seed; each level a
point of ``seed_n`` seconds' weight) until measured intervals arrive; a seed's power is the attributed
power, idle share included, so seeded costs read high at low load.

Final records feed the latency budgets and the counts; chain scores the live accuracy.

The decision (``CostPolicy.decide``), for a request whose precision is not pinned:

1. candidates: the pool's backends (of the route's kinds) whose precision passes the accuracy budget
   (``min_accuracy``, ``max_accuracy_loss`` against the default precision), whose last health probe
   passed and that did not fail to connect within ``down_s``, below ``max_inflight``, and whose recent
   p95 TTFT / ITL (``latency_window_s``, from 5 records on) is within ``ttft_p95_s`` / ``itl_p95_s``.
   None: the pool's default precision, round robin (``fallback``).
2. a candidate without any data (no interval, no seed) and nothing in flight is tried (``explore``).
   Slow start: a candidate with as many requests in flight as twice the highest load its curve has a
   point at, plus one, is past its measured range and takes no more while another candidate is within
   its own; when every candidate with data is past it, the one least far past it (in flight / that cap)
   takes the request (``ramp``; the cheapest of those at most twice as far past as the least): a burst of arrivals spreads instead of piling onto the backend that was
   cheapest at the load before the burst, and the curves extend as the load rises. If no candidate has
   data yet, the default precision's candidates in turn (``no_data``).
3. cost = the backend's dynamic J/token at its load plus this request / accuracy(precision), the load
   being the pool's whole load spread over the candidate's precision's replicas, or its own if higher
   (which precision is cheapest at this load; see ``decide``).
4. Backends sharing a GPU (their ``devices`` overlap): one takes a busy GPU's fresh requests at a time,
   the one with the most in flight there (the lead); another on that GPU takes them only when its cost is
   below the lead's by more than ``hysteresis``, and then the GPU's traffic moves to it as a whole. Two
   servers busy on one GPU time-slice it at two small batches for the power of one large batch. A backend
   without data is explored on a shared GPU only while the GPU is idle.
5. ``sticky_chains``: a chain whose first hop was routed keeps that precision (its cheapest candidate
   replica; ``sticky``) while one is a candidate and its cost is within ``sticky_max_ratio`` times the
   cheapest candidate's, unless that would wake an idle server on a GPU another one leads (4); beyond that
   the chain is routed afresh (a load change can make a chain's precision several times dearer than
   another).
6. The pool's current best changes only when another candidate's expected cost is lower than the best's by
   more than ``hysteresis``. With probability ``explore`` a uniformly drawn other candidate, kept with
   probability best cost / its cost (``explore``: exploration's extra energy stays about ``explore`` of
   the pool's); else Thompson sampling: the points of each candidate's curve segment drawn from
   log-normals with their means and standard errors (power and rate stay positive) and its marginal cost computed from the draws; a candidate whose draw beats
   the best's draw by more than ``hysteresis`` gets the request (``explore``), otherwise the best does
   (``cheapest``).
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from qtrap_common.wire import RequestRecord
from qtrap_proxy.config import CostConfig, ProxyConfig
from qtrap_proxy.costseed import N_BUCKETS, Seed, bucket, bucket_label
from qtrap_proxy.errors import ConfigError
from qtrap_proxy.timeline import Timeline
from qtrap_proxy.upstream import Backend

_MIN_LATENCY_SAMPLES = 5  # a latency budget acts from this many recent samples on
_TTFT_SAMPLES = 128
_ITL_SAMPLES = 256
_ITL_PER_RECORD = 8


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a request goes and why (``reason``: one of wire.ROUTE_REASONS)."""

    backend: Backend
    precision: str
    reason: str
    policy: str  # round_robin | cost


class Stat:
    """A decayed mean and variance (West's weighted update; every weight halves each ``half_life_s``)."""

    __slots__ = ("m2", "mean", "t", "w")

    def __init__(self) -> None:
        self.w = 0.0  # effective observations as of ``t``
        self.mean = 0.0
        self.m2 = 0.0  # weighted sum of squared deviations as of ``t``
        self.t = 0.0

    def add(self, x: float, now: float, half_life_s: float, weight: float = 1.0) -> None:
        if self.w > 0:
            f = 2.0 ** (-(now - self.t) / half_life_s) if now > self.t else 1.0
            self.w *= f
            self.m2 *= f
        self.t = max(now, self.t)
        self.w += weight
        delta = x - self.mean
        self.mean += delta * weight / self.w
        # never below zero: rounding in this update can leave a variance of one value at -1e-9, and a
        # negative variance is a math domain error in stderr (found with a seed of one level per bucket)
        self.m2 = max(0.0, self.m2 + weight * delta * (x - self.mean))

    def n(self, now: float, half_life_s: float) -> float:
        """The effective number of observations now."""
        if self.w <= 0:
            return 0.0
        return self.w * 2.0 ** (-(now - self.t) / half_life_s) if now > self.t else self.w

    def stderr(self, n: float) -> float:
        var = self.m2 / self.w if self.w > 0 else 0.0
        if self.w < 2:  # too few to know the spread: assume a wide one
            var = max(var, (0.5 * self.mean) ** 2)
        return math.sqrt(var / max(n, 1e-9))


RAMP_FACTOR = 2.0  # slow start: a backend takes at most this many times its highest measured load, plus one
_ACCURACY_FLOOR = 1e-3
_TABLE_LOADS = (0, 1, 3, 7, 15, 31, 63, 127)
_POINTS_TTL_S = 1.0  # a curve's points are recomputed at most this often between intervals  # GET /qtrap/v1/routing: the marginal cost at these loads
SEED_DEVICE = "seed"  # the curve a seed report fills, used until a device's own intervals arrive

# load, power W, rate tokens/s, and the log-normal spreads of power and rate (``_log_sigma``) for the draws
Point = tuple[float, float, float, float, float]


class Curve:
    """A backend's dynamic power and token rate against its load on one device (decayed, by load bucket)."""

    __slots__ = ("_cache", "load", "power", "rate", "seconds")

    def __init__(self) -> None:
        self.load = [Stat() for _ in range(N_BUCKETS)]
        self.power = [Stat() for _ in range(N_BUCKETS)]
        self.rate = [Stat() for _ in range(N_BUCKETS)]
        self.seconds = 0.0  # observed (ever)
        self._cache: tuple[float, list[Point]] | None = None  # (when, points) until the next add

    def add(self, load: float, power_w: float, rate: float, now: float, half_life_s: float, w: float) -> None:
        """An interval of ``w`` seconds; one with under half a request in flight on average (mostly idle:
        its power above idle is within the idle estimate's noise) adds nothing."""
        if load < 0.5:
            return
        b = bucket(int(load + 0.5))
        self._cache = None
        self.load[b].add(load, now, half_life_s, w)
        self.power[b].add(power_w, now, half_life_s, w)
        self.rate[b].add(rate, now, half_life_s, w)
        self.seconds += w

    def points(self, now: float, half_life_s: float) -> list[Point]:
        """The curve's points by load, the origin first (known exactly). Kept until the next interval or
        for _POINTS_TTL_S: the means move only with new intervals, the standard errors slowly with decay."""
        cached = self._cache
        if cached is not None and now - cached[0] < _POINTS_TTL_S:
            return cached[1]
        pts: list[Point] = [(0.0, 0.0, 0.0, 0.0, 0.0)]
        for b in range(N_BUCKETS):
            ls = self.load[b]
            if ls.w <= 0:
                continue
            n = ls.n(now, half_life_s)
            p, r = self.power[b], self.rate[b]
            pts.append(
                (ls.mean, p.mean, r.mean, _log_sigma(p.mean, p.stderr(n)), _log_sigma(r.mean, r.stderr(n)))
            )
        self._cache = (now, pts)
        return pts


def bracket(points: list[Point], load: float) -> tuple[int, int, float]:
    """The two curve points ``load`` lies between and its weight on the second (linear interpolation);
    past the last point, the last point alone (weight 1 on it)."""
    for j in range(1, len(points)):
        if points[j][0] >= load:
            l0, l1 = points[j - 1][0], points[j][0]
            return j - 1, j, (load - l0) / (l1 - l0) if l1 > l0 else 1.0
    last = len(points) - 1
    return last, last, 1.0


def _log_sigma(mean: float, stderr: float) -> float:
    """The spread (sigma of the logarithm) of the log-normal with this mean and standard error; 0 where the
    mean is at or below zero or the error is 0 (``_draw`` then keeps the mean)."""
    if mean <= 0 or stderr <= 0:
        return 0.0
    return math.sqrt(math.log1p((stderr / mean) ** 2))


def _draw(mean: float, sigma: float, gauss: Callable[[], float]) -> float:
    """A draw of a positive quantity (power above idle, a token rate) from the log-normal with its mean and
    spread ``sigma`` (``_log_sigma`` of its standard error): never zero or negative, so a point measured for
    a second or two (a wide spread) cannot draw a free replica (a normal draw clipped at zero power made a
    replica measured for half a second cost nothing in one draw in thirteen, and an idle dear replica took a
    share of every burst). A mean at or below zero, or no spread, is kept as it is."""
    if sigma <= 0:
        return mean
    return mean * math.exp(sigma * (gauss() - 0.5 * sigma))


class BackendState:
    """One backend's cost curves and recent latencies."""

    __slots__ = (
        "_measured",
        "backend",
        "curves",
        "devices",
        "itl",
        "itl_p95",
        "latency_t",
        "observed",
        "peers",
        "precision",
        "ttft",
        "ttft_p95",
    )

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.precision = backend.precision
        self.devices = frozenset((d.host, d.index) for d in backend.cfg.devices)  # the GPUs it runs on
        self.peers: tuple[BackendState, ...] = ()  # the pool's other backends on any of those GPUs
        self.curves: dict[str, Curve] = {}  # device key (or SEED_DEVICE) -> its curve
        self.observed = 0  # final ok records observed (ever)
        self.ttft: deque[tuple[float, float]] = deque(maxlen=_TTFT_SAMPLES)
        self.itl: deque[tuple[float, float]] = deque(maxlen=_ITL_SAMPLES)
        self.ttft_p95: float | None = None
        self.itl_p95: float | None = None
        self.latency_t = -math.inf  # when the last latency sample came
        self._measured: list[Curve] | None = None  # measured()'s answer until a curve changes

    @property
    def seeded(self) -> bool:
        return SEED_DEVICE in self.curves

    def measured(self) -> list[Curve]:
        """The curves of the devices measured so far; the seed's until there is one."""
        found = self._measured
        if found is None:
            found = [c for k, c in self.curves.items() if k != SEED_DEVICE and c.seconds > 0]
            if not found:
                seed = self.curves.get(SEED_DEVICE)
                found = [seed] if seed is not None else []
            self._measured = found
        return found

    def changed(self) -> None:
        """A curve was added or observed: ``measured`` looks again."""
        self._measured = None

    @property
    def has_data(self) -> bool:
        return bool(self.measured())

    def measured_load(self, now: float, half_life_s: float) -> float:
        """The highest load its curves have a point at (slow start: see ``CostPolicy.decide``)."""
        return max((c.points(now, half_life_s)[-1][0] for c in self.measured()), default=0.0)

    def cost(
        self, load: int, now: float, half_life_s: float, gauss: Callable[[], float] | None = None
    ) -> float:
        """Dynamic J/token with one more request than ``load`` in flight: the curve's power over its token
        rate at load + 1 (interpolated between its points; past the last point, the last point's),
        summed over the backend's devices. With ``gauss`` (a standard normal draw), from a draw of the
        points (Thompson sampling). inf for a backend without data."""
        curves = self.measured()
        if not curves:
            return math.inf
        total = 0.0
        for c in curves:
            pts = c.points(now, half_life_s)
            if len(pts) < 2:
                return math.inf
            i, j, f = bracket(pts, load + 1.0)
            (_, p0, x0, sp0, sx0), (_, p1, x1, sp1, sx1) = pts[i], pts[j]
            if gauss is not None:
                p0, x0 = _draw(p0, sp0, gauss), _draw(x0, sx0, gauss)
                if j != i:
                    p1, x1 = _draw(p1, sp1, gauss), _draw(x1, sx1, gauss)
                else:
                    p1, x1 = p0, x0
            power = (1 - f) * p0 + f * p1
            rate = (1 - f) * x0 + f * x1
            if rate <= 0:
                return math.inf if gauss is None else 1e12
            total += max(power, 0.0) / rate
        return total


def _second_on_a_busy_gpu(known: list[BackendState], costs: list[float], hysteresis: float) -> set[int]:
    """The candidates (indices into ``known``) that may not take a fresh request because another backend on
    one of their GPUs is busy and leads there. Several servers on one GPU do not add capacity: their batches
    time-slice it, each at its own small batch, for about the power of one large batch (on real vLLM, three
    precisions on one H100 split between two made 1.7x the energy per token of the best alone). So a shared
    GPU's traffic goes to one backend at a time, the one with the most requests in flight (the lead); another
    backend there takes fresh requests only when its cost at the load it would carry is below the lead's by
    more than ``hysteresis``: then the GPU's traffic moves to it as a whole (it becomes the lead as its
    load grows and the old lead drains). A lead that is not a candidate (down, full, over a latency budget)
    blocks nothing."""
    index = {id(s): i for i, s in enumerate(known)}
    blocked: set[int] = set()
    for i, s in enumerate(known):
        if not s.peers:
            continue
        mine = s.backend.inflight
        lead = max(s.peers, key=lambda o: o.backend.inflight)
        if lead.backend.inflight <= mine:
            continue  # it leads its GPU (or the GPU is idle)
        j = index.get(id(lead))
        if j is None or costs[i] < costs[j] * (1.0 - hysteresis):
            continue
        blocked.add(i)
    return blocked


def _p95(samples: deque[tuple[float, float]], since: float) -> float | None:
    """The p95 of the samples since ``since``; None below _MIN_LATENCY_SAMPLES of them."""
    values = sorted(v for t, v in samples if t >= since)
    if len(values) < _MIN_LATENCY_SAMPLES:
        return None
    return values[math.ceil(0.95 * len(values)) - 1]


class PoolState:
    def __init__(self, name: str, cfg: CostConfig, default_precision: str, backends: list[Backend]) -> None:
        self.name = name
        self.cfg = cfg
        self.default_precision = default_precision
        self.states = [BackendState(b) for b in backends]
        for s in self.states:
            s.peers = tuple(o for o in self.states if o is not s and o.devices & s.devices)
        self.by_name = {s.backend.name: s for s in self.states}
        self.precisions = sorted({s.precision for s in self.states})
        self.best: BackendState | None = None
        self.chains: OrderedDict[str, str] = OrderedDict()  # chain id -> precision (LRU)
        self.scores: dict[str, list[int]] = {p: [0, 0] for p in self.precisions}  # [correct, scored]
        self.accuracy: dict[str, tuple[float, str]] = {}
        self.allowed: frozenset[str] = frozenset()
        self.turn: Iterator[int] = itertools.count()
        self.refresh_accuracy()

    def refresh_accuracy(self) -> None:
        cfg = self.cfg
        acc: dict[str, tuple[float, str]] = {}
        for p in self.precisions:
            if p in cfg.accuracy:
                acc[p] = (cfg.accuracy[p], "config")
            elif self.scores[p][1] >= cfg.min_scored:
                correct, scored = self.scores[p]
                acc[p] = (max(correct / scored, _ACCURACY_FLOOR), "scores")
            else:
                acc[p] = (1.0, "default")
        self.accuracy = acc
        base = acc[self.default_precision][0]
        self.allowed = frozenset(
            p
            for p, (a, _) in acc.items()
            if (cfg.min_accuracy is None or a >= cfg.min_accuracy)
            and (cfg.max_accuracy_loss is None or base - a <= cfg.max_accuracy_loss + 1e-12)
        )

    def remember(self, chain_id: str | None, precision: str) -> None:
        if chain_id is None or not self.cfg.sticky_chains:
            return
        chains = self.chains
        chains[chain_id] = precision
        chains.move_to_end(chain_id)
        if len(chains) > self.cfg.sticky_max:
            chains.popitem(last=False)


class CostPolicy:
    """The cost model and decisions of every pool with ``routing: cost``."""

    def __init__(
        self,
        config: ProxyConfig,
        pools: Mapping[str, Mapping[str, list[Backend]]],
        seeds: Mapping[str, Seed] | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rng = rng if rng is not None else random.Random()
        self.clock = clock
        self.pools: dict[str, PoolState] = {}
        for name, by_precision in pools.items():
            pc = config.pools.get(name)
            if pc is None or pc.routing != "cost":
                continue
            backends = [b for bs in by_precision.values() for b in bs]
            ps = PoolState(name, pc.cost, config.default_precision(name), backends)
            self.pools[name] = ps
            seed = (seeds or {}).get(name)
            if seed is not None:
                self._seed(ps, seed)
        self._backends = {s.backend.name: (ps, s) for ps in self.pools.values() for s in ps.states}

    def _seed(self, ps: PoolState, seed: Seed) -> None:
        levels = [lv for lv in seed.levels if lv.precision in ps.precisions]
        if not levels:
            raise ConfigError(
                f"pools.{ps.name}.cost.seed_report: {seed.path} has no level at a precision the pool "
                f"serves ({', '.join(ps.precisions)})"
            )
        now, n, half = self.clock(), ps.cfg.seed_n, ps.cfg.decay_s
        for s in ps.states:
            mine = [lv for lv in levels if lv.precision == s.precision]
            if not mine:
                continue
            curve = s.curves[SEED_DEVICE] = Curve()
            s.changed()
            for lv in mine:
                # a level's power: its J/token times its token rate (the report's, else one token/s per
                # request in flight: the slopes between levels keep their proportions)
                rate = lv.tokens_per_s if lv.tokens_per_s is not None else float(lv.concurrency)
                curve.add(lv.concurrency, lv.j_per_token * rate, rate, now, half, n)
                b = bucket(lv.concurrency)
                p = curve.power[b]
                p.m2 = max(p.m2, (lv.stderr * rate) ** 2 * n * n)  # the level's interval as the spread

    def handles(self, pool: str) -> bool:
        return pool in self.pools

    # -- inputs ------------------------------------------------------------------------------------
    def observe(self, tl: Timeline, rec: RequestRecord) -> None:
        """A final record: its latencies (the budgets)."""
        ps = self.pools.get(tl.pool or "")
        if ps is None or tl.backend is None:
            return
        s = ps.by_name.get(tl.backend)
        if s is None or rec["status"] != "ok":
            return
        now = self.clock()
        s.observed += 1
        window_start = now - ps.cfg.latency_window_s
        ttft = rec["ttft_s"]
        if ttft is not None:
            s.ttft.append((now, ttft))
            s.ttft_p95 = _p95(s.ttft, window_start)
            s.latency_t = now
        times = rec["timeline"]["t_s"]
        gaps = len(times) - 1
        if gaps > 0:
            step = max(1, gaps // _ITL_PER_RECORD)
            for k in range(0, gaps, step):
                s.itl.append((now, times[k + 1] - times[k]))
            s.itl_p95 = _p95(s.itl, window_start)
            s.latency_t = now

    def observe_interval(
        self, backend: str, device: str, dt: float, load: float, dynamic_j: float, tokens: float
    ) -> None:
        """A settled meter interval of ``dt`` seconds on ``device``: the backend's mean requests in flight,
        its share of the energy above the device's idle power, and the output tokens it made in it."""
        found = self._backends.get(backend)
        if found is None or dt <= 0:
            return
        ps, s = found
        curve = s.curves.get(device)
        if curve is None:
            curve = s.curves[device] = Curve()
        curve.add(load, dynamic_j / dt, tokens / dt, self.clock(), ps.cfg.decay_s, dt)
        s.changed()

    def scored(self, pool: str | None, precision: str | None, correct: bool) -> None:
        """A chain's verdict (counted once per chain): live accuracy where none is configured."""
        ps = self.pools.get(pool or "")
        if ps is None or precision not in ps.scores:
            return
        counts = ps.scores[precision]
        counts[0] += 1 if correct else 0
        counts[1] += 1
        if precision not in ps.cfg.accuracy:
            ps.refresh_accuracy()

    def unreachable(self, backend: Backend) -> None:
        """A request could not reach ``backend``: not a candidate for ``down_s``."""
        ps = self.pools.get(backend.pool)
        if ps is not None:
            backend.down_until = self.clock() + ps.cfg.down_s

    def pinned(self, pool: str, precision: str, chain_id: str | None) -> None:
        """A pinned request: a chain that begins pinned keeps that precision for its unpinned hops."""
        ps = self.pools.get(pool)
        if ps is not None and chain_id is not None and chain_id not in ps.chains:
            ps.remember(chain_id, precision)

    # -- the decision ------------------------------------------------------------------------------
    def _available(self, s: BackendState, now: float, cfg: CostConfig) -> bool:
        b = s.backend
        if not b.probe_ok or b.down_until > now:
            return False
        if cfg.max_inflight is not None and b.inflight >= cfg.max_inflight:
            return False
        if s.latency_t >= now - cfg.latency_window_s:  # budgets look at recent samples only
            ttft, itl = cfg.ttft_p95_s, cfg.itl_p95_s
            if ttft is not None and s.ttft_p95 is not None and s.ttft_p95 > ttft:
                return False
            if itl is not None and s.itl_p95 is not None and s.itl_p95 > itl:
                return False
        return True

    def decide(self, pool: str, kinds: frozenset[str] | None = None, chain_id: str | None = None) -> Decision:
        ps = self.pools[pool]
        cfg = ps.cfg
        now = self.clock()
        allowed = ps.allowed
        live = [
            s
            for s in ps.states
            if s.precision in allowed
            and (kinds is None or s.backend.kind in kinds)
            and self._available(s, now, cfg)
        ]
        if not live:
            return self._fallback(ps, kinds, now)
        half, h = cfg.decay_s, cfg.hysteresis
        acc = ps.accuracy
        # each candidate's cost at the load its precision would carry if it served the pool's whole
        # current load (spread over its live replicas), or at its own load if that is higher: which
        # precision is cheapest at this load, not which replica is cheapest for one more request on top
        # of how the load happens to be split now (an idle replica's first request always looks dear, so
        # that comparison keeps the load where it is even when moving all of it would cost far less)
        pool_load = sum(s.backend.inflight for s in ps.states)
        replicas: dict[str, int] = {}
        for s in live:
            replicas[s.precision] = replicas.get(s.precision, 0) + 1
        load = {id(s): max(s.backend.inflight, pool_load // replicas[s.precision]) for s in live}
        known: list[BackendState] = []
        costs: list[float] = []
        fresh: list[BackendState] = []
        beyond: list[tuple[float, BackendState]] = []  # slow start: past twice their measured range
        for s in live:
            c = s.cost(load[id(s)], now, half)
            if not math.isfinite(c):
                fresh.append(s)
                continue
            cap = RAMP_FACTOR * s.measured_load(now, half) + 1.0
            # slow start spreads a burst over other GPUs; replicas sharing this one's GPUs add no capacity
            # (their batches only interleave with its own), so it holds back only for a candidate elsewhere
            if s.backend.inflight >= cap and any(
                o is not s and not (o.devices & s.devices) and o.has_data for o in live
            ):
                beyond.append((s.backend.inflight / cap, s))
                continue
            known.append(s)
            costs.append(c / acc[s.precision][0])
        blocked = _second_on_a_busy_gpu(known, costs, h) if any(s.peers for s in known) else set()
        if chain_id is not None and cfg.sticky_chains:
            precision = ps.chains.get(chain_id)
            if precision is not None:
                # a chain keeps its precision unless that would wake a second server on a busy GPU
                same = [
                    i
                    for i, s in enumerate(known)
                    if s.precision == precision and not (i in blocked and s.backend.inflight == 0)
                ]
                ratio = cfg.sticky_max_ratio
                if same:
                    j = min(same, key=costs.__getitem__)
                    if ratio is None or costs[j] <= ratio * min(costs):
                        ps.chains.move_to_end(chain_id)
                        return self._done(ps, known[j], "sticky", None)
                else:
                    unknown = [s for s in fresh if s.precision == precision]
                    if unknown:
                        ps.chains.move_to_end(chain_id)
                        return self._done(ps, unknown[next(ps.turn) % len(unknown)], "sticky", None)
        if fresh:
            idle = [
                s for s in fresh if s.backend.inflight == 0 and not any(o.backend.inflight for o in s.peers)
            ]
            if idle:
                return self._done(ps, idle[next(ps.turn) % len(idle)], "explore", chain_id)
        if not known:
            if beyond:  # every measured candidate is past its range: the cheapest of the least far past
                least = min(f for f, _ in beyond)
                near = [s for f, s in beyond if f <= RAMP_FACTOR * least]
                pick = min(near, key=lambda s: s.cost(load[id(s)], now, half) / acc[s.precision][0])
                return self._done(ps, pick, "ramp", chain_id)
            dflt = [s for s in live if s.precision == ps.default_precision] or live
            return self._done(ps, dflt[next(ps.turn) % len(dflt)], "no_data", chain_id)
        if blocked:
            known = [s for i, s in enumerate(known) if i not in blocked]
            costs = [c for i, c in enumerate(costs) if i not in blocked]
        best_i = min(range(len(costs)), key=costs.__getitem__)
        cur_i = next((i for i, s in enumerate(known) if s is ps.best), -1)
        if cur_i < 0 or costs[best_i] < costs[cur_i] * (1.0 - h):
            cur_i = best_i
            ps.best = known[cur_i]
        if len(known) > 1:
            rng = self.rng

            def worth(j: int) -> bool:
                """Whether exploring known[j] goes ahead: with probability (the best's cost / its cost) for
                one more request at each one's own load, what the request really adds there: the energy
                exploration adds stays about its share of the pool's (an idle replica that costs 20x the
                busy best is tried 20x less often)."""
                best, other = known[cur_i], known[j]
                own_best = best.cost(best.backend.inflight, now, half) / acc[best.precision][0]
                own = other.cost(other.backend.inflight, now, half) / acc[other.precision][0]
                return rng.random() * own <= own_best

            if cfg.explore > 0 and rng.random() < cfg.explore:
                j = rng.randrange(len(known) - 1)  # a uniformly drawn other candidate
                j += j >= cur_i
                if worth(j):
                    return self._done(ps, known[j], "explore", chain_id)
            gauss = rng.gauss  # a standard normal draw with its defaults (mu 0, sigma 1)
            draws = [s.cost(load[id(s)], now, half, gauss) / acc[s.precision][0] for s in known]
            w = min(range(len(draws)), key=draws.__getitem__)
            if w != cur_i and draws[w] < draws[cur_i] * (1.0 - h) and worth(w):
                return self._done(ps, known[w], "explore", chain_id)
        return self._done(ps, known[cur_i], "cheapest", chain_id)

    def _fallback(self, ps: PoolState, kinds: frozenset[str] | None, now: float) -> Decision:
        states = [s for s in ps.states if kinds is None or s.backend.kind in kinds]
        precision = ps.default_precision
        if not any(s.precision == precision for s in states):
            precision = states[0].precision  # the route's kinds do not serve the default (TGI routes)
        same = [s for s in states if s.precision == precision]
        up = [s for s in same if s.backend.probe_ok and s.backend.down_until <= now] or same
        return self._done(ps, up[next(ps.turn) % len(up)], "fallback", None)

    def _done(self, ps: PoolState, s: BackendState, reason: str, chain_id: str | None) -> Decision:
        if chain_id is not None:
            ps.remember(chain_id, s.precision)
        return Decision(s.backend, s.precision, reason, "cost")

    # -- GET /qtrap/v1/routing ---------------------------------------------------------------------
    def table(self) -> list[dict[str, Any]]:
        now = self.clock()
        out = []
        for ps in self.pools.values():
            cfg = ps.cfg
            backends = []
            for s in ps.states:
                b = s.backend
                curves = []
                for device, curve in s.curves.items():
                    points = []
                    for i in range(N_BUCKETS):
                        ls = curve.load[i]
                        if ls.w <= 0:
                            continue
                        n = ls.n(now, cfg.decay_s)
                        p, r = curve.power[i], curve.rate[i]
                        points.append(
                            {
                                "load": bucket_label(i),
                                "mean_load": ls.mean,
                                "power_w": p.mean,
                                "power_stderr_w": p.stderr(n),
                                "tokens_per_s": r.mean,
                                "tokens_per_s_stderr": r.stderr(n),
                                "seconds_eff": n,
                            }
                        )
                    curves.append({"device": device, "seconds": curve.seconds, "points": points})
                marginal = {}
                for load in _TABLE_LOADS:
                    c = s.cost(load, now, cfg.decay_s)
                    marginal[str(load)] = c if math.isfinite(c) else None
                backends.append(
                    {
                        "name": b.name,
                        "precision": s.precision,
                        "inflight": b.inflight,
                        "up": b.probe_ok and b.down_until <= now,
                        "candidate": s.precision in ps.allowed and self._available(s, now, cfg),
                        "records": s.observed,
                        "seeded": s.seeded,
                        "ttft_p95_s": s.ttft_p95,
                        "itl_p95_s": s.itl_p95,
                        "curves": curves,
                        "j_per_token_by_load": marginal,
                    }
                )
            out.append(
                {
                    "pool": ps.name,
                    "routing": "cost",
                    "default_precision": ps.default_precision,
                    "current_best": None
                    if ps.best is None
                    else {"backend": ps.best.backend.name, "precision": ps.best.precision},
                    "accuracy": {
                        p: {"value": a, "source": src, "allowed": p in ps.allowed}
                        for p, (a, src) in ps.accuracy.items()
                    },
                    "budgets": {
                        "min_accuracy": cfg.min_accuracy,
                        "max_accuracy_loss": cfg.max_accuracy_loss,
                        "ttft_p95_s": cfg.ttft_p95_s,
                        "itl_p95_s": cfg.itl_p95_s,
                        "max_inflight": cfg.max_inflight,
                    },
                    "explore": cfg.explore,
                    "hysteresis": cfg.hysteresis,
                    "decay_s": cfg.decay_s,
                    "sticky_max_ratio": cfg.sticky_max_ratio,
                    "sticky_chains": len(ps.chains) if cfg.sticky_chains else None,
                    "backends": backends,
                }
            )
        return out


def seed_table(
    seed: Seed, precisions: list[str] | None = None
) -> dict[tuple[str, int], tuple[float, float, int]]:
    """(precision, bucket) -> (mean J/token, standard error, levels) of a seed, levels of one bucket averaged;
    only ``precisions`` when given."""
    groups: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for lv in seed.levels:
        if precisions is None or lv.precision in precisions:
            groups.setdefault((lv.precision, lv.bucket), []).append((lv.j_per_token, lv.stderr))
    return {
        key: (sum(m for m, _ in vs) / len(vs), sum(se for _, se in vs) / len(vs), len(vs))
        for key, vs in sorted(groups.items())
    }
