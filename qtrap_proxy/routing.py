"""Choosing a backend for a request.

Resolution (model name -> pool and precision) is separate from the policy that
picks a replica. ``RoutingPolicy`` is the small interface replica policies implement
(``RoundRobin`` by default). A pool with ``routing: cost`` hands its unpinned requests
to a ``PoolPolicy`` (cost.py's ``CostPolicy``), which chooses among every precision's
backends; :meth:`Router.route` gives the decision either way, with its reason.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Protocol

from qtrap_proxy.config import ProxyConfig
from qtrap_proxy.cost import Decision
from qtrap_proxy.errors import BadRequest, NotFound
from qtrap_proxy.upstream import Backend


class RoutingPolicy(Protocol):
    def pick(self, pool: str, precision: str, candidates: list[Backend]) -> Backend:
        """Pick one of ``candidates`` (all serving ``pool`` at ``precision``; never empty)."""
        ...


class PoolPolicy(Protocol):
    """Chooses a precision and a replica for a pool's unpinned requests (``routing: cost``)."""

    def handles(self, pool: str) -> bool: ...

    def decide(self, pool: str, kinds: frozenset[str] | None = None, chain_id: str | None = None) -> Decision:
        """A backend of ``pool`` (of ``kinds`` when given), its precision and why."""
        ...

    def pinned(self, pool: str, precision: str, chain_id: str | None) -> None:
        """A request of ``pool`` pinned to ``precision`` (so a chain that began pinned can stay)."""
        ...


class RoundRobin:
    def __init__(self) -> None:
        self._counters: dict[tuple[str, str], Iterator[int]] = {}

    def pick(self, pool: str, precision: str, candidates: list[Backend]) -> Backend:
        counter = self._counters.get((pool, precision))
        if counter is None:
            counter = self._counters[(pool, precision)] = itertools.count()
        return candidates[next(counter) % len(candidates)]


class Router:
    """Maps what a client asks for to a backend.

    ``model`` may be a pool name, ``pool@precision``, or an upstream model id
    (so clients that already name the upstream model need no change); the
    ``x-qtrap-precision`` header pins a precision too.
    """

    def __init__(
        self,
        config: ProxyConfig,
        backends: Iterable[Backend],
        policy: RoutingPolicy | None = None,
        pool_policy: PoolPolicy | None = None,
    ):
        self.config = config
        self.policy: RoutingPolicy = policy if policy is not None else RoundRobin()
        self.pool_policy = pool_policy  # set once the pools are known (Proxy builds it from them)
        self.backends = list(backends)
        self._by_pool: dict[str, dict[str, list[Backend]]] = {}
        for b in self.backends:
            self._by_pool.setdefault(b.pool, {}).setdefault(b.precision, []).append(b)
        self._aliases: dict[str, str] = {}
        ambiguous: set[str] = set()
        for b in self.backends:
            prev = self._aliases.get(b.cfg.model)
            if prev is not None and prev != b.pool:
                ambiguous.add(b.cfg.model)
            self._aliases[b.cfg.model] = b.pool
        for name in ambiguous | set(self._by_pool):
            self._aliases.pop(name, None)
        self.default_precision = {pool: config.default_precision(pool) for pool in self._by_pool}

    @property
    def pools(self) -> dict[str, dict[str, list[Backend]]]:
        return self._by_pool

    def resolve(
        self, model: str, header_precision: str | None, kinds: frozenset[str] | None = None
    ) -> tuple[str, str]:
        """(pool, precision) for a request, or NotFound / BadRequest.

        With ``kinds`` (e.g. TGI's native routes) and no pin, the default is the pool's
        default precision if a backend of those kinds serves it, else the first such precision.
        """
        pool, precision, _ = self._resolve(model, header_precision, kinds)
        return pool, precision

    def route(
        self,
        model: str,
        header_precision: str | None,
        kinds: frozenset[str] | None = None,
        chain_id: str | None = None,
    ) -> Decision:
        """:meth:`resolve` and a backend: a pool with ``routing: cost`` decides an unpinned request
        among all its precisions (the pool policy); otherwise the resolved precision's replicas take
        turns (``reason``: pinned or round_robin). Errors as resolve's and choose's."""
        pool, precision, pinned = self._resolve(model, header_precision, kinds)
        pp = self.pool_policy
        if pp is not None and pp.handles(pool):
            if not pinned:
                return pp.decide(pool, kinds, chain_id)
            pp.pinned(pool, precision, chain_id)
            return Decision(self.choose(pool, precision, kinds), precision, "pinned", "cost")
        reason = "pinned" if pinned else "round_robin"
        return Decision(self.choose(pool, precision, kinds), precision, reason, "round_robin")

    def _resolve(
        self, model: str, header_precision: str | None, kinds: frozenset[str] | None
    ) -> tuple[str, str, bool]:
        pool, _, pinned = model.partition("@")
        pool = self._aliases.get(pool, pool)
        precisions = self._by_pool.get(pool)
        if precisions is None:
            raise NotFound(
                f"The model `{model}` does not exist. Known: {', '.join(sorted(self._by_pool))}.",
                param="model",
            )
        header_precision = header_precision.strip() if header_precision else None
        if pinned and header_precision and pinned != header_precision:
            raise BadRequest(
                f"precision pinned twice and differently: model `{model}` vs x-qtrap-precision `{header_precision}`",
                param="model",
            )
        precision = pinned or header_precision or self.default_precision[pool]
        if kinds is not None and not (pinned or header_precision):
            usable = [p for p, bs in precisions.items() if any(b.kind in kinds for b in bs)]
            if usable and precision not in usable:
                precision = usable[0]
        if precision not in precisions:
            raise NotFound(
                f"pool `{pool}` has no backend at precision `{precision}`; it serves {', '.join(sorted(precisions))}",
                param="model",
                code="precision_not_found",
            )
        return pool, precision, bool(pinned or header_precision)

    def choose(self, pool: str, precision: str, kinds: frozenset[str] | None = None) -> Backend:
        candidates = self._by_pool[pool][precision]
        if kinds is not None:
            candidates = [b for b in candidates if b.kind in kinds]
            if not candidates:
                raise NotFound(
                    f"pool `{pool}` at precision `{precision}` has no backend of kind {'/'.join(sorted(kinds))}",
                    param="model",
                    code="precision_not_found",
                )
        return self.policy.pick(pool, precision, candidates)
