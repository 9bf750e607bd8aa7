"""Routing by cost (qtrap_proxy/cost.py): decisions on constructed cost tables, the seed reader, the config."""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from qtrap_proxy.admin import routing_report
from qtrap_proxy.cli import main
from qtrap_proxy.config import ProxyConfig, load_config
from qtrap_proxy.cost import CostPolicy, Stat, _draw, _log_sigma
from qtrap_proxy.costseed import bucket, bucket_label, read_seed
from qtrap_proxy.errors import ConfigError
from qtrap_proxy.proxy import Proxy
from qtrap_proxy.routing import Router
from qtrap_proxy.timeline import Timeline
from qtrap_proxy.upstream import Backend


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _cfg(
    cost: dict[str, Any] | None = None,
    precisions: tuple[str, ...] = ("bf16", "int4"),
    replicas: int = 1,
    routing: str = "cost",
    extra_backends: list[dict[str, Any]] | None = None,
) -> ProxyConfig:
    backends = [
        {
            "name": f"{p}-{r}",
            "pool": "q8",
            "precision": p,
            "url": f"http://127.0.0.1:{9000 + 10 * i + r}",
            "model": "Qwen/Qwen3-8B",
        }
        for i, p in enumerate(precisions)
        for r in range(replicas)
    ]
    pool: dict[str, Any] = {"default_precision": precisions[0], "routing": routing}
    if cost is not None:
        pool["cost"] = cost
    return load_config(data={"backends": backends + (extra_backends or []), "pools": {"q8": pool}})


class Setup:
    def __init__(self, cfg: ProxyConfig, seed: int = 1, seeds: dict[str, Any] | None = None) -> None:
        self.clock = Clock()
        self.backends = [Backend(b) for b in cfg.backends]
        self.router = Router(cfg, self.backends)
        self.policy = CostPolicy(cfg, self.router.pools, seeds, random.Random(seed), self.clock)
        self.router.pool_policy = self.policy
        self.by_name = {b.name: b for b in self.backends}

    def feed(
        self,
        name: str,
        load: int,
        jpt: float,
        n: int = 40,
        ttft: float = 0.05,
        itl: float = 0.01,
        status: str = "ok",
        energy: bool = True,
    ) -> None:
        """``n`` one-second meter intervals of ``name`` at ``load`` in flight, 100 tokens/s per request at
        ``jpt`` J/token above idle (unless not ``energy``), and ``n`` final records with these latencies."""
        b = self.by_name[name]
        rng = random.Random(f"{name}|{load}|{jpt}")  # the same noise in every process (hash() is salted)
        for _ in range(n):
            if energy and status == "ok":
                rate = 100.0 * load
                self.policy.observe_interval(
                    name, "dev0", 1.0, float(load), jpt * rate * (1 + 0.002 * rng.uniform(-1, 1)), rate
                )
            tl = Timeline("r", route="chat", pool=b.pool, precision=b.precision, backend=b.name, load=load)
            rec: Any = {
                "status": status,
                "energy_j": None,
                "idle_energy_j": 0.0,
                "completion_tokens": 100,
                "ttft_s": ttft,
                "timeline": {"t_s": [ttft + k * itl for k in range(10)], "tokens": [1] * 10},
            }
            self.policy.observe(tl, rec)

    def decide(self, chain_id: str | None = None, kinds: frozenset[str] | None = None) -> tuple[str, str]:
        d = self.policy.decide("q8", kinds, chain_id)
        return d.backend.name, d.reason

    def set_load(self, load: int) -> None:
        for b in self.backends:
            b.inflight = load


def _quiet(**extra: Any) -> dict[str, Any]:
    """No random exploration, no hysteresis: the decisions are the cheapest's."""
    return {"explore": 0, "hysteresis": 0, **extra}


# -- the model ------------------------------------------------------------------------------------
def test_buckets_are_powers_of_two() -> None:
    assert [bucket(n) for n in (0, 1, 2, 3, 4, 7, 8, 255, 256, 10_000)] == [0, 1, 2, 2, 3, 3, 4, 8, 9, 9]
    assert [bucket_label(i) for i in range(10)] == [
        "0", "1", "2-3", "4-7", "8-15", "16-31", "32-63", "64-127", "128-255", "256+"
    ]  # fmt: skip


def test_stat_decays_and_widens() -> None:
    s = Stat()
    for x in (1.0, 2.0, 3.0):
        s.add(x, 0.0, 600)
    assert s.mean == pytest.approx(2.0) and s.n(0.0, 600) == pytest.approx(3.0)
    se_now = s.stderr(s.n(0.0, 600))
    assert s.n(600.0, 600) == pytest.approx(1.5)  # one half-life later
    assert s.stderr(s.n(600.0, 600)) > se_now
    s.add(10.0, 600.0, 600)  # a new value weighs more than the decayed old ones
    assert s.mean == pytest.approx((2.0 * 1.5 + 10.0) / 2.5)


