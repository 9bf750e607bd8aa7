"""Choosing a backend for a request.

Resolution (model name -> pool and precision) is separate from the policy that
picks a replica. ``RoutingPolicy`` is the small interface later policies (e.g.
cheapest precision at the current load) implement.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Protocol

from qtrap_proxy.config import ProxyConfig
from qtrap_proxy.errors import BadRequest, NotFound
from qtrap_proxy.upstream import Backend


class RoutingPolicy(Protocol):
    def pick(self, pool: str, precision: str, candidates: list[Backend]) -> Backend:
        """Pick one of ``candidates`` (all serving ``pool`` at ``precision``; never empty)."""
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

    def __init__(self, config: ProxyConfig, backends: Iterable[Backend], policy: RoutingPolicy | None = None):
        self.config = config
        self.policy: RoutingPolicy = policy if policy is not None else RoundRobin()
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
        return pool, precision

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
