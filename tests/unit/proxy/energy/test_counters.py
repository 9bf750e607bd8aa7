"""Backend token counters and foreign work: replicas in front of one backend attribute each joule once."""

from __future__ import annotations

import pytest

from qtrap_proxy.energy.attribution import DeviceAccount, Tracked
from qtrap_proxy.energy.counters import DEBT_HALF_LIFE_S, ForeignLedger, TokenCounter, parse_counters
from qtrap_proxy.timeline import Timeline

VLLM_PAGE = """\
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="m"} 120.0
vllm:prompt_tokens_total{engine="1",model_name="m"} 30.0
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="m"} 1000.0
vllm:generation_tokens_total{engine="1",model_name="m"} 5.0
vllm:generation_tokens_created{engine="0",model_name="m"} 1.7e9
vllm:request_generation_tokens_sum{engine="0",model_name="m"} 999.0
vllm:num_requests_running{engine="0",model_name="m"} 7.0
"""

TGI_PAGE = """\
# TYPE tgi_request_input_length histogram
tgi_request_input_length_bucket{le="+Inf"} 3
tgi_request_input_length_sum 77
tgi_request_input_length_count 3
# TYPE tgi_request_generated_tokens histogram
tgi_request_generated_tokens_sum 400
tgi_request_generated_tokens_count 3
tgi_batch_current_size 2
"""


def test_parse_sums_series_and_ignores_lookalikes() -> None:
    assert parse_counters(VLLM_PAGE, "vllm") == (150.0, 1005.0, 7.0)
    assert parse_counters(TGI_PAGE, "tgi") == (77.0, 400.0, 2.0)