def test_stat_variance_never_goes_negative() -> None:
    """One value added alone can leave m2 slightly below zero by rounding (1452.357... with weight 3:
    -1e-9), and stderr then raised a math domain error inside a routing decision (found with a seed of one
    level per bucket)."""
    for x, w in ((1452.3571825113872, 3.0), (2025.265753114621, 0.1), (3092.226614379983, 0.1)):
        s = Stat()
        s.add(x, 1.0, 600, w)
        assert s.m2 >= 0 and s.stderr(s.n(1.0, 600)) >= 0


def test_cost_is_dynamic_power_over_rate_at_the_load_with_the_request() -> None:
    st = Setup(_cfg(_quiet()))
    # 1 request: 200 W above idle for 100 tokens/s; 8 requests: 400 W for 800 tokens/s
    for _ in range(20):
        st.policy.observe_interval("bf16-0", "dev0", 0.5, 1.0, 100.0, 50.0)
        st.policy.observe_interval("bf16-0", "dev0", 0.5, 8.0, 200.0, 400.0)
    s = st.policy.pools["q8"].by_name["bf16-0"]
    now = st.clock()
    assert s.cost(0, now, 600) == pytest.approx(2.0)  # alone: the whole 200 W for 100 tokens/s
    # with 3 in flight the request makes 4: 3/7 of the way from 1 to 8 in power and in rate
    assert s.cost(3, now, 600) == pytest.approx((200 + 200 * 3 / 7) / (100 + 700 * 3 / 7))
    assert s.cost(40, now, 600) == pytest.approx(0.5)  # past the last point: its figure
    assert s.measured_load(now, 600) == pytest.approx(8.0)
    # a second device of the same backend adds its own power for the same tokens
    for _ in range(20):
        st.policy.observe_interval("bf16-0", "dev1", 0.5, 1.0, 100.0, 50.0)
    assert s.cost(0, now, 600) == pytest.approx(4.0)
    # intervals below half a request in flight add no point of their own
    for _ in range(20):
        st.policy.observe_interval("int4-0", "dev0", 0.5, 0.1, 5.0, 5.0)
    i4 = st.policy.pools["q8"].by_name["int4-0"]
    assert not i4.has_data and i4.cost(0, now, 600) == math.inf
    # records teach latencies only: errors and records without energy add no curve
    st.feed("int4-0", 1, 1.0, n=3, status="upstream_error")
    assert i4.observed == 0
    st.feed("int4-0", 1, 1.0, n=3, energy=False)
    assert i4.observed == 3 and i4.cost(0, now, 600) == math.inf


def test_observe_interval_ignores_other_backends_and_empty_intervals() -> None:
    st = Setup(_cfg(_quiet()))
    st.policy.observe_interval("elsewhere", "dev0", 1.0, 1.0, 100.0, 50.0)
    st.policy.observe_interval("bf16-0", "dev0", 0.0, 1.0, 100.0, 50.0)
    assert not any(s.has_data for s in st.policy.pools["q8"].states)


# -- decisions --------------------------------------------------------------------------------------
def test_cheapest_wins_at_each_load() -> None:
    st = Setup(_cfg(_quiet()))
    # bf16 dear alone, cheap when batched; int4 the other way round (the trap's shape)
    st.feed("bf16-0", 1, 2.0)
    st.feed("bf16-0", 10, 0.5)
    st.feed("int4-0", 1, 1.0)
    st.feed("int4-0", 10, 0.9)
    st.set_load(0)
    assert st.decide() == ("int4-0", "cheapest")
    st.set_load(10)  # the request would be the 11th in flight: past the last point, its figure
    assert st.decide() == ("bf16-0", "cheapest")
    st.set_load(4)  # between the points: 0.5 of the way from load 1 to 10 in power and in rate
    assert st.decide() == ("bf16-0", "cheapest")
    # slow start: past twice the highest measured load (+1) a backend takes no more while another can
    st.by_name["bf16-0"].inflight = 21
    assert st.decide() == ("int4-0", "cheapest")
    st.set_load(40)  # both past it, as far: the cheaper
    assert st.decide() == ("bf16-0", "ramp")
    st.by_name["int4-0"].inflight = 60  # within twice as far past as bf16: still the cheaper
    assert st.decide() == ("bf16-0", "ramp")
    st.by_name["bf16-0"].inflight = 130  # more than twice as far past as int4: int4
    assert st.decide() == ("int4-0", "ramp")


def test_the_precision_cheapest_at_the_pools_load_wins_over_the_split_of_the_moment() -> None:
    """INT4 carries all 31 requests at 0.5 J/token; BF16, idle, costs 3 J/token for its first request but
    0.15 at 32 in flight. The pool's load belongs on BF16: the next request goes there (and the next ones,
    as the chains' hops move), although one request alone on the idle BF16 replica looks dearer."""
    st = Setup(_cfg(_quiet()))
    st.feed("bf16-0", 1, 3.0)
    st.feed("bf16-0", 32, 0.15)
    st.feed("int4-0", 1, 1.5)
    st.feed("int4-0", 16, 0.5)
    st.by_name["int4-0"].inflight = 31
    assert st.decide() == ("bf16-0", "cheapest")
    # at one request in flight INT4 is the cheaper precision
    st.by_name["int4-0"].inflight = 0
    assert st.decide() == ("int4-0", "cheapest")


