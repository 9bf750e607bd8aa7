"""Attribution on constructed timelines: where every joule goes."""

from __future__ import annotations

import pytest

from qtrap_proxy.energy.attribution import DeviceAccount, Tracked
from qtrap_proxy.timeline import Timeline


def _tl(
    rid: str,
    start: float,
    end: float | None,
    chunks: list[tuple[float, int]],
    prompt: int | None = 10,
    stream: bool = True,
) -> Timeline:
    tl = Timeline(rid, "chat", stream=stream, start=start)
    for t, n in chunks:
        tl.add_chunk(t, n)
    tl.prompt_tokens = prompt
    tl.completion_tokens = sum(n for _, n in chunks)
    tl.end = end
    return tl


def _feed(acc: DeviceAccount, readings: list[tuple[float, float]], now: float) -> list[Tracked]:
    for t, j in readings:
        acc.on_reading(t, j)
    return acc.settle(now)


def test_idle_when_nothing_in_flight_and_conservation() -> None:
    acc = DeviceAccount("h:0", settle_s=0.5)
    tr = Tracked(_tl("a", 1.05, 1.25, [(1.1, 1), (1.2, 1)]))
    acc.track(tr)
    done = _feed(acc, [(1.0, 0.0), (1.1, 10.0), (1.2, 20.0), (1.3, 30.0), (1.4, 40.0)], now=5.0)
    assert done == [tr] and tr.final
    # [1.0,1.1]: busy half the time (from 1.05); [1.1,1.2]: busy; [1.2,1.3]: busy until 1.25; [1.3,1.4]: idle
    assert tr.energy_j == pytest.approx(5.0 + 10.0 + 5.0)
    assert acc.idle_j == pytest.approx(5.0 + 5.0 + 10.0)
    assert acc.measured_j == pytest.approx(40.0)
    assert acc.conservation_error_ratio() < 1e-12


def test_split_by_decode_tokens_and_prefill_weight() -> None:
    acc = DeviceAccount("h:0", settle_s=0.0, prefill_weight=0.5)
    # a: decodes 3 tokens in the interval; b: prefills 4 prompt tokens over the whole interval (first chunk later)
    a = Tracked(_tl("a", 0.0, 2.0, [(0.5, 1), (1.2, 1), (1.5, 1), (1.8, 1)]))
    b = Tracked(_tl("b", 1.0, 3.0, [(2.0, 1)], prompt=4))
    for tr in (a, b):
        acc.track(tr)
    _feed(acc, [(1.0, 0.0), (2.0, 100.0)], now=10.0)
    # interval (1, 2]: a's chunks at 1.5 and 1.8 and the part of its chunk at 1.2 produced after 1.0 (spread over
    # (0.5, 1.2]); b prefills 0.5 * 4 = 2 work units, and its first chunk at 2.0 is in too
    wa, wb = 0.2 / 0.7 + 2.0, 2.0 + 1.0
    assert a.energy_j == pytest.approx(100.0 * wa / (wa + wb))
    assert b.energy_j == pytest.approx(100.0 * wb / (wa + wb))
    assert a.bound_j == pytest.approx(min(a.energy_j, b.energy_j))


