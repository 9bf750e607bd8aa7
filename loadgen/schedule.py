"""Time-varying load: the ``--schedule`` grammar, its curves, and open-loop arrival times.

A schedule is one line, ``SHAPE:ARGS``:

* ``steps:V@D,V@D,...``: value V for D, then the next (``steps:1@30s,8@30s,64@60s``);
* ``ramp:A..B@D``: from A to B linearly over D (``ramp:1..64@120s``; B < A ramps down);
* ``day:A..B@D``: a daily cycle compressed into D: the run starts at midnight, the value is A at 03:00
  (night), B at 15:00 (afternoon) and follows a cosine in between (``day:1..64@300s``).

Durations are seconds, bare or with a unit: ``500ms``, ``30s``, ``2m``, ``1h``. Values are numbers >= 0.
What a value means is ``--schedule-unit``'s: concurrency (chains in flight, closed loop; rounded to the
nearest integer) or an arrival rate (chains or requests per second, open loop; ``arrival_times``).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

SHAPES = ("steps", "ramp", "day")
UNITS = ("concurrency", "chains/s", "requests/s")
ARRIVALS = ("poisson", "uniform")
NIGHT_H, PEAK_H = 3.0, 15.0  # the day curve's lowest and highest hours

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class ScheduleError(ValueError):
    """A schedule that cannot be parsed; the message is one line for the CLI."""


def parse_duration(text: str) -> float:
    m = _DURATION.match(text)
    if not m:
        raise ScheduleError(f"bad duration {text!r}: expected e.g. 30s, 500ms, 2m, 1h")
    seconds = float(m.group(1)) * _UNIT_S[m.group(2)]
    if seconds <= 0:
        raise ScheduleError(f"duration {text!r} must be > 0")
    return seconds


def _value(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ScheduleError(f"bad value {text!r}: expected a number >= 0") from None
    if not math.isfinite(v) or v < 0:
        raise ScheduleError(f"bad value {text!r}: expected a number >= 0")
    return v


@dataclass(frozen=True, slots=True)
class Schedule:
    """A load curve over ``[0, duration_s)``."""

    spec: str  # as written
    shape: str  # steps | ramp | day
    points: tuple[tuple[float, float], ...]  # steps: (value, duration); ramp/day: ((lo, hi), (duration, 0))

    @property
    def duration_s(self) -> float:
        if self.shape == "steps":
            return sum(d for _, d in self.points)
        return self.points[1][0]

    def value_at(self, t: float) -> float:
        """The load at ``t`` seconds after the start (the last value at and after the end)."""
        if self.shape == "steps":
            edge = 0.0
            for v, d in self.points:
                edge += d
                if t < edge:
                    return v
            return self.points[-1][0]
        (a, b), (dur, _) = self.points
        x = min(max(t / dur, 0.0), 1.0)
        if self.shape == "ramp":
            return a + (b - a) * x
        hour = 24.0 * x
        return a + (b - a) * (1.0 - math.cos(2.0 * math.pi * (hour - NIGHT_H) / 24.0)) / 2.0

    def peak(self) -> float:
        if self.shape == "steps":
            return max(v for v, _ in self.points)
        (a, b), _ = self.points
        return max(a, b)

    def mean(self, t0: float, t1: float, n: int = 64) -> float:
        """The mean value over ``[t0, t1)`` (midpoint rule; exact for steps whose edges fall on the grid)."""
        if t1 <= t0:
            return self.value_at(t0)
        h = (t1 - t0) / n
        return sum(self.value_at(t0 + (i + 0.5) * h) for i in range(n)) / n

    def changes(self) -> list[float]:
        """Times at which a step begins (steps), else an empty list (the curve moves continuously)."""
        if self.shape != "steps":
            return []
        out, edge = [], 0.0
        for _, d in self.points:
            out.append(edge)
            edge += d
        return out


def parse(spec: str) -> Schedule:
    """``steps:1@30s,8@30s`` / ``ramp:1..64@120s`` / ``day:1..64@300s``; ScheduleError when malformed."""
    shape, sep, body = spec.strip().partition(":")
    shape = shape.strip().lower()
    if not sep or shape not in SHAPES:
        raise ScheduleError(
            f"bad schedule {spec!r}: expected steps:V@D,V@D,..., ramp:A..B@D or day:A..B@D "
            "(e.g. steps:1@30s,8@30s, ramp:1..64@120s, day:1..64@300s)"
        )
    if shape == "steps":
        points: list[tuple[float, float]] = []
        for part in body.split(","):
            value, at, dur = part.partition("@")
            if not at or not value.strip():
                raise ScheduleError(
                    f"bad step {part.strip()!r} in {spec!r}: expected VALUE@DURATION, e.g. 8@30s"
                )
            points.append((_value(value.strip()), parse_duration(dur)))
        if not any(v > 0 for v, _ in points):
            raise ScheduleError(f"schedule {spec!r} never offers any load (every value is 0)")
        return Schedule(spec.strip(), shape, tuple(points))
    rng, at, dur = body.partition("@")
    lo, dots, hi = rng.partition("..")
    if not at or not dots:
        raise ScheduleError(
            f"bad {shape} {body!r} in {spec!r}: expected {shape}:A..B@DURATION, e.g. {shape}:1..64@120s"
        )
    a, b = _value(lo.strip()), _value(hi.strip())
    if a == 0 and b == 0:
        raise ScheduleError(f"schedule {spec!r} never offers any load (both ends are 0)")
    return Schedule(spec.strip(), shape, ((a, b), (parse_duration(dur), 0.0)))


def arrival_times(schedule: Schedule, process: str, rng: random.Random, step_s: float = 0.005) -> list[float]:
    """Arrival times in ``[0, duration)`` for a rate schedule (per second).

    poisson: a non-homogeneous Poisson process by thinning (Lewis and Shedler): candidates at the peak
    rate, each kept with probability rate(t) / peak. uniform: evenly spaced in the integrated rate
    (an arrival each time the expected count passes an integer), so a constant rate r gives one every
    1/r seconds and the count over any window is within 1 of its integral."""
    dur = schedule.duration_s
    if process == "poisson":
        peak = schedule.peak()
        out: list[float] = []
        if peak <= 0:
            return out
        t = 0.0
        while True:
            t += rng.expovariate(peak)
            if t >= dur:
                return out
            if rng.random() * peak < schedule.value_at(t):
                out.append(t)
    if process != "uniform":
        raise ValueError(f"unknown arrival process {process!r}")
    out = []
    acc, t, k = 0.0, 0.0, 1
    n = max(1, math.ceil(dur / step_s))
    h = dur / n
    for i in range(n):
        mid = schedule.value_at(t + h / 2)
        inc = mid * h
        while acc + inc >= k - 0.5:  # first arrival half a period in: the count rounds its integral
            frac = (k - 0.5 - acc) / inc if inc > 0 else 0.0
            out.append(t + frac * h)
            k += 1
        acc += inc
        t = (i + 1) * h
    return out