def test_exploring_at_the_pools_load_is_paid_at_the_replicas_own_load() -> None:
    """INT4 carries a burst of 31 at 0.08 J/token; BF16, idle, is well known alone (3 J/token) and seen
    for 0.2 s at 32 in flight (0.3: a wide point). Thompson draws at the pool's load often make BF16 look
    cheapest, but a request sent there now runs alone at 3 J/token: such explorations go ahead with
    probability 0.08 / 3, so BF16 gets a small share, not the tenth or more that the draws would give."""
    st = Setup(_cfg({"explore": 0, "hysteresis": 0.05}))
    st.feed("bf16-0", 1, 3.0, n=200)
    st.policy.observe_interval("bf16-0", "dev0", 0.2, 32.0, 0.3 * 3200.0, 3200.0)
    st.feed("int4-0", 1, 1.5, n=200)
    st.feed("int4-0", 32, 0.08, n=200)
    st.by_name["int4-0"].inflight = 31
    names = [st.decide()[0] for _ in range(4000)]
    assert 0 < names.count("bf16-0") / len(names) < 0.01


def _one_gpu(
    cost: dict[str, Any], precisions: tuple[str, ...] = ("bf16", "fp8", "int4"), shared: bool = True
) -> Setup:
    """One replica per precision, all on GPU 0 of one host (vLLM servers side by side); with ``shared``
    False, GPU i of that host each."""
    backends = [
        {
            "name": f"{p}-0",
            "pool": "q8",
            "precision": p,
            "url": f"http://127.0.0.1:{9000 + i}",
            "model": "Qwen/Qwen3-8B",
            "devices": [{"host": "gpu-host", "index": 0 if shared else i}],
        }
        for i, p in enumerate(precisions)
    ]
    pool = {"default_precision": precisions[0], "routing": "cost", "cost": cost}
    return Setup(load_config(data={"backends": backends, "pools": {"q8": pool}}))


def test_slow_start_does_not_spread_over_replicas_sharing_a_gpu() -> None:
    """Two replicas on one GPU: a burst past INT4's measured range stays on INT4 (the cheaper), since BF16
    on the same GPU adds no capacity; on separate GPUs the burst spreads (ramp)."""
    for shared in (True, False):
        st = _one_gpu(_quiet(), ("bf16", "int4"), shared)
        st.feed("bf16-0", 1, 3.0)
        st.feed("int4-0", 1, 1.0)
        st.by_name["int4-0"].inflight = 5  # past 2 x 1 + 1
        assert st.decide() == (("int4-0", "cheapest") if shared else ("bf16-0", "cheapest"))


def test_a_busy_shared_gpu_serves_one_precision_at_a_time() -> None:
    """FP8 leads the GPU with 20 in flight; INT4 is 3% cheaper there (within the 5% hysteresis) and BF16
    dearer. Every fresh request stays on FP8, even when exploration and Thompson draws pick another (with
    replicas on separate GPUs they would go ahead): a second server busy on the GPU time-slices it."""
    st = _one_gpu({"explore": 0.5, "hysteresis": 0.05})
    for name, jpt in (("bf16-0", 0.5), ("fp8-0", 0.30), ("int4-0", 0.291)):
        st.feed(name, 1, 3 * jpt, n=200)
        st.feed(name, 16, jpt, n=2)  # wide points: Thompson draws often invert the order
    st.by_name["fp8-0"].inflight = 20
    assert {st.decide()[0] for _ in range(2000)} == {"fp8-0"}
    # the same costs on separate GPUs: exploration does send some requests elsewhere
    sep = Setup(_cfg({"explore": 0.5, "hysteresis": 0.05}, precisions=("bf16", "fp8", "int4")))
    for name, jpt in (("bf16-0", 0.5), ("fp8-0", 0.30), ("int4-0", 0.291)):
        sep.feed(name, 1, 3 * jpt, n=200)
        sep.feed(name, 16, jpt, n=2)
    sep.by_name["fp8-0"].inflight = 20
    assert len({sep.decide()[0] for _ in range(2000)}) > 1