def test_a_meter_update_between_chunks_of_one_step_splits_it_evenly() -> None:
    """Two requests decode in lockstep (steps of 30 ms); their chunks of a step reach the proxy 2 ms apart and
    the counter moves in between. Each request's tokens belong to the step that made them, not to the instant
    its chunk arrived, so both get (nearly) the same share."""
    acc = DeviceAccount("h:0", settle_s=0.0, prefill_weight=0.0)
    steps = [0.03 * k for k in range(1, 11)]
    a = Tracked(_tl("a", 0.0, 0.31, [(t, 1) for t in steps]))
    b = Tracked(_tl("b", 0.0, 0.31, [(t + 0.002, 1) for t in steps]))
    for tr in (a, b):
        acc.track(tr)
    _feed(acc, [(0.0, 0.0), (0.151, 50.0), (0.4, 100.0)], now=10.0)  # 0.151: after a's 5th chunk, before b's
    first_a = (
        50.0
        * (a.work(0.0, 0.151, 0.0) or 0.0)
        / ((a.work(0.0, 0.151, 0.0) or 0.0) + (b.work(0.0, 0.151, 0.0) or 0.0))
    )
    assert first_a == pytest.approx(25.0, rel=0.08)  # counted at arrival it would be 5/(5+4) of 50 = 27.8
    assert a.energy_j + b.energy_j + acc.idle_j == pytest.approx(100.0)
    assert a.energy_j == pytest.approx(b.energy_j, rel=0.02)


def test_a_request_that_ran_never_reads_zero_when_idle_power_is_overestimated() -> None:
    """The idle estimate (learned at 200 W from a quiet interval) exceeds the next interval's average power
    (100 W, e.g. its length measured short): the request in flight still gets the busy part of the interval."""
    acc = DeviceAccount("h:0", settle_s=0.0)
    _feed(acc, [(0.0, 0.0), (0.1, 20.0)], now=10.0)  # nothing in flight: idle learned at 200 W
    tr = Tracked(_tl("a", 0.16, 0.2, [(0.2, 8)], stream=False))
    acc.track(tr)
    _feed(acc, [(0.2, 30.0)], now=10.0)  # 10 J in 0.1 s: 100 W on average, below the idle estimate
    assert tr.final and tr.energy_j == pytest.approx(10.0 * 0.04 / 0.1)
    assert acc.conservation_error_ratio() < 1e-12


def test_unknown_work_counts_time_at_the_known_rate() -> None:
    acc = DeviceAccount("h:0", settle_s=0.0)
    streamed = Tracked(_tl("s", 0.0, 2.0, [(0.1, 1), *[(1.0 + k / 10, 1) for k in range(1, 11)]]))
    blocking = Tracked(_tl("n", 0.5, None, [], prompt=None, stream=False))  # non-streaming, still running
    for tr in (streamed, blocking):
        acc.track(tr)
    _feed(acc, [(1.0, 0.0), (2.0, 60.0)], now=10.0)  # settled by time, the blocking request still in flight
    # streamed: 10 tokens over 1 s; the blocking one's 1 s counts at that rate: 10 units
    assert streamed.energy_j == pytest.approx(30.0) and blocking.energy_j == pytest.approx(30.0)
    assert not blocking.final


def test_non_streaming_tokens_spread_over_duration_once_known() -> None:
    acc = DeviceAccount("h:0", settle_s=0.0, prefill_weight=0.0)
    tl = _tl("n", 0.0, 4.0, [(4.0, 40)], stream=False)
    other = Tracked(_tl("s", 0.0, 4.0, [(0.5 + k * 0.1, 1) for k in range(10)]))  # 10 tokens in (0, 2]
    n = Tracked(tl)
    for tr in (n, other):
        acc.track(tr)
    _feed(acc, [(0.0, 0.0), (2.0, 60.0), (4.0, 100.0)], now=10.0)
    # (0,2]: n did 20 of its 40 tokens, other 10; (2,4]: n 20, other 0
    assert n.energy_j == pytest.approx(60.0 * 20 / 30 + 40.0)
    assert other.energy_j == pytest.approx(60.0 * 10 / 30)


def test_counter_going_backwards_is_a_reset_not_negative_energy() -> None:
    acc = DeviceAccount("h:0", settle_s=0.0)
    _feed(acc, [(0.0, 1000.0), (0.1, 1010.0), (0.2, 5.0), (0.3, 15.0)], now=1.0)
    assert acc.resets == 1 and acc.measured_j == pytest.approx(20.0)
    assert acc.conservation_error_ratio() < 1e-12


