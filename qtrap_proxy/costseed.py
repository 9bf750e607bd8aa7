"""The cost model's load buckets, and its optional seed: J/token per precision and load from a loadgen report.

A load is the number of requests in flight on one backend; buckets are powers of two (0, 1, 2-3, 4-7, ...,
256+), so a handful of buckets covers every load a GPU runs at and each fills quickly.

``read_seed`` reads a loadgen ``report.json`` with plain dict access (the proxy never imports loadgen):
each level's ``precision``, ``concurrency``, ``j_per_token`` and, when present, the 95% interval
``ci.j_per_token``. Anything not shaped so is a :class:`ConfigError` of one line naming what is wrong.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtrap_proxy.errors import ConfigError

N_BUCKETS = 10  # 0, 1, 2-3, 4-7, 8-15, 16-31, 32-63, 64-127, 128-255, 256+
SEED_REL_STDERR = 0.1  # a seeded level without an interval: standard error 10% of its mean
_READER_MAJOR = "1"
_MAX_REPORT_BYTES = 64 * 1024 * 1024


def bucket(load: int) -> int:
    """The bucket of a load (requests in flight on one backend)."""
    return min(load.bit_length(), N_BUCKETS - 1) if load > 0 else 0


def bucket_label(i: int) -> str:
    if i == 0:
        return "0"
    if i == N_BUCKETS - 1:
        return f"{1 << (i - 1)}+"
    lo, hi = 1 << (i - 1), (1 << i) - 1
    return str(lo) if lo == hi else f"{lo}-{hi}"


@dataclass(frozen=True, slots=True)
class SeedLevel:
    precision: str
    concurrency: int
    j_per_token: float
    stderr: float  # from the level's 95% interval, else SEED_REL_STDERR of the mean
    interval: bool  # the standard error came from the report's interval
    tokens_per_s: float | None = None  # the level's output tokens per second, when the report says

    @property
    def bucket(self) -> int:
        return bucket(self.concurrency)


@dataclass(frozen=True, slots=True)
class Seed:
    path: str
    model: str | None  # the pool the report's run asked for, when it says
    levels: list[SeedLevel]
    skipped: int  # levels without a usable J/token (energy unknown)


def _positive(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def read_seed(path: str | Path) -> Seed:
    """The seed levels of a loadgen report; ConfigError (one line) for anything unreadable or misshapen."""
    where = str(path)
    try:
        raw = Path(path).read_bytes()[: _MAX_REPORT_BYTES + 1]
    except OSError as e:
        raise ConfigError(f"seed report {where}: cannot read: {e.strerror or e}") from e
    if len(raw) > _MAX_REPORT_BYTES:
        raise ConfigError(f"seed report {where}: larger than {_MAX_REPORT_BYTES} bytes")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"seed report {where}: not JSON ({str(e).splitlines()[0][:120]})") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("levels"), list):
        raise ConfigError(f"seed report {where}: not a qtrap loadgen report (no `levels` list)")
    version = doc.get("schema_version")
    if not isinstance(version, str) or version.split(".")[0] != _READER_MAJOR:
        raise ConfigError(
            f"seed report {where}: schema_version {str(version)[:40]!r} is not {_READER_MAJOR}.x "
            "(a loadgen report.json)"
        )
    config = doc.get("config")
    model = config.get("model") if isinstance(config, dict) else None
    levels: list[SeedLevel] = []
    skipped = 0
    for i, level in enumerate(doc["levels"]):
        if not isinstance(level, dict):
            raise ConfigError(f"seed report {where}: levels[{i}] is not an object")
        precision, concurrency = level.get("precision"), level.get("concurrency")
        if not isinstance(precision, str) or not precision or "@" in precision or len(precision) > 64:
            raise ConfigError(f"seed report {where}: levels[{i}].precision must be a precision name")
        if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
            raise ConfigError(f"seed report {where}: levels[{i}].concurrency must be a positive integer")
        jpt = level.get("j_per_token")
        if jpt is None:
            skipped += 1
            continue
        if not _positive(jpt):
            raise ConfigError(
                f"seed report {where}: levels[{i}].j_per_token must be a positive number or null"
            )
        stderr, interval = float(jpt) * SEED_REL_STDERR, False
        ci = level.get("ci")
        bounds = ci.get("j_per_token") if isinstance(ci, dict) else None
        if (
            isinstance(bounds, list)
            and len(bounds) == 2
            and all(_positive(b) for b in bounds)
            and bounds[1] > bounds[0]
        ):
            stderr, interval = (float(bounds[1]) - float(bounds[0])) / (2 * 1.96), True
        rate = level.get("tokens_per_s")
        tokens_per_s = float(rate) if rate is not None and _positive(rate) else None
        levels.append(SeedLevel(precision, concurrency, float(jpt), stderr, interval, tokens_per_s))
    if not levels:
        raise ConfigError(f"seed report {where}: no level has a J/token (was the run metered?)")
    return Seed(where, model if isinstance(model, str) else None, levels, skipped)