def test_a_shared_gpus_traffic_moves_as_a_whole_to_a_precision_cheaper_past_hysteresis() -> None:
    st = _one_gpu(_quiet(hysteresis=0.05))
    st.feed("bf16-0", 1, 1.5)
    st.feed("bf16-0", 16, 0.5)
    st.feed("fp8-0", 1, 1.0)
    st.feed("fp8-0", 16, 0.30)
    st.feed("int4-0", 1, 0.9)
    st.feed("int4-0", 16, 0.20)  # a third cheaper than FP8 at the GPU's load
    st.by_name["fp8-0"].inflight = 20
    assert st.decide() == ("int4-0", "cheapest")
    st.by_name["int4-0"].inflight = 1  # INT4 now takes the GPU's fresh requests while FP8 drains
    assert {st.decide() for _ in range(50)} == {("int4-0", "cheapest")}
    st.by_name["int4-0"].inflight, st.by_name["fp8-0"].inflight = 20, 3  # INT4 leads: FP8 is not woken
    assert {st.decide()[0] for _ in range(50)} == {"int4-0"}
    # the GPU idle: every precision is free again (a chain of one request at a time picks the cheapest alone)
    st.set_load(0)
    assert st.decide() == ("int4-0", "cheapest")


def test_a_lead_that_cannot_take_more_blocks_nothing() -> None:
    st = _one_gpu(_quiet(hysteresis=0.05, max_inflight=20))
    st.feed("fp8-0", 16, 0.30)
    st.feed("int4-0", 16, 0.31)
    st.feed("bf16-0", 16, 0.5)
    st.by_name["fp8-0"].inflight = 20  # full: not a candidate
    assert st.decide() == ("int4-0", "cheapest")
    st.by_name["fp8-0"].inflight = 10
    assert st.decide() == ("fp8-0", "cheapest")
    st.by_name["fp8-0"].probe_ok = False  # down: the others are free
    assert st.decide() == ("int4-0", "cheapest")


def test_sticky_chains_do_not_wake_a_second_server_on_a_busy_gpu() -> None:
    st = _one_gpu(_quiet(hysteresis=0.05), precisions=("fp8", "int4"))
    st.feed("fp8-0", 1, 1.0)
    st.feed("fp8-0", 16, 0.30)
    st.feed("int4-0", 1, 0.8)
    st.feed("int4-0", 16, 0.31)
    assert st.decide("c1") == ("int4-0", "cheapest")  # GPU idle: INT4 is cheapest alone
    st.by_name["fp8-0"].inflight = 20  # a burst went to FP8 meanwhile
    assert st.decide("c1") == ("fp8-0", "cheapest")  # INT4's server is idle: the chain is routed afresh
    assert st.decide("c2") == ("fp8-0", "cheapest")
    st.by_name["int4-0"].inflight = 2  # INT4 still busy with its own chains: a chain keeps it
    assert st.decide("c3") == ("fp8-0", "cheapest")
    st.policy.pools["q8"].chains["c3"] = "int4"
    assert st.decide("c3") == ("int4-0", "sticky")


def test_backends_without_data_are_explored_on_a_shared_gpu_only_while_it_is_idle() -> None:
    st = _one_gpu(_quiet(), precisions=("fp8", "int4"))
    st.feed("fp8-0", 1, 1.0)
    st.by_name["fp8-0"].inflight = 4
    assert {st.decide() for _ in range(20)} == {("fp8-0", "cheapest")}
    st.by_name["fp8-0"].inflight = 0
    assert st.decide() == ("int4-0", "explore")


def test_accuracy_is_in_the_objective() -> None:
    st = Setup(_cfg(_quiet(accuracy={"bf16": 0.95, "int4": 0.5})))
    st.feed("bf16-0", 1, 1.5)
    st.feed("int4-0", 1, 1.0)  # 1.0 / 0.5 = 2.0 J per correct token vs 1.5 / 0.95
    assert st.decide() == ("bf16-0", "cheapest")


def test_live_accuracy_from_scores_after_min_scored() -> None:
    st = Setup(_cfg(_quiet(min_scored=10)))
    st.feed("bf16-0", 1, 1.5)
    st.feed("int4-0", 1, 1.0)
    assert st.decide() == ("int4-0", "cheapest")
    for i in range(10):
        st.policy.scored("q8", "int4", i < 4)  # 40% right
    acc = st.policy.pools["q8"].accuracy["int4"]
    assert acc == (pytest.approx(0.4), "scores")
    assert st.decide() == ("bf16-0", "cheapest")


def test_pins_win() -> None:
    st = Setup(_cfg(_quiet()))
    st.feed("bf16-0", 1, 2.0)
    st.feed("int4-0", 1, 1.0)
    d = st.router.route("q8@bf16", None)
    assert (d.backend.name, d.precision, d.reason, d.policy) == ("bf16-0", "bf16", "pinned", "cost")
    d = st.router.route("q8", "bf16")
    assert (d.backend.name, d.reason) == ("bf16-0", "pinned")
    d = st.router.route("q8", None)
    assert (d.backend.name, d.reason) == ("int4-0", "cheapest")
    # the resolution errors are resolve()'s
    with pytest.raises(Exception, match="pinned twice"):
        st.router.route("q8@int4", "bf16")
    with pytest.raises(Exception, match="does not exist"):
        st.router.route("llama", None)