@pytest.mark.parametrize(
    ("page", "kind", "msg"),
    [
        (
            "vllm:num_requests_running 1\n",
            "vllm",
            "no vllm:prompt_tokens_total or vllm:generation_tokens_total",
        ),
        (VLLM_PAGE, "tgi", "no tgi_request_input_length_sum"),
        ("vllm:prompt_tokens_total x\nvllm:generation_tokens_total 1\n", "vllm", "cannot read"),
        (
            "vllm:prompt_tokens_total 1\nvllm:generation_tokens_total 1\n",
            "vllm",
            "no vllm:num_requests_running",
        ),
    ],
)
def test_parse_errors_say_what_is_missing(page: str, kind: str, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        parse_counters(page, kind)


def test_counter_interpolates_and_knows_what_it_covers() -> None:
    c = TokenCounter("b", "vllm", "http://x/metrics")
    c.add(0.0, 0.0, 0.0)
    c.add(1.0, 100.0, 10.0)
    c.add(2.0, 100.0, 30.0)
    assert c.covers(2.0) and not c.covers(2.01)
    assert c.work(0.0, 1.0, prefill_weight=0.1) == pytest.approx(10.0 + 10.0)
    assert c.work(0.5, 1.5, prefill_weight=0.0) == pytest.approx(5.0 + 10.0)
    assert c.work(1.5, 2.5, 0.1) is None  # not polled that far yet
    assert c.work(-1.0, 0.5, 0.1) is None  # before the first sample


def test_counter_survives_a_backend_restart() -> None:
    c = TokenCounter("b", "vllm", "u")
    c.add(0.0, 50.0, 500.0)
    c.add(1.0, 60.0, 600.0)
    c.add(2.0, 5.0, 40.0)  # restarted: counters start again from 0
    c.add(3.0, 6.0, 50.0)
    assert c.resets == 1
    assert c.work(0.0, 1.0, 0.0) == pytest.approx(100.0)
    assert c.work(2.0, 3.0, 0.0) == pytest.approx(10.0)
    assert c.work(1.0, 3.0, 0.0) == pytest.approx(50.0)  # the series stays cumulative, never negative


def test_foreign_ledger_carries_differences_forward_and_lets_them_fade() -> None:
    led = ForeignLedger()
    assert led.foreign(1.0, backend_work=10.0, own_work=10.0) == 0.0
    # the proxy saw 4 units the counters show only in the next interval: no foreign work then either
    assert led.foreign(1.1, backend_work=6.0, own_work=10.0) == 0.0
    assert led.balance == pytest.approx(-4.0)
    assert led.foreign(1.2, backend_work=14.0, own_work=10.0) == 0.0
    assert led.foreign(1.3, backend_work=15.0, own_work=10.0) == pytest.approx(5.0, abs=0.1)
    # a fraction of a token after the proxy's own requests ended waits instead of making the interval busy
    assert led.foreign(1.4, backend_work=0.4, own_work=0.0) == 0.0
    assert led.foreign(1.5, backend_work=0.7, own_work=0.0) == pytest.approx(1.1, abs=0.02)
    # a lasting balance halves every half-life
    led.foreign(2.0, 0.0, 8.0)
    assert led.foreign(2.0 + DEBT_HALF_LIFE_S, 8.0, 0.0) == pytest.approx(4.0)


def _tl(rid: str, backend: str, start: float, end: float, chunks: list[float]) -> Timeline:
    tl = Timeline(rid, "chat", stream=True, start=start, backend=backend)
    for t in chunks:
        tl.add_chunk(t, 1)
    tl.prompt_tokens = 0
    tl.completion_tokens = len(chunks)
    tl.end = end
    return tl


def _replicas(
    with_counters: bool, kind: str = "vllm"
) -> tuple[DeviceAccount, DeviceAccount, list[Tracked], list[Tracked]]:
    """Two replicas in front of one backend on one GPU: A serves two streams, B one, all decoding a token every
    10 ms from t=0.5 to t=3.5; the GPU draws 300 W busy, 100 W idle; the meter moves every 100 ms."""
    counter = TokenCounter("gpu-0", kind, "u")
    accounts = []
    for _ in range(2):
        acc = DeviceAccount("h:0", settle_s=1.0, prefill_weight=0.0, idle_power_w=None)
        if with_counters:
            acc.counters["gpu-0"] = counter
        accounts.append(acc)
    a, b = accounts
    ticks = [0.5 + 0.01 * k for k in range(1, 301)]
    trs_a = [Tracked(_tl(f"a{i}", "gpu-0", 0.5, 3.5, ticks)) for i in range(2)]
    trs_b = [Tracked(_tl("b0", "gpu-0", 0.5, 3.5, ticks))]
    for tr in trs_a:
        a.track(tr)
    for tr in trs_b:
        b.track(tr)
    # the backend's counters, polled every 50 ms: vLLM's count 3 tokens per 10 ms while the streams run; TGI's
    # count a request's tokens when it ends, and its running batch holds 3 requests meanwhile
    for k in range(0, 102):
        t = 0.05 * k
        running = 3.0 if 0.5 < t <= 3.5 else 0.0
        if kind == "tgi":
            counter.add(t, 0.0, 900.0 if t > 3.5 else 0.0, running)
        else:
            counter.add(t, 0.0, 3 * max(0, min(300, round((t - 0.5) / 0.01))), running)
    joules = 0.0
    for k in range(1, 51):
        t = 0.1 * k
        joules += (300.0 if 0.5 < t <= 3.5 else 100.0) * 0.1
        # both replicas read the same counter, each a few ms after the other
        a.on_reading(t + 0.003, joules)
        b.on_reading(t + 0.007, joules)
    a.settle(now=100.0)
    b.settle(now=100.0)
    return a, b, trs_a, trs_b


@pytest.mark.parametrize("kind", ["vllm", "tgi"])
def test_two_replicas_attribute_each_joule_once(kind: str) -> None:
    a, b, trs_a, trs_b = _replicas(with_counters=True, kind=kind)
    busy_j = 300.0 * 3.0
    # TGI's timing comes from the sampled running batch: its edges are as coarse as the polls
    tol = 0.02 if kind == "vllm" else 0.05
    assert a.attributed_j + b.attributed_j == pytest.approx(busy_j, rel=tol)
    # each replica's requests are charged what they cost: a third of the busy energy per stream
    for tr in trs_a + trs_b:
        assert tr.energy_j == pytest.approx(busy_j / 3, rel=1.5 * tol)
    # what a replica did not serve is foreign on that replica, and every joule is accounted for there
    assert a.foreign_j == pytest.approx(busy_j / 3, rel=1.5 * tol)
    assert b.foreign_j == pytest.approx(2 * busy_j / 3, rel=1.5 * tol)
    for acc in (a, b):
        # idle is what the GPU drew outside the busy 3 s (the energy before the first reading is not measured),
        # give or take one meter interval at an edge that counts as busy where interpolated counters reach it
        assert acc.idle_j == pytest.approx(acc.measured_j - busy_j, abs=10.5 if kind == "vllm" else 20.5)
        assert acc.conservation_error_ratio() < 1e-12
        assert acc.counter_gaps == 0


def test_without_counters_replicas_count_the_busy_energy_twice() -> None:
    a, b, _, _ = _replicas(with_counters=False)
    assert a.attributed_j + b.attributed_j == pytest.approx(2 * 300.0 * 3.0, rel=0.02)
    assert a.foreign_j == b.foreign_j == 0.0


def test_a_lone_replica_with_counters_keeps_everything() -> None:
    """One proxy, counters on, nobody else: the counters agree with the proxy's own tokens and nothing is foreign."""
    counter = TokenCounter("g", "vllm", "u")
    acc = DeviceAccount("h:0", settle_s=1.0, prefill_weight=0.0)
    acc.counters["g"] = counter
    ticks = [0.2 + 0.02 * k for k in range(1, 51)]
    tr = Tracked(_tl("r", "g", 0.2, 1.2, ticks))
    acc.track(tr)
    for k in range(0, 31):  # counter lags the proxy's view by 7 ms
        t = 0.05 * k
        counter.add(t, 0.0, max(0, min(50, int((t - 0.207) / 0.02))))
    for k in range(1, 15):
        acc.on_reading(0.1 * k, 20.0 * k)
    acc.settle(now=50.0)
    assert acc.foreign_j <= 0.02 * acc.measured_j
    assert tr.energy_j == pytest.approx(20.0 * 10, rel=0.05)


def test_settling_waits_for_the_counters_to_cover_the_interval() -> None:
    counter = TokenCounter("g", "vllm", "u", up=True)
    acc = DeviceAccount("h:0", settle_s=5.0)
    acc.counters["g"] = counter
    counter.add(0.0, 0.0, 0.0)
    acc.on_reading(0.0, 0.0)
    acc.on_reading(0.1, 10.0)
    acc.settle(now=0.2)
    assert acc.measured_j == 0.0 and len(acc.pending) == 1  # the counters have not been polled past 0.1
    counter.add(0.15, 0.0, 4.0)
    acc.settle(now=0.2)
    assert acc.measured_j == 10.0 and acc.foreign_j == pytest.approx(10.0)  # nobody here: all of it foreign
    # counters down: intervals settle without them, and say so
    counter.up = False
    acc.on_reading(0.3, 20.0)
    acc.settle(now=0.31)
    assert acc.measured_j == 20.0 and acc.counter_gaps == 1 and acc.idle_j == pytest.approx(10.0)
