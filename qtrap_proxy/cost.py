"""Routing by cost (``pools.<name>.routing: cost``): the online cost model and the decision.

The model. Per backend (replica) and load bucket (requests in flight on that backend, costseed.bucket:
0, 1, 2-3, 4-7, ..., 256+), the measured J per output token of its final records (``observe``, fed by
the record store: energy_j / completion_tokens of ``ok`` records whose energy is known and that have
tokens; under ``meter.policy: active`` the request's idle share is added back, so the figure always
includes idle power as attributed) as a decayed mean and variance: an observation's weight halves every
``cost.decay_s`` seconds, so the estimate follows drift and its standard error widens while a backend
gets no traffic. A request is counted at the load it began at (itself included), the load the
decision looked at plus one. An optional loadgen report seeds each precision's buckets
(costseed.read_seed; ``seed_n`` observations each, decaying like the rest).

The decision (``CostPolicy.decide``), for a request whose precision is not pinned:

1. candidates: the pool's backends (of the route's kinds) whose precision passes the accuracy budget
   (``min_accuracy``, ``max_accuracy_loss`` against the default precision), whose last health probe
   passed and that did not fail to connect within ``down_s``, below ``max_inflight``, and whose recent
   p95 TTFT / ITL (``latency_window_s``, from 5 records on) is within ``ttft_p95_s`` / ``itl_p95_s``.
   None: the pool's default precision, round robin (``fallback``).
2. ``sticky_chains``: a chain whose first hop was routed keeps that precision (the cheapest candidate
   replica of it; ``sticky``) while one is a candidate.
3. a candidate without any data (no record, no seed) and nothing in flight is tried (``explore``);
   if no candidate has data yet, the default precision's candidates in turn (``no_data``).
4. cost = mean J/token at (load + 1) / accuracy(precision). The pool's current best changes only when
   another candidate's expected cost is lower than the best's by more than ``hysteresis``.
5. with probability ``explore`` a uniformly drawn other candidate (``explore``); else Thompson sampling:
   one draw per candidate from Normal(cost, standard error / accuracy); a candidate whose draw beats the
   best's draw by more than ``hysteresis`` gets the request (``explore``), otherwise the best does
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
_NEAREST_WIDEN = 0.25  # a bucket borrowed from d buckets away: standard error + 25% of the mean per bucket
_ACCURACY_FLOOR = 1e-3


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
        self.m2 += weight * delta * (x - self.mean)

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


class BackendState:
    """One backend's estimates and recent latencies."""

    __slots__ = (
        "backend",
        "itl",
        "itl_p95",
        "latency_t",
        "observed",
        "precision",
        "seeded",
        "stats",
        "ttft",
        "ttft_p95",
    )

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.precision = backend.precision
        self.stats = [Stat() for _ in range(N_BUCKETS)]
        self.observed = 0  # records observed (ever)
        self.seeded = False
        self.ttft: deque[tuple[float, float]] = deque(maxlen=_TTFT_SAMPLES)
        self.itl: deque[tuple[float, float]] = deque(maxlen=_ITL_SAMPLES)
        self.ttft_p95: float | None = None
        self.itl_p95: float | None = None
        self.latency_t = -math.inf  # when the last latency sample came

    @property
    def has_data(self) -> bool:
        return self.observed > 0 or self.seeded

    def estimate(self, load: int, now: float, half_life_s: float) -> tuple[float, float, float]:
        """(mean J/token, standard error, effective n) at ``load``; the nearest bucket with data stands in
        for an empty one, its standard error widened. Only for a backend that has data."""
        b = bucket(load)
        stats = self.stats
        for d in range(N_BUCKETS):
            for i in (b - d, b + d) if d else (b,):
                if 0 <= i < N_BUCKETS:
                    s = stats[i]
                    if s.w > 0:
                        n = s.n(now, half_life_s)
                        return s.mean, s.stderr(n) + _NEAREST_WIDEN * d * s.mean, n
        return 0.0, math.inf, 0.0


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
        self._active_idle = config.meter.policy == "active"
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

    def _seed(self, ps: PoolState, seed: Seed) -> None:
        table = seed_table(seed, ps.precisions)
        if not table:
            raise ConfigError(
                f"pools.{ps.name}.cost.seed_report: {seed.path} has no level at a precision the pool "
                f"serves ({', '.join(ps.precisions)})"
            )
        now, n = self.clock(), ps.cfg.seed_n
        for s in ps.states:
            for (precision, b), (mean, se, _) in table.items():
                if precision == s.precision:
                    st = s.stats[b]
                    st.w, st.mean, st.m2, st.t = n, mean, se * se * n * n, now
                    s.seeded = True

    def handles(self, pool: str) -> bool:
        return pool in self.pools

    # -- inputs ------------------------------------------------------------------------------------
    def observe(self, tl: Timeline, rec: RequestRecord) -> None:
        """A final record: its J/token at the load it began at, and its latencies."""
        ps = self.pools.get(tl.pool or "")
        if ps is None or tl.backend is None:
            return
        s = ps.by_name.get(tl.backend)
        if s is None or rec["status"] != "ok":
            return
        now = self.clock()
        half = ps.cfg.decay_s
        energy, tokens = rec["energy_j"], rec["completion_tokens"]
        if energy is not None and tokens and energy >= 0:
            if self._active_idle and rec["idle_energy_j"] is not None:
                energy += rec["idle_energy_j"]
            s.stats[bucket(max(tl.load, 1))].add(energy / tokens, now, half)
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
        if chain_id is not None and cfg.sticky_chains:
            precision = ps.chains.get(chain_id)
            if precision is not None:
                same = [s for s in live if s.precision == precision]
                if same:
                    ps.chains.move_to_end(chain_id)
                    return self._done(ps, self._cheapest(ps, same, now), "sticky", None)
        fresh = [s for s in live if not s.has_data]
        if fresh:
            idle = [s for s in fresh if s.backend.inflight == 0]
            if idle:
                return self._done(ps, idle[next(ps.turn) % len(idle)], "explore", chain_id)
        known = [s for s in live if s.has_data]
        if not known:
            dflt = [s for s in live if s.precision == ps.default_precision] or live
            return self._done(ps, dflt[next(ps.turn) % len(dflt)], "no_data", chain_id)
        half, h = cfg.decay_s, cfg.hysteresis
        acc = ps.accuracy
        costs: list[tuple[float, float]] = []
        best_i, cur_i = 0, -1
        for i, s in enumerate(known):
            mean, se, _ = s.estimate(s.backend.inflight + 1, now, half)
            a = acc[s.precision][0]
            costs.append((mean / a, se / a))
            if costs[i][0] < costs[best_i][0]:
                best_i = i
            if s is ps.best:
                cur_i = i
        if cur_i < 0 or costs[best_i][0] < costs[cur_i][0] * (1.0 - h):
            cur_i = best_i
            ps.best = known[cur_i]
        if len(known) > 1:
            rng = self.rng
            if cfg.explore > 0 and rng.random() < cfg.explore:
                j = rng.randrange(len(known) - 1)
                return self._done(ps, known[j + (j >= cur_i)], "explore", chain_id)
            gauss = rng.gauss
            draws = [c + se * gauss(0.0, 1.0) for c, se in costs]
            w = min(range(len(draws)), key=draws.__getitem__)
            if w != cur_i and draws[w] < draws[cur_i] * (1.0 - h):
                return self._done(ps, known[w], "explore", chain_id)
        return self._done(ps, known[cur_i], "cheapest", chain_id)

    def _cheapest(self, ps: PoolState, states: list[BackendState], now: float) -> BackendState:
        known = [s for s in states if s.has_data]
        if not known:
            return states[next(ps.turn) % len(states)]
        half = ps.cfg.decay_s
        return min(known, key=lambda s: s.estimate(s.backend.inflight + 1, now, half)[0])

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
                buckets = []
                for i, st in enumerate(s.stats):
                    if st.w > 0:
                        n = st.n(now, cfg.decay_s)
                        buckets.append(
                            {
                                "load": bucket_label(i),
                                "j_per_token": st.mean,
                                "stderr": st.stderr(n),
                                "n_eff": n,
                            }
                        )
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
                        "buckets": buckets,
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