def test_round_robin_pools_keep_todays_behaviour() -> None:
    st = Setup(_cfg(routing="round_robin", replicas=2))
    assert not st.policy.handles("q8")
    picks = [st.router.route("q8", None) for _ in range(4)]
    assert [(d.backend.name, d.reason, d.policy) for d in picks] == [
        ("bf16-0", "round_robin", "round_robin"),
        ("bf16-1", "round_robin", "round_robin"),
    ] * 2
    assert st.router.route("q8@int4", None).reason == "pinned"


def test_tgi_kinds_are_respected() -> None:
    tgi = {
        "name": "tgi-int8",
        "pool": "q8",
        "precision": "int8",
        "kind": "tgi",
        "url": "http://h:1",
        "model": "m",
    }
    st = Setup(_cfg(_quiet(), extra_backends=[tgi]))
    st.feed("bf16-0", 1, 0.5)
    st.feed("tgi-int8", 1, 3.0)
    assert st.decide(kinds=frozenset({"tgi"}))[0] == "tgi-int8"
    d = st.router.route("q8", None, kinds=frozenset({"tgi"}))
    assert d.backend.name == "tgi-int8"
    # every TGI backend down: the fallback stays with what the route can reach
    st.by_name["tgi-int8"].probe_ok = False
    assert st.decide(kinds=frozenset({"tgi"})) == ("tgi-int8", "fallback")


def test_chains_stay_on_their_first_precision() -> None:
    st = Setup(_cfg(_quiet()))
    st.feed("bf16-0", 1, 2.0)
    st.feed("int4-0", 1, 1.0)
    assert st.decide("c1") == ("int4-0", "cheapest")
    st.feed("bf16-0", 1, 0.6, n=400)  # bf16 is now cheaper (about 0.73), within sticky_max_ratio (2)
    assert st.decide("c1") == ("int4-0", "sticky")
    assert st.decide("c2") == ("bf16-0", "cheapest")
    assert st.decide("c2") == ("bf16-0", "sticky")
    # a chain that began pinned keeps its precision too
    assert st.router.route("q8@int4", None, chain_id="c3").reason == "pinned"
    assert st.decide("c3") == ("int4-0", "sticky")
    # its precision has become more than twice the cheapest's cost: the chain is routed afresh
    st.feed("bf16-0", 1, 0.1, n=4000)
    assert st.decide("c3") == ("bf16-0", "cheapest")
    assert st.decide("c3") == ("bf16-0", "sticky")
    # the sticky precision is down: the chain is decided afresh
    st.by_name["int4-0"].probe_ok = False
    assert st.decide("c1") == ("bf16-0", "cheapest")
    # sticky_max_ratio: null keeps a chain whatever the costs
    st2 = Setup(_cfg(_quiet(sticky_max_ratio=None)))
    st2.feed("bf16-0", 1, 2.0)
    st2.feed("int4-0", 1, 1.0)
    assert st2.decide("c1") == ("int4-0", "cheapest")
    st2.feed("bf16-0", 1, 0.01, n=4000)
    assert st2.decide("c1") == ("int4-0", "sticky")


def test_sticky_chains_are_bounded_and_optional() -> None:
    st = Setup(_cfg(_quiet(sticky_max=2)))
    st.feed("bf16-0", 1, 2.0)
    st.feed("int4-0", 1, 1.0)
    for c in ("a", "b", "c"):
        st.decide(c)
    assert list(st.policy.pools["q8"].chains) == ["b", "c"]
    st2 = Setup(_cfg(_quiet(sticky_chains=False)))
    st2.feed("bf16-0", 1, 2.0)
    st2.feed("int4-0", 1, 1.0)
    assert st2.decide("a") == ("int4-0", "cheapest")
    st2.feed("bf16-0", 1, 0.2, n=400)
    assert st2.decide("a") == ("bf16-0", "cheapest")


@pytest.mark.parametrize("budget", [{"min_accuracy": 0.9}, {"max_accuracy_loss": 0.05}])
def test_accuracy_budgets_exclude_precisions(budget: dict[str, float]) -> None:
    st = Setup(_cfg(_quiet(accuracy={"bf16": 0.95, "int4": 0.85}, **budget)))
    st.feed("bf16-0", 1, 2.0)
    st.feed("int4-0", 1, 1.0)  # cheaper even per correct answer, but outside the budget
    assert st.decide() == ("bf16-0", "cheapest")
    assert st.policy.pools["q8"].allowed == {"bf16"}


def test_latency_budgets_exclude_backends_while_recent() -> None:
    st = Setup(_cfg(_quiet(ttft_p95_s=0.5, latency_window_s=60)))
    st.feed("bf16-0", 1, 2.0, ttft=0.1)
    st.feed("int4-0", 1, 1.0, ttft=0.9)
    assert st.decide() == ("bf16-0", "cheapest")
    table = routing_table(st)
    assert table["int4-0"]["ttft_p95_s"] == pytest.approx(0.9) and not table["int4-0"]["candidate"]
    st.clock.t += 61  # its slow samples have left the window: a candidate again
    assert st.decide() == ("int4-0", "cheapest")
    st2 = Setup(_cfg(_quiet(itl_p95_s=0.05)))
    st2.feed("bf16-0", 1, 2.0, itl=0.01)
    st2.feed("int4-0", 1, 1.0, itl=0.2)
    assert st2.decide() == ("bf16-0", "cheapest")


