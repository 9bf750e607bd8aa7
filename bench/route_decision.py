"""CPU cost of one routing-by-cost decision (qtrap_proxy/cost.py), against its budget of 50 us per request.

    PYTHONPATH=. .venv/bin/python bench/route_decision.py [--iterations 200000] [--repeats 5]

Builds a pool of 3 precisions x 2 replicas (a GPU each; with ``--shared-gpus`` one replica of every precision
on each of 2 GPUs, so the one-busy-server-per-GPU rule runs too) with `routing: cost` (default knobs: explore 0.02, hysteresis
0.05, sticky chains), fills every backend's cost curve at 7 load buckets (settled meter intervals), gives each replica a random
number of requests in flight before every decision, and times:

* ``decide``: CostPolicy.decide alone (candidates, budgets, hysteresis, Thompson draws);
* ``route``: Router.route (model resolution and the decision), what a relay route calls;
* ``route+chain``: Router.route with a new x-qtrap-chain-id each time (the sticky map's insert and LRU bound);
* ``route+sticky``: Router.route for a chain already routed (its precision's cheapest replica).

Process CPU time (time.process_time) over all iterations, best of the repeats, in us per decision.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import random
import sys
import time
from collections.abc import Callable
from typing import Any

from qtrap_proxy.config import load_config
from qtrap_proxy.cost import CostPolicy
from qtrap_proxy.routing import Router
from qtrap_proxy.timeline import Timeline
from qtrap_proxy.upstream import Backend

PRECISIONS = {"bf16": 1.0, "fp8": 0.62, "int4": 0.66}  # J/token at one in flight, relative


def build(shared_gpus: bool = False) -> tuple[Router, CostPolicy, list[Backend]]:
    backends: list[dict[str, Any]] = [
        {
            "name": f"{p}-{r}",
            "pool": "q8",
            "precision": p,
            "url": f"http://127.0.0.1:{9000 + i}",
            "model": "m",
            # --shared-gpus: replica r of every precision on GPU r (three servers per GPU); else a GPU each
            "devices": [{"host": "h", "index": r if shared_gpus else i}],
        }
        for i, (p, r) in enumerate((p, r) for p in PRECISIONS for r in range(2))
    ]
    cfg = load_config(
        data={
            "backends": backends,
            "pools": {
                "q8": {"default_precision": "bf16", "routing": "cost", "cost": {"accuracy": {"bf16": 0.95}}}
            },
        }
    )
    objs = [Backend(b) for b in cfg.backends]
    router = Router(cfg, objs)
    policy = CostPolicy(cfg, router.pools, rng=random.Random(7))
    router.pool_policy = policy
    rng = random.Random(1)
    for b in objs:
        for load in (1, 2, 4, 8, 16, 32, 64):
            # dynamic J/token falling with batch size: power grows slowly, tokens/s about linearly
            rate = 100.0 * load
            power = PRECISIONS[b.precision] * (0.5 + 1.0 / load) * rate
            for _ in range(20):  # 20 settled meter intervals of 0.1 s at each load
                policy.observe_interval(b.name, f"h:{b.name}", 0.1, load, 0.1 * power * rng.uniform(0.95, 1.05),
                                        0.1 * rate)  # fmt: skip
        for _ in range(5):  # records: the latency samples
            tl = Timeline("r", route="chat", pool="q8", precision=b.precision, backend=b.name, load=1)
            rec: Any = {
                "status": "ok",
                "ttft_s": 0.05,
                "timeline": {"t_s": [0.05, 0.06, 0.07], "tokens": [1] * 3},
            }
            policy.observe(tl, rec)
    return router, policy, objs


def timed(fn: Callable[[int], object], backends: list[Backend], n: int, repeats: int) -> float:
    """Best of ``repeats``: CPU us per call of ``fn``, loads reset before every call."""
    rng = random.Random(3)
    loads = [[rng.randrange(0, 48) for _ in backends] for _ in range(1024)]
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        for i in range(n):
            for b, load in zip(backends, loads[i & 1023], strict=True):
                b.inflight = load
            fn(i)
        best = min(best, (time.process_time() - t0) / n * 1e6)
    # the cost of setting the loads alone, taken out
    t0 = time.process_time()
    for i in range(n):
        for b, load in zip(backends, loads[i & 1023], strict=True):
            b.inflight = load
    return best - (time.process_time() - t0) / n * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=200_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--shared-gpus",
        action="store_true",
        help="one replica of each precision per GPU (2 GPUs), not a GPU each",
    )
    args = p.parse_args()
    router, policy, backends = build(args.shared_gpus)
    n, k = args.iterations, args.repeats
    print(
        f"python {platform.python_version()} on {platform.machine()}; {n} decisions x {k} repeats, best repeat"
    )
    gpus = "3 servers on each of 2 GPUs" if args.shared_gpus else "a GPU each"
    print(
        f"pool: 3 precisions x 2 replicas ({gpus}), every backend's curve with 7 points, loads random in 0-47"
    )
    fresh = itertools.count()
    rows = [
        ("decide", timed(lambda i: policy.decide("q8"), backends, n, k)),
        ("route", timed(lambda i: router.route("q8", None), backends, n, k)),
        (
            "route+chain",
            timed(lambda i: router.route("q8", None, chain_id=f"c{next(fresh)}"), backends, n, k),
        ),
        ("route+sticky", timed(lambda i: router.route("q8", None, chain_id=f"c{i % 1000}"), backends, n, k)),
    ]
    for name, us in rows:
        print(f"{name:<13} {us:6.2f} us CPU per decision (budget 50 us)")
    reasons: dict[str, int] = {}
    for _ in range(20_000):
        d = policy.decide("q8")
        reasons[d.reason] = reasons.get(d.reason, 0) + 1
    print("reasons over 20000 decisions at the last loads:", dict(sorted(reasons.items())))
    if any(us > 50 for _, us in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
