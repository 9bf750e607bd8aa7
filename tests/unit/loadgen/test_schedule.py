"""--schedule: the grammar, the curves' values, the closed loop adding and removing chains only between
chains, the open loops' arrivals (Poisson counts for a seeded RNG), and bad input as one-line CLI errors."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import time
from typing import Any

import pytest

from loadgen.cli import main
from loadgen.client import Exchange
from loadgen.datasets import synthetic
from loadgen.schedule import ScheduleError, arrival_times, parse, parse_duration
from loadgen.scheduled import SchedulePlan, run_schedule


def test_durations() -> None:
    assert parse_duration("30s") == 30 and parse_duration("30") == 30 and parse_duration("2m") == 120
    assert parse_duration("500ms") == 0.5 and parse_duration("1h") == 3600 and parse_duration("1.5m") == 90
    for bad in ("", "s", "-3s", "0s", "3 days", "3x"):
        with pytest.raises(ScheduleError):
            parse_duration(bad)


def test_steps_values_and_edges() -> None:
    s = parse("steps:1@30s,8@30s,64@60s")
    assert s.shape == "steps" and s.duration_s == 120 and s.peak() == 64
    assert [s.value_at(t) for t in (0, 29.99, 30, 59.9, 60, 119.9, 500)] == [1, 1, 8, 8, 64, 64, 64]
    assert s.changes() == [0, 30, 60]
    assert s.mean(0, 60) == pytest.approx(4.5)
    assert parse(" STEPS: 2@1m ").duration_s == 60


def test_ramp_values() -> None:
    s = parse("ramp:1..64@120s")
    assert s.duration_s == 120 and s.peak() == 64 and s.changes() == []
    assert s.value_at(0) == 1 and s.value_at(60) == pytest.approx(32.5) and s.value_at(120) == 64
    assert s.value_at(1e9) == 64 and s.value_at(-5) == 1
    down = parse("ramp:10..0@10s")
    assert down.value_at(5) == pytest.approx(5) and down.peak() == 10


def test_day_curve_low_at_night_peak_in_the_afternoon() -> None:
    s = parse("day:1..64@240s")  # ten seconds per hour
    at = {h: s.value_at(h * 10.0) for h in range(24)}
    assert at[3] == pytest.approx(1) and at[15] == pytest.approx(64)
    assert min(at, key=lambda h: at[h]) == 3 and max(at, key=lambda h: at[h]) == 15
    assert at[9] == pytest.approx(32.5) and at[21] == pytest.approx(32.5)  # halfway at 09:00 and 21:00
    assert at[0] == pytest.approx(at[6])  # symmetric about 03:00
    # smooth: no jump between neighbouring seconds larger than the steepest slope allows
    slope = math.pi * 63 / 240
    assert all(abs(s.value_at(t + 1) - s.value_at(t)) <= slope + 1e-9 for t in range(239))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "expected steps:V@D"),
        ("square:1..2@3s", "expected steps:V@D"),
        ("steps:1,2", "expected VALUE@DURATION"),
        ("steps:1@3s,x@3s", "bad value 'x'"),
        ("steps:-1@3s", "bad value '-1'"),
        ("steps:0@3s", "never offers any load"),
        ("steps:1@3q", "bad duration '3q'"),
        ("ramp:1-64@10s", "expected ramp:A..B@DURATION"),
        ("ramp:1..64", "expected ramp:A..B@DURATION"),
        ("day:0..0@10s", "never offers any load"),
        ("day:1..nan@10s", "bad value 'nan'"),
    ],
)
def test_bad_schedules(spec: str, message: str) -> None:
    with pytest.raises(ScheduleError, match=message) as e:
        parse(spec)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--schedule", "steps:1@3q"], "bad duration '3q'"),
        (["--schedule", "ramp:1..4"], "expected ramp:A..B@DURATION"),
        (["--schedule", "steps:1@1s", "--concurrency", "1,8"], "not allowed with argument"),
        (["--schedule", "steps:1.5@1s"], "whole numbers of chains"),
        (["--schedule-unit", "chains/s"], "needs --schedule"),
        (["compare-routing"], "--schedule is required"),
        (["--schedule", "steps:1@1s", "--arrivals", "uniform"], "--arrivals is for arrival rates"),
        (["compare-routing", "--schedule", "steps:1@1s", "--policies", "bf16,teleport"], "unknown policy"),
    ],
)
def test_bad_schedule_options_are_one_line_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Any
) -> None:
    try:
        code = main([*args, "--out", str(tmp_path / "out")])
    except SystemExit as e:
        code = e.code
    assert code == 2 and not (tmp_path / "out").exists()  # nothing ran, nothing written
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 1 or err[0].startswith("usage:"), err
    err = err[-1]
    assert message in err, err


# -- arrivals ---------------------------------------------------------------------------------------------


def test_poisson_counts_within_bounds() -> None:
    s = parse("steps:20@50s,5@50s")
    for seed in range(5):
        times = arrival_times(s, "poisson", random.Random(seed))
        assert times == sorted(times) and all(0 <= t < 100 for t in times)
        first = sum(t < 50 for t in times)
        second = len(times) - first
        # mean 1000 and 250; 4 standard deviations
        assert abs(first - 1000) < 4 * math.sqrt(1000) and abs(second - 250) < 4 * math.sqrt(250)
    assert arrival_times(s, "poisson", random.Random(7)) == arrival_times(s, "poisson", random.Random(7))


def test_poisson_gaps_are_exponential() -> None:
    times = arrival_times(parse("steps:10@200s"), "poisson", random.Random(3))
    gaps = [b - a for a, b in itertools.pairwise(times)]
    mean = sum(gaps) / len(gaps)
    cv = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps)) / mean
    assert mean == pytest.approx(0.1, rel=0.1) and cv == pytest.approx(1.0, abs=0.1)


def test_uniform_arrivals_follow_the_integral() -> None:
    times = arrival_times(parse("steps:4@10s"), "uniform", random.Random(0))
    assert len(times) == 40 and times[0] == pytest.approx(0.125)
    assert all(b - a == pytest.approx(0.25) for a, b in itertools.pairwise(times))
    ramp = parse("ramp:0..10@20s")  # integral 100, half of it in the last 5.86 s
    times = arrival_times(ramp, "uniform", random.Random(0))
    assert len(times) == 100
    for t in (5.0, 10.0, 15.0):
        assert abs(sum(x < t for x in times) - 10 * t * t / 40) <= 1


# -- the runner ---------------------------------------------------------------------------------------------


class StubClient:
    """Answers every hop correctly after ``delay_s``; records requests in flight over time."""

    def __init__(self, delay_s: float = 0.02) -> None:
        self.delay_s = delay_s
        self.inflight = 0
        self.sent: list[tuple[float, str, int]] = []

    async def chat(self, prompt: str, *, chain: str, hop: int, headers: dict[str, str]) -> Exchange:
        ex = Exchange(chain, hop, time.monotonic())
        self.sent.append((ex.t_send, chain, hop))
        self.inflight += 1
        try:
            await asyncio.sleep(self.delay_s)
        finally:
            self.inflight -= 1
        ex.t_first = ex.t_end = time.monotonic()
        ex.status, ex.text, ex.completion_tokens = "ok", "1 + 1 = 2\n#### 2", 5
        return ex


def _chains_in_flight(run: Any, t: float) -> int:
    return sum(1 for c in run.run.chains if c.t_start <= t < c.t_end)


def test_closed_loop_follows_the_steps_and_removes_chains_at_their_ends() -> None:
    client = StubClient(delay_s=0.03)
    plan = SchedulePlan("bf16", parse("steps:2@0.6s,6@0.6s,1@0.6s"))
    out = asyncio.run(run_schedule(client, plan, synthetic(500, seed=1), "t"))
    t0 = out.t0
    assert [c for _, c in out.targets] == [2, 6, 1]
    # in the middle of each step the load is the step's (after the first chains of a drop have ended)
    assert _chains_in_flight(out, t0 + 0.3) == 2 and _chains_in_flight(out, t0 + 0.9) == 6
    assert _chains_in_flight(out, t0 + 1.2 + 0.35) == 1  # the longest chain (6 hops) takes 0.18 s
    # every chain ran every hop: none was cut, and none started after the schedule ended
    assert all(len(c.exchanges) == c.problem.hops and c.score is not None for c in out.run.chains)
    assert all(c.t_start < out.t_sched_end for c in out.run.chains)
    assert out.t_end >= out.t_sched_end >= t0 + 1.8
    # chains that were in flight at the drop from 6 to 1 finished after it: removed at their ends
    drop = t0 + 1.2
    overlapping = [c for c in out.run.chains if c.t_start < drop < c.t_end]
    assert len(overlapping) >= 2 and all(len(c.exchanges) == c.problem.hops for c in overlapping)


def test_closed_loop_on_a_ramp() -> None:
    plan = SchedulePlan("bf16", parse("ramp:1..5@1s"), tick_s=0.02)
    out = asyncio.run(run_schedule(StubClient(0.01), plan, synthetic(500, seed=1), "t"))
    assert [c for _, c in out.targets] == [1, 2, 3, 4, 5]
    assert _chains_in_flight(out, out.t0 + 0.05) == 1


def test_open_loop_chains_per_second() -> None:
    plan = SchedulePlan("bf16", parse("steps:40@0.5s"), unit="chains/s", arrivals="uniform")
    out = asyncio.run(run_schedule(StubClient(0.01), plan, synthetic(100, seed=1), "t"))
    starts = sorted(c.t_start - out.t0 for c in out.run.chains)
    assert len(starts) == 20 and all(abs(s - (i + 0.5) / 40) < 0.02 for i, s in enumerate(starts))
    assert all(c.score is not None for c in out.run.chains)


def test_open_loop_requests_per_second_sends_one_hop_per_arrival() -> None:
    client = StubClient(0.005)
    plan = SchedulePlan("bf16", parse("steps:50@1s"), unit="requests/s", arrivals="uniform")
    out = asyncio.run(run_schedule(client, plan, synthetic(100, seed=1), "t"))
    during = [t for t, _, _ in client.sent if t < out.t_sched_end]
    assert abs(len(during) - 50) <= 2  # one request per arrival while the schedule runs
    # every chain still ran its hops in order and to the end (the drain sends the rest at once)
    for c in out.run.chains:
        assert [e.hop for e in c.exchanges] == list(range(1, c.problem.hops + 1))


def test_stop_interrupts_a_schedule() -> None:
    async def go() -> Any:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.2, stop.set)
        plan = SchedulePlan("bf16", parse("steps:3@10s"))
        return await run_schedule(StubClient(0.05), plan, synthetic(100, seed=1), "t", stop=stop)

    t = time.monotonic()
    out = asyncio.run(go())
    assert out.run.interrupted and time.monotonic() - t < 2


def test_timeline_windows_and_fleet_energy() -> None:
    from loadgen.timeline import summarise

    plan = SchedulePlan("bf16", parse("steps:2@0.4s"))
    out = asyncio.run(run_schedule(StubClient(0.02), plan, synthetic(100, seed=1), "t"))

    def snap(t: float, joules: float) -> dict[str, Any]:  # two devices, 100 W each from the run's start
        dev = {"metered_j": joules, "measured_j": joules}
        return {"t": t, "devices": {"gpu0": dev, "gpu1": dict(dev)}}

    snaps = [snap(out.t0 + t, 100.0 * t) for t in (0.0, 0.2, 0.4)] + [
        snap(out.t_end, 100.0 * (out.t_end - out.t0))
    ]
    doc = summarise(out, snaps, model="m@bf16", window_s=0.2, bootstrap=50)
    t = doc["totals"]
    assert t["fleet_energy_j"] == pytest.approx(200.0 * (out.t_end - out.t0))
    assert t["energy_by_device"]["gpu0"] == pytest.approx(t["fleet_energy_j"] / 2)
    # the stub's answers are wrong: accuracy 0, and J per correct answer null (never infinite)
    assert t["accuracy"] == 0.0 and t["correct"] == 0 and t["j_per_correct"] is None
    assert t["precision_share"] == {"unknown": 1.0}  # the stub names no precision
    ws = doc["windows"]
    assert ws[0]["energy_j"] == pytest.approx(40.0) and ws[0]["offered"] == pytest.approx(2.0)
    assert sum(w["energy_j"] for w in ws) == pytest.approx(t["fleet_energy_j"])
    assert sum(w["chains_ended"] for w in ws) == t["chains"]
    assert all(w["offered"] == 0 for w in ws if w["t_start_s"] >= t["schedule_s"])  # the drain
    # no meter: energy null with a reason, the rest still computed
    dark = summarise(out, [None, None], model="m", window_s=0.2, bootstrap=50)
    assert dark["totals"]["fleet_energy_j"] is None and dark["totals"]["fleet_energy_null_reason"]
    assert all(w["energy_j"] is None and w["energy_null_reason"] for w in dark["windows"])