def routing_table(st: Setup) -> dict[str, dict[str, Any]]:
    return {b["name"]: b for b in st.policy.table()[0]["backends"]}


def test_down_or_full_replicas_are_skipped() -> None:
    st = Setup(_cfg(_quiet(max_inflight=4, down_s=10), replicas=2))
    for name, jpt in (("bf16-0", 2.0), ("bf16-1", 2.1), ("int4-0", 1.0), ("int4-1", 1.05)):
        st.feed(name, 1, jpt)
    assert st.decide() == ("int4-0", "cheapest")
    st.by_name["int4-0"].probe_ok = False  # its health probe failed
    assert st.decide() == ("int4-1", "cheapest")
    st.by_name["int4-0"].probe_ok = True
    st.policy.unreachable(st.by_name["int4-0"])  # a request could not connect
    assert st.decide() == ("int4-1", "cheapest")
    st.clock.t += 11
    assert st.decide() == ("int4-0", "cheapest")
    st.by_name["int4-0"].inflight = 4  # at max_inflight
    assert st.decide() == ("int4-1", "cheapest")


def test_fallback_when_no_candidate_remains() -> None:
    st = Setup(_cfg(_quiet(max_inflight=1)))
    st.feed("bf16-0", 1, 2.0)
    st.feed("int4-0", 1, 1.0)
    st.set_load(1)
    assert st.decide() == ("bf16-0", "fallback")  # the default precision
    st.set_load(0)
    for b in st.backends:
        b.probe_ok = False
    assert st.decide() == ("bf16-0", "fallback")


def test_no_data_candidates_are_explored_first_then_no_data_goes_to_the_default() -> None:
    st = Setup(_cfg(_quiet(), precisions=("bf16", "fp8", "int4")))
    first = {st.decide() for _ in range(3)}
    assert first == {("bf16-0", "explore"), ("fp8-0", "explore"), ("int4-0", "explore")}
    st.set_load(1)  # each has a request in flight, no record yet
    assert st.decide() == ("bf16-0", "no_data")
    st.feed("int4-0", 1, 1.0)
    assert st.decide() == ("int4-0", "cheapest")  # the others are busy being explored
    st.set_load(0)
    assert st.decide()[1] == "explore"  # an idle candidate without data is tried before the cheapest


def test_exploration_share_is_bounded_by_energy() -> None:
    st = Setup(_cfg({"explore": 0.1, "hysteresis": 0.05}, precisions=("bf16", "fp8", "int4")))
    st.feed("bf16-0", 1, 2.0)
    st.feed("fp8-0", 1, 1.6)
    st.feed("int4-0", 1, 1.0)
    reasons = [st.decide() for _ in range(8000)]
    explored = [n for n, r in reasons if r == "explore"]
    # 10% draw another candidate, kept with probability best cost / its cost: 1/2 for bf16, 1/1.6 for fp8
    assert 0.045 <= len(explored) / len(reasons) <= 0.068
    assert set(explored) == {"bf16-0", "fp8-0"}
    assert explored.count("fp8-0") > explored.count("bf16-0")  # the dearer is tried less
    assert all(n == "int4-0" for n, r in reasons if r == "cheapest")


def test_thompson_sampling_explores_uncertain_candidates() -> None:
    st = Setup(_cfg({"explore": 0, "hysteresis": 0.05}))
    st.feed("bf16-0", 1, 1.0, n=200)
    st.feed("int4-0", 1, 1.1, n=1)  # one record: wide uncertainty, plausibly far cheaper
    reasons = [st.decide() for _ in range(2000)]
    explored = [n for n, r in reasons if r == "explore"]
    assert explored and set(explored) == {"int4-0"}
    assert sum(r == "cheapest" for _, r in reasons) > len(reasons) / 2


def test_thompson_draws_stay_positive_and_keep_the_mean() -> None:
    rng = random.Random(3)
    draws = [_draw(10.0, _log_sigma(10.0, 7.0), lambda: rng.gauss(0.0, 1.0)) for _ in range(40_000)]
    assert min(draws) > 0  # a normal draw with this spread is below zero one time in thirteen
    assert sum(draws) / len(draws) == pytest.approx(10.0, rel=0.03)
    assert statistics.stdev(draws) == pytest.approx(7.0, rel=0.1)
    assert _log_sigma(-1.0, 5.0) == 0.0 and _log_sigma(3.0, 0.0) == 0.0
    assert _draw(-1.0, 0.0, lambda: 2.0) == -1.0 and _draw(3.0, 0.0, lambda: 2.0) == 3.0