def test_active_policy_takes_idle_power_out() -> None:
    acc = DeviceAccount("h:0", settle_s=0.0, policy="active", idle_power_w=100.0)
    tr = Tracked(_tl("a", 0.0, 1.0, [(0.5, 5)]))
    acc.track(tr)
    _feed(acc, [(0.0, 0.0), (1.0, 300.0)], now=5.0)
    assert tr.energy_j == pytest.approx(200.0) and tr.idle_energy_j == pytest.approx(100.0)
    assert acc.idle_j == pytest.approx(100.0) and acc.conservation_error_ratio() < 1e-12


def test_interval_waits_for_facts_until_settle() -> None:
    acc = DeviceAccount("h:0", settle_s=1.0)
    tl = _tl("a", 0.0, None, [(0.05, 1)])
    tr = Tracked(tl)
    acc.track(tr)
    assert _feed(acc, [(0.0, 0.0), (0.1, 10.0)], now=0.5) == []
    assert acc.measured_j == 0.0 and len(acc.pending) == 1  # the request is still in flight
    tl.end = 0.15
    acc.on_reading(0.2, 20.0)
    done = acc.settle(0.3)  # both intervals' requests have ended: no need to wait
    assert done == [tr] and tr.energy_j == pytest.approx(15.0) and acc.idle_j == pytest.approx(5.0)


def test_hop_split_by_chunk_tokens() -> None:
    acc = DeviceAccount("h:0", settle_s=0.0, prefill_weight=0.0)
    tl = _tl("a", 0.0, 1.0, [(0.2, 2), (0.4, 2), (0.6, 4)])
    tl.chunk_hop = [0, 0, 1]
    tr = Tracked(tl, hop_split=True)
    acc.track(tr)
    _feed(acc, [(0.0, 0.0), (1.0, 80.0)], now=5.0)
    assert tr.hop_energy_j == pytest.approx([40.0, 40.0])
    assert sum(tr.hop_energy_j) == pytest.approx(tr.energy_j)


def test_request_older_than_the_first_reading_is_unknown() -> None:
    acc = DeviceAccount("h:0", settle_s=0.0)
    tr = Tracked(_tl("a", 0.0, 0.5, [(0.4, 3)]))
    acc.track(tr)
    done = _feed(acc, [(0.3, 0.0), (0.6, 30.0)], now=5.0)
    assert done == [tr] and not tr.energy_known and "first reading" in (tr.unknown_reason or "")
    assert acc.conservation_error_ratio() < 1e-12  # its share is still accounted on the device


def test_metered_energy_follows_the_counter_before_intervals_settle() -> None:
    """measured_j counts settled intervals only; metered_j is the counter as read, for attribution-free figures."""
    acc = DeviceAccount("h:0", settle_s=10.0)
    acc.track(Tracked(_tl("a", 0.05, None, [(0.1, 1)])))  # in flight: its intervals cannot settle yet
    _feed(acc, [(0.0, 100.0), (0.1, 130.0), (0.2, 150.0), (0.3, 140.0), (0.4, 160.0)], now=0.45)
    assert acc.measured_j == 0.0 and len(acc.pending) == 4
    assert acc.metered_j == pytest.approx(
        30.0 + 20.0 + 0.0 + 20.0
    )  # a counter that went backwards adds nothing
    assert acc.resets == 1


