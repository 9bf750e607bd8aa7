"""A request's carbon and cost: its final GPU energy, times the PUE, times the grid's carbon intensity and
the electricity price at the request's time.

The method is CodeCarbon's (https://mlco2.github.io/codecarbon/methodology.html): emissions (gCO2e) =
energy consumed (kWh) x carbon intensity of the electricity (gCO2e/kWh). The energy is the request's
attributed GPU energy (``energy_j``: NVML's or dcgm-exporter's counter of the GPUs only, not the host's
CPU, memory or fans, and without the request's share of idle energy, ``idle_energy_j``), multiplied by
``carbon.pue`` (power usage effectiveness: the facility's energy over the IT equipment's; 1.0, the
default, counts the GPU alone). Cost = the same kWh x ``pricing.price_per_kwh``.

The intensity at a request's time (its ``start_unix_s``): a constant (``carbon.intensity_g_per_kwh``),
or the last point at or before that time of a series read from ``carbon.file`` (CSV or JSON) at start
or polled from ``carbon.url`` every ``carbon.poll_s`` (each value kept with the time it stands for); a
point older than ``carbon.max_age_s`` at the request's time is not used. Where it is unknown, or the
energy is, the figure is null with the reason (energy/reasons.py), never 0.
"""

from __future__ import annotations

import asyncio
import bisect
import csv
import io
import json
import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from qtrap_common.background import Background
from qtrap_proxy.config import CarbonConfig, PricingConfig
from qtrap_proxy.energy import reasons
from qtrap_proxy.errors import ConfigError

log = logging.getLogger("qtrap.carbon")

J_PER_KWH = 3.6e6
_MAX_POINTS = 100_000  # points kept from carbon.url (the oldest dropped beyond)


@dataclass(frozen=True, slots=True)
class Footprint:
    """A record's carbon and cost figures (null with a reason when unknown)."""

    co2e_g: float | None
    co2e_null_reason: str | None
    carbon_intensity_g_per_kwh: float | None  # the intensity used
    pue: float
    cost: float | None
    cost_currency: str | None
    cost_null_reason: str | None

    def fields(self) -> dict[str, Any]:
        return {
            "co2e_g": self.co2e_g,
            "co2e_null_reason": self.co2e_null_reason,
            "carbon_intensity_g_per_kwh": self.carbon_intensity_g_per_kwh,
            "pue": self.pue,
            "cost": self.cost,
            "cost_currency": self.cost_currency,
            "cost_null_reason": self.cost_null_reason,
        }


def parse_time(v: Any) -> float:
    """Unix seconds from a number or an RFC 3339 / ISO 8601 text (UTC unless it says); ValueError else."""
    if isinstance(v, bool):
        raise ValueError(f"not a time: {v!r}")
    if isinstance(v, int | float):
        t = float(v)
    else:
        text = str(v).strip()
        try:
            t = float(text)
        except ValueError:
            d = datetime.fromisoformat(text.replace("z", "Z").replace("t", "T"))
            if d.tzinfo is None:
                d = d.replace(tzinfo=UTC)
            t = d.timestamp()
    if not math.isfinite(t):
        raise ValueError(f"not a time: {v!r}")
    return t