def test_a_dear_replica_seen_briefly_does_not_take_a_share_of_decisions() -> None:
    """A replica measured for half a second at 8x the best's cost: its draws are wide, but a positive
    power cannot draw a free replica (it took about 10% of decisions when draws were normal, clipped at 0)."""
    st = Setup(_cfg({"explore": 0, "hysteresis": 0.05}))
    st.feed("int4-0", 1, 1.0, n=400)
    b = st.by_name["bf16-0"]
    st.policy.observe_interval(b.name, "dev0", 0.5, 1.0, 8.0 * 100.0, 100.0)
    reasons = [st.decide() for _ in range(4000)]
    share = sum(n == "bf16-0" for n, _ in reasons) / len(reasons)
    assert share < 0.02


def test_hysteresis_prevents_flapping() -> None:
    st = Setup(_cfg({"explore": 0, "hysteresis": 0.05}))
    st.feed("bf16-0", 1, 1.00, n=400)
    st.feed("int4-0", 1, 1.03, n=400)
    assert st.decide() == ("bf16-0", "cheapest")
    st.feed("int4-0", 1, 0.95, n=2000)  # about 2% cheaper now: within the margin
    assert st.policy.pools["q8"].by_name["int4-0"].cost(0, st.clock(), 600) < 1.0
    assert {st.decide() for _ in range(500)} == {("bf16-0", "cheapest")}
    st.feed("int4-0", 1, 0.5, n=2000)  # far cheaper: the best changes
    assert {st.decide() for _ in range(100)} == {("int4-0", "cheapest")}
    # without hysteresis the 2% difference alone switches it
    st0 = Setup(_cfg({"explore": 0, "hysteresis": 0}))
    st0.feed("bf16-0", 1, 1.00, n=400)
    st0.feed("int4-0", 1, 1.03, n=400)
    assert st0.decide() == ("bf16-0", "cheapest")
    st0.feed("int4-0", 1, 0.95, n=2000)
    assert st0.decide() == ("int4-0", "cheapest")


def test_table_shape() -> None:
    st = Setup(_cfg(_quiet(accuracy={"bf16": 0.95}, ttft_p95_s=1.0)))
    st.feed("bf16-0", 3, 2.0)
    st.decide()
    (pool,) = st.policy.table()
    assert pool["pool"] == "q8" and pool["default_precision"] == "bf16"
    assert pool["accuracy"]["bf16"] == {"value": 0.95, "source": "config", "allowed": True}
    assert pool["accuracy"]["int4"]["source"] == "default"
    assert pool["budgets"]["ttft_p95_s"] == 1.0
    (b,) = [b for b in pool["backends"] if b["name"] == "bf16-0"]
    (curve,) = b["curves"]
    assert curve["device"] == "dev0" and curve["seconds"] == pytest.approx(40)
    (pt,) = curve["points"]
    assert pt["load"] == "2-3" and pt["mean_load"] == pytest.approx(3)
    assert pt["power_w"] == pytest.approx(600, rel=0.01) and pt["tokens_per_s"] == pytest.approx(300)
    assert pt["seconds_eff"] == pytest.approx(40) and pt["power_stderr_w"] < 1
    assert b["j_per_token_by_load"]["0"] == pytest.approx(2.0, rel=0.01)
    assert b["j_per_token_by_load"]["7"] == pytest.approx(2.0, rel=0.01)  # past its one point: that point's
    assert pool["sticky_max_ratio"] == 1.5


# -- the proxy: in-flight counts, the header, the metric, the report ---------------------------------------
def test_proxy_counts_inflight_and_explains(tmp_path: Path) -> None:
    cfg = _cfg(_quiet())
    cfg.ledger.path = str(tmp_path / "l.sqlite")
    proxy = Proxy(cfg, CollectorRegistry())
    assert proxy.cost is not None and proxy.router.pool_policy is proxy.cost
    d = proxy.router.route("q8", None)
    tl = Timeline("r1", route="chat")
    tl.routing, tl.route_reason = d.policy, d.reason
    proxy.begin(tl, d.backend)
    assert d.backend.inflight == 1 and tl.load == 1
    headers = dict(proxy.response_headers(tl))
    assert headers[b"x-qtrap-route"] == f"cost; precision={d.precision}; reason=explore".encode()
    tl.finish("upstream_unreachable", 502, "down")
    proxy.end(tl, was_inflight=True)
    assert d.backend.inflight == 0 and d.backend.down_until > 0
    value = proxy.metrics.registry.get_sample_value(
        "qtrap_route_decisions_total", {"pool": "q8", "precision": d.precision, "reason": "explore"}
    )
    assert value == 1.0
    report = routing_report(proxy)
    assert report["round_robin_pools"] == [] and report["pools"][0]["pool"] == "q8"
    proxy.ledger.close()


# -- the seed ---------------------------------------------------------------------------------------
def _report(levels: list[dict[str, Any]], version: str = "1.1") -> dict[str, Any]:
    return {"schema_version": version, "config": {"model": "q8"}, "levels": levels}


