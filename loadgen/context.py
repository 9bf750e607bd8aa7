"""The report's header: what ran, where and when.

Date, qtrap's version and the command line come from loadgen itself; the backends and the engines they
run from the proxy's ``GET /qtrap/v1/backends`` (vLLM's ``/version``, TGI's ``/info``, or "qtrap-sim
(simulated)"); the GPUs, their names and the meter's kind, policy and update period from its
``GET /qtrap/v1/energy``. A proxy too old to have ``/qtrap/v1/backends`` leaves ``backends`` empty with
the reason.
"""

from __future__ import annotations

import shlex
import statistics
import time
from collections.abc import Sequence
from typing import Any

import aiohttp

from loadgen import __version__
from qtrap_client import ApiError, ProtocolError, ProxyUnreachable, QtrapClient
from qtrap_common import wire

COMMAND = "python -m loadgen"
KEY_OPTIONS = ("--api-key", "--admin-key")


def redact_keys(argv: Sequence[str]) -> list[str]:
    """``argv`` with the values of the key options replaced by ``REDACTED`` (the report must not carry a key)."""
    out: list[str] = []
    hide = False
    for a in argv:
        if hide:
            out.append("REDACTED")
            hide = False
        elif a in KEY_OPTIONS:
            out.append(a)
            hide = True
        elif a.startswith(tuple(o + "=" for o in KEY_OPTIONS)):
            out.append(a.split("=", 1)[0] + "=REDACTED")
        else:
            out.append(a)
    return out


async def fetch_backends(
    session: aiohttp.ClientSession, base: str
) -> tuple[list[dict[str, Any]], str | None]:
    """The proxy's backends with their engines, or ([], why)."""
    try:
        return await QtrapClient(base, session=session).backends(timeout_s=15), None
    except ApiError as e:
        return [], f"GET {wire.BACKENDS_PATH}: HTTP {e.status} (a proxy without the route?)"
    except ProtocolError:
        return [], f"GET {wire.BACKENDS_PATH}: not a list of backends"
    except ProxyUnreachable as e:
        cause = e.__cause__
        return [], f"GET {wire.BACKENDS_PATH}: {cause or type(cause).__name__}"


def build_context(
    *,
    started_unix_s: float,
    argv: Sequence[str],
    proxy_url: str,
    embedded: bool,
    model: str,
    dataset: str,
    data_file: str | None,
    hops: str,
    precisions: Sequence[str],
    backends: list[dict[str, Any]],
    backends_null_reason: str | None,
    energy: dict[str, Any] | None,
) -> dict[str, Any]:
    """``Context``'s fields. ``backends``: the proxy's (every pool's); those of ``model`` at the swept
    precisions are kept. ``energy``: the last ``energy_snapshot`` (with the meter's kind and policy)."""
    mine = [b for b in backends if b.get("pool") == model and b.get("precision") in precisions]
    rows: list[dict[str, Any]] = [
        {
            "name": str(b.get("name")),
            "pool": str(b.get("pool")),
            "precision": str(b.get("precision")),
            "kind": str(b.get("kind")),
            "model": str(b.get("model")),
            "url": b.get("url"),
            "devices": [str(d) for d in b.get("devices") or []],
            "engine": str(b.get("engine") or b.get("kind")),
            "engine_version": b.get("engine_version"),
            "simulated": bool(b.get("simulated")),
            "served_model": b.get("served_model"),
            "max_model_len": b.get("max_model_len"),
            "dtype": b.get("dtype"),
            "engine_error": b.get("engine_error"),
        }
        for b in mine
    ]
    devices = (energy or {}).get("devices") or {}
    wanted = [d for b in rows for d in b["devices"]] or list(devices)
    gpus: list[dict[str, Any]] = [
        {
            "device": d,
            "name": (devices.get(d) or {}).get("name"),
            "update_period_s": (devices.get(d) or {}).get("update_period_s"),
        }
        for d in dict.fromkeys(wanted)
    ]
    periods = [float(g["update_period_s"]) for g in gpus if g["update_period_s"]]
    return {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_unix_s)),
        "qtrap_version": __version__,
        "command_line": shlex.join([*COMMAND.split(), *redact_keys(argv)]),
        "proxy_url": proxy_url,
        "embedded": embedded,
        "model": model,
        "dataset": dataset,
        "data_file": data_file,
        "hops": hops,
        "backends": rows,
        "backends_null_reason": None
        if rows
        else backends_null_reason or f"the proxy lists no backend of {model} at {', '.join(precisions)}",
        "gpus": gpus,
        "gpu_count": len(gpus),
        "gpu_names": sorted({g["name"] for g in gpus if g["name"]}),
        "meter": {
            "kind": (energy or {}).get("meter"),
            "policy": (energy or {}).get("policy"),
            "interval_s": (energy or {}).get("interval_s"),
            "update_period_s": statistics.median(periods) if periods else None,
        },
    }


def engine_line(b: Any) -> str:
    """``vLLM 0.26.0`` / ``qtrap-sim (simulated) 0.1.0`` / ``TGI (version unknown)`` of a BackendInfo."""
    version = b.engine_version or "(version unknown)"
    return f"{b.engine} {version}"


def run_context(
    args: Any,
    url: str,
    precisions: Sequence[str],
    facts: dict[str, Any],
    started_unix_s: float,
    argv: Sequence[str],
) -> dict[str, Any]:
    """``build_context`` for a loadgen run: its options (``args``), the proxy it ran against, and what it asked
    the proxy (``facts``: ``backends`` as ``fetch_backends`` gives them, ``energy`` the last snapshot); the
    key options' values in ``argv`` are redacted."""
    backends, backends_reason = facts.get("backends") or ([], "not asked (the run stopped first)")
    return build_context(
        started_unix_s=started_unix_s,
        argv=argv,
        proxy_url=url,
        embedded=not args.proxy,
        model=args.model or "qwen3-8b",
        dataset=args.dataset,
        data_file=args.data_file,
        hops=args.hops,
        precisions=precisions,
        backends=backends,
        backends_null_reason=backends_reason,
        energy=facts.get("energy"),
    )