def _value(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise ValueError(f"not an intensity: {v!r}")
    g = float(v)
    if not math.isfinite(g) or g < 0:
        raise ValueError(f"not an intensity: {v!r}")
    return g


def _point(obj: Any, now: float | None = None) -> tuple[float, float]:
    """One (time, g/kWh) from {timestamp, g_per_kwh} (Electricity Maps' {datetime, carbonIntensity} too),
    a [time, value] pair, or a bare number (time: ``now``)."""
    if isinstance(obj, dict):
        g = obj.get("g_per_kwh", obj.get("carbonIntensity"))
        t = obj.get("timestamp", obj.get("datetime"))
        if g is None:
            raise ValueError("no g_per_kwh")
        if t is None:
            if now is None:
                raise ValueError("no timestamp")
            return now, _value(g)
        return parse_time(t), _value(g)
    if isinstance(obj, list | tuple) and len(obj) == 2:
        return parse_time(obj[0]), _value(obj[1])
    if now is not None:
        return now, _value(obj)
    raise ValueError(f"not a point: {obj!r}")


def parse_series(text: str, *, now: float | None = None) -> list[tuple[float, float]]:
    """Points from JSON (a list of points, one point, or a number) or CSV (``timestamp,g_per_kwh`` rows,
    a header line allowed), sorted by time; ValueError naming the bad row."""
    stripped = text.strip()
    if not stripped:
        raise ValueError("empty")
    try:
        doc = json.loads(stripped)
    except json.JSONDecodeError:
        return _csv(stripped)
    items = doc if isinstance(doc, list) else [doc]
    points = []
    for i, item in enumerate(items):
        try:
            points.append(_point(item, now))
        except (ValueError, TypeError) as e:
            raise ValueError(f"point {i}: {e}") from e
    if not points:
        raise ValueError("no points")
    return sorted(points)


def _csv(text: str) -> list[tuple[float, float]]:
    points = []
    for n, row in enumerate(csv.reader(io.StringIO(text)), 1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        try:
            if len(row) < 2:
                raise ValueError("needs timestamp,g_per_kwh")
            points.append((parse_time(row[0]), _value(row[1].strip())))
        except ValueError as e:
            if n == 1 and not points:  # a header line
                continue
            raise ValueError(f"line {n}: {e}") from e
    if not points:
        raise ValueError("no points")
    return sorted(points)


class Carbon(Background):
    """The intensity source and the price; :meth:`footprint` for a final record."""

    task_name = "qtrap-carbon-poll"

    def __init__(self, carbon: CarbonConfig, pricing: PricingConfig) -> None:
        self.cfg = carbon
        self.pricing = pricing
        self._times: list[float] = []
        self._values: list[float] = []
        self.polls = 0
        self.poll_errors = 0
        self.last_error: str | None = None
        self.last_poll_unix_s: float | None = None
        if carbon.file is not None:
            try:
                points = parse_series(Path(carbon.file).read_text(encoding="utf-8"))
            except (OSError, ValueError, UnicodeDecodeError) as e:
                raise ConfigError(f"carbon.file: cannot read {carbon.file!r}: {e}") from e
            self._add(points)

    @property
    def polling(self) -> bool:
        return self.cfg.url is not None

    def _add(self, points: list[tuple[float, float]]) -> None:
        for t, g in points:
            i = bisect.bisect_left(self._times, t)
            if i < len(self._times) and self._times[i] == t:
                self._values[i] = g
            else:
                self._times.insert(i, t)
                self._values.insert(i, g)
        if len(self._times) > _MAX_POINTS:
            del self._times[:-_MAX_POINTS], self._values[:-_MAX_POINTS]

    def intensity_at(self, t_unix: float) -> tuple[float | None, str | None]:
        """gCO2e/kWh at ``t_unix`` and None, or None and why it is unknown."""
        cfg = self.cfg
        if cfg.intensity_g_per_kwh is not None:
            return cfg.intensity_g_per_kwh, None
        if not cfg.configured:
            return None, reasons.CARBON_OFF
        if not self._times:
            why = reasons.CARBON_NOT_FETCHED
            return None, why + (f" (last error: {self.last_error})" if self.last_error else "")
        i = bisect.bisect_right(self._times, t_unix) - 1
        if i < 0:
            return None, reasons.CARBON_BEFORE_SERIES
        age = t_unix - self._times[i]
        if age > cfg.max_age_s:
            return None, reasons.carbon_stale(age, cfg.max_age_s)
        return self._values[i], None

    def footprint(self, energy_j: float | None, energy_reason: str | None, t_unix: float) -> Footprint:
        """CO2e and cost of ``energy_j`` (the GPU energy of a final record) at ``t_unix``."""
        pue = self.cfg.pue
        price = self.pricing.price_per_kwh
        currency = self.pricing.currency if price is not None else None
        if energy_j is None:
            why = reasons.energy_unknown(energy_reason)
            g, g_why = self.intensity_at(t_unix)
            return Footprint(
                None, why, g, pue, None, currency, why if price is not None else reasons.PRICING_OFF
            )
        kwh = energy_j / J_PER_KWH * pue
        g, g_why = self.intensity_at(t_unix)
        return Footprint(
            kwh * g if g is not None else None,
            g_why,
            g,
            pue,
            kwh * price if price is not None else None,
            currency,
            None if price is not None else reasons.PRICING_OFF,
        )

    def state(self) -> dict[str, Any]:
        """For GET /qtrap/v1/energy: the source, the latest point and its age, the polls."""
        cfg = self.cfg
        source = (
            "constant"
            if cfg.intensity_g_per_kwh is not None
            else "file"
            if cfg.file is not None
            else "url"
            if cfg.url is not None
            else None
        )
        now = time.time()
        g, why = self.intensity_at(now)
        return {
            "source": source,
            "intensity_g_per_kwh": g,
            "intensity_null_reason": why,
            "latest_point_unix_s": self._times[-1] if self._times else None,
            "latest_point_age_s": now - self._times[-1] if self._times else None,
            "points": len(self._times),
            "pue": cfg.pue,
            "price_per_kwh": self.pricing.price_per_kwh,
            "currency": self.pricing.currency if self.pricing.price_per_kwh is not None else None,
            "polls": self.polls,
            "poll_errors": self.poll_errors,
            "last_error": self.last_error,
        }

    async def poll_once(self, session: aiohttp.ClientSession) -> None:
        """Read carbon.url once: its points join the series (a failure is counted and kept as last_error)."""
        assert self.cfg.url is not None
        self.polls += 1
        try:
            async with session.get(
                self.cfg.url, timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s)
            ) as r:
                text = await r.text()
                if r.status != 200:
                    raise ValueError(f"HTTP {r.status}")
            now = time.time()
            self._add(parse_series(text, now=now))
            self.last_poll_unix_s = now
            self.last_error = None
        except (TimeoutError, aiohttp.ClientError, ValueError, UnicodeDecodeError) as e:
            self.poll_errors += 1
            self.last_error = f"{type(e).__name__}: {e}"[:300]
            log.warning("carbon.url %s: %s", self.cfg.url, self.last_error)

    async def _run(self) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                await self.poll_once(session)
                await asyncio.sleep(self.cfg.poll_s)