def _level(precision: str, c: int, jpt: float | None, ci: list[float] | None = None) -> dict[str, Any]:
    return {"precision": precision, "concurrency": c, "j_per_token": jpt, "ci": {"j_per_token": ci}}


def test_seed_reader_and_seeded_decisions(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    levels = [
        _level("bf16", 1, 2.0, [1.9, 2.1]),
        _level("bf16", 16, 0.5),
        _level("int4", 1, 1.0),
        _level("int4", 16, 0.9),
        _level("int4", 64, None),
        _level("nf4", 1, 5.0),
    ]
    path.write_text(json.dumps(_report(levels)))
    seed = read_seed(path)
    assert seed.model == "q8" and seed.skipped == 1 and len(seed.levels) == 5
    assert seed.levels[0].stderr == pytest.approx(0.2 / 3.92) and seed.levels[0].interval
    assert seed.levels[1].stderr == pytest.approx(0.05) and not seed.levels[1].interval
    st = Setup(_cfg(_quiet(seed_n=5)), seeds={"q8": seed})
    assert st.decide() == ("int4-0", "cheapest")  # no record yet: the seed decides
    st.set_load(15)
    assert st.decide() == ("bf16-0", "cheapest")
    (pool,) = st.policy.table()
    assert all(b["seeded"] for b in pool["backends"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not JSON"),
        (json.dumps([1, 2]), "no `levels` list"),
        (json.dumps(_report([], version="2.0")), "schema_version '2.0'"),
        (json.dumps(_report(["x"])), r"levels\[0\] is not an object"),
        (json.dumps(_report([_level("bf16", 0, 1.0)])), r"levels\[0\].concurrency"),
        (json.dumps(_report([_level("bf16", True, 1.0)])), r"levels\[0\].concurrency"),
        (json.dumps(_report([_level("", 1, 1.0)])), r"levels\[0\].precision"),
        (json.dumps(_report([_level("bf16", 1, -1.0)])), r"levels\[0\].j_per_token"),
        (json.dumps(_report([_level("bf16", 1, "1")])), r"levels\[0\].j_per_token"),
        (json.dumps(_report([_level("bf16", 1, None)])), "no level has a J/token"),
    ],
)
def test_seed_reader_rejects_bad_reports(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "report.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message) as ei:
        read_seed(path)
    assert "\n" not in str(ei.value)
    with pytest.raises(ConfigError, match="cannot read"):
        read_seed(tmp_path / "missing.json")


def test_seed_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "report.json"
    path.write_text(
        json.dumps(_report([_level("bf16", 1, 2.0), _level("int4", 8, 0.9), _level("int4", 12, 1.1)]))
    )
    assert main(["routing", "seed", str(path), "--pool", "q8"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("pool q8: seed from") and out[1].split() == [
        "PRECISION", "LOAD", "J/TOKEN", "STDERR", "LEVELS"
    ]  # fmt: skip
    assert out[3].split()[:3] == ["int4", "8-15", "1"] and out[3].split()[-1] == "2"
    assert main(["routing", "seed", str(path), "--pool", "q8", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["precision"] for r in doc["seed"]] == ["bf16", "int4"]
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert main(["routing", "seed", str(bad), "--pool", "q8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qtrap-proxy: seed report") and err.count("\n") == 1


def test_seed_of_a_pool_that_serves_none_of_its_precisions(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text(json.dumps(_report([_level("nf4", 1, 2.0)])))
    cfg = _cfg(_quiet(seed_report=str(path)))
    cfg.ledger.path = str(tmp_path / "l.sqlite")
    with pytest.raises(ConfigError, match=r"pools.q8.cost.seed_report: .* no level at a precision"):
        Proxy(cfg, CollectorRegistry())
    bad = _cfg(_quiet(seed_report=str(tmp_path / "nope.json")))
    bad.ledger.path = str(tmp_path / "l2.sqlite")
    with pytest.raises(ConfigError, match=r"pools.q8.cost.seed_report: seed report .* cannot read"):
        Proxy(bad, CollectorRegistry())


# -- the config -------------------------------------------------------------------------------------
def test_config_validation() -> None:
    with pytest.raises(ConfigError, match=r"pools.q8.cost.accuracy.fp4: precision not served"):
        _cfg({"accuracy": {"fp4": 0.9}})
    with pytest.raises(ConfigError, match=r"pools.q8.cost.accuracy: .*bf16: must be a number in \(0, 1\]"):
        _cfg({"accuracy": {"bf16": 1.5}})
    with pytest.raises(ConfigError, match=r"pools.q8.cost: only used with routing: cost"):
        _cfg({"explore": 0.1}, routing="round_robin")
    with pytest.raises(ConfigError, match=r"pools.q8.cost.explore"):
        _cfg({"explore": 0.9})
    with pytest.raises(ConfigError, match=r"pools.q8.routing"):
        _cfg(routing="cheapest")
    cfg = _cfg()
    assert cfg.pools["q8"].cost.explore == 0.02 and cfg.pools["q8"].cost.hysteresis == 0.05