def test_observer_gets_each_backends_load_power_above_idle_and_tokens() -> None:
    """Routing by cost learns from settled intervals: per backend its mean requests in flight, its share (by the
    split) of the energy above idle power, and the output tokens it made in the interval."""
    seen: list[tuple[str, str, float, float, float, float]] = []
    acc = DeviceAccount("h:0", settle_s=0.0, prefill_weight=0.0, idle_power_w=20.0)
    acc.observer = lambda *args: seen.append(args)
    a = _tl("a", 0.0, 2.0, [(0.5, 1), (1.25, 1), (1.5, 1), (1.75, 1), (2.0, 1)])
    b = _tl("b", 1.0, 2.0, [(1.5, 2), (2.0, 2)])
    c = _tl("c", 1.5, 2.0, [(2.0, 3)], stream=False)  # non-streaming: its tokens spread over its time
    a.backend, b.backend, c.backend = "bf16", "bf16", "int4"
    for tl in (a, b, c):
        acc.track(Tracked(tl))
    _feed(acc, [(1.0, 0.0), (2.0, 120.0)], now=10.0)
    by = {name: rest for name, *rest in seen}
    assert set(by) == {"bf16", "int4"}
    # (1, 2]: bf16 has a all along and b all along (load 2), int4 has c half of it (load 0.5); 100 J above idle
    # split by decode work: a 3 1/3 tokens (its chunk at 1.25 spread over (0.5, 1.25]), b 4, c 3
    dev, dt, load, dyn, tokens = by["bf16"]
    assert (dev, dt, load, tokens) == ("h:0", 1.0, pytest.approx(2.0), pytest.approx(22 / 3))
    assert dyn == pytest.approx(100.0 * 22 / 31)
    assert by["int4"][2:] == [pytest.approx(0.5), pytest.approx(100.0 * 9 / 31), pytest.approx(3.0)]
    # an interval with nothing in flight tells nothing; without an idle power known, nothing either
    seen.clear()
    _feed(acc, [(3.0, 140.0)], now=10.0)
    assert seen == []
    acc2 = DeviceAccount("h:1", settle_s=0.0, prefill_weight=0.0)
    acc2.observer = lambda *args: seen.append(args)
    acc2.track(Tracked(_tl("d", 0.0, 1.0, [(0.5, 1), (1.0, 1)])))
    _feed(acc2, [(0.0, 0.0), (1.0, 50.0)], now=10.0)
    assert seen == []


def test_observer_waits_for_a_learnt_idle_power() -> None:
    seen: list[tuple[str, str, float, float, float, float]] = []
    acc = DeviceAccount("h:2", settle_s=0.0, prefill_weight=0.0)
    acc.observer = lambda *args: seen.append(args)
    t, j = 0.0, 0.0
    readings = []
    for _ in range(10):  # ten idle intervals at 50 W
        readings.append((t, j))
        t, j = t + 0.1, j + 5.0
    tl = _tl("x", t, t + 0.2, [(t + 0.1, 1), (t + 0.2, 1)])
    tl.backend = "b"
    acc.track(Tracked(tl))
    readings += [(t, j), (t + 0.2, j + 40.0)]  # busy: 200 W for 0.2 s
    _feed(acc, readings, now=100.0)
    ((name, dev, dt, load, dyn, tokens),) = seen
    assert (name, dev, load, tokens) == ("b", "h:2", pytest.approx(1.0), pytest.approx(2.0))
    assert dt == pytest.approx(0.2) and dyn == pytest.approx(40.0 - 50.0 * 0.2)


def test_observer_of_a_device_never_idle_uses_the_fallback_idle_power() -> None:
    seen: list[tuple[str, str, float, float, float, float]] = []
    acc = DeviceAccount("h:3", settle_s=0.0, prefill_weight=0.0)
    acc.observer = lambda *args: seen.append(args)
    acc.idle_fallback_w = 60.0  # what EnergyService.settle hands it from the other devices
    tl = _tl("y", 0.0, 1.0, [(0.5, 1), (1.0, 1)])
    tl.backend = "b"
    acc.track(Tracked(tl))
    _feed(acc, [(0.0, 0.0), (1.0, 200.0)], now=10.0)
    ((_, _, dt, load, dyn, tokens),) = seen
    assert (dt, load, dyn, tokens) == (1.0, pytest.approx(1.0), pytest.approx(140.0), pytest.approx(2.0))
    assert acc.learnt_idle_w() is None  # its own is still unknown
