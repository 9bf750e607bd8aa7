"""What loadgen asks the proxy: its pools, final records of chains, and device energy counters, through
the admin API's client (``qtrap_client``) on loadgen's own aiohttp session."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from loadgen.runner import LevelRun
from qtrap_client import ApiError, ProtocolError, ProxyUnreachable, QtrapClient, QtrapClientError


class ProxyError(RuntimeError):
    """The proxy cannot be used for this run; the message is one line for the CLI."""


def client(session: aiohttp.ClientSession, base: str) -> QtrapClient:
    """The admin API's client on loadgen's session (closing it leaves the session open)."""
    return QtrapClient(base, session=session)


async def pool_precisions(session: aiohttp.ClientSession, base: str, model: str) -> list[str]:
    """Precisions the proxy serves for pool ``model``, from its /v1/models (``pool@precision`` ids)."""
    try:
        ids = await client(session, base).models()
    except ProxyUnreachable as e:
        cause = e.__cause__
        raise ProxyError(f"proxy {base} is unreachable: {cause or type(cause).__name__}") from e
    except (ApiError, ProtocolError) as e:
        status = e.status if isinstance(e, ApiError) else 200
        raise ProxyError(f"proxy {base} answered /v1/models with HTTP {status}; is it a qtrap proxy?") from e
    if model not in ids:
        pools = sorted({i.split("@")[0] for i in ids})
        raise ProxyError(f"the proxy serves no model {model!r}; it serves: {', '.join(pools) or 'nothing'}")
    precs = [i.split("@", 1)[1] for i in ids if i.startswith(model + "@")]
    return list(dict.fromkeys(precs))


async def admin_refused(session: aiohttp.ClientSession, base: str) -> str | None:
    """Why the proxy's admin routes are closed to this run (auth on, no admin key), or None."""
    try:
        await client(session, base).energy(timeout_s=5.0)
    except ApiError as e:
        if e.status in (401, 403):
            return (
                f"the proxy refused GET /qtrap/v1/energy (HTTP {e.status}): measured energy and the backends "
                "need its admin key (--admin-key or $QTRAP_ADMIN_KEY); records are read with the client key"
            )
    except QtrapClientError:
        pass
    return None


async def energy_snapshot(session: aiohttp.ClientSession, base: str) -> dict[str, Any] | None:
    """``GET /qtrap/v1/energy`` with the client's clock; None when the proxy does not answer."""
    t = time.monotonic()
    try:
        doc = await client(session, base).energy(timeout_s=5.0)
    except QtrapClientError:
        return None
    return {
        "t": (t + time.monotonic()) / 2,
        "devices": {d["device"]: d for d in doc.get("devices", [])},
        **{k: doc.get(k) for k in ("meter", "policy", "interval_s")},
    }


async def fetch_records(
    session: aiohttp.ClientSession, base: str, run: LevelRun, *, timeout_s: float = 60.0, parallel: int = 16
) -> int:
    """Attach the proxy's record to every exchange of ``run``, waiting for records to turn final
    (a final figure exists only after the meter's next update following a request's end).
    Returns how many exchanges still have no final record when ``timeout_s`` runs out."""
    by_chain: dict[str, list[Any]] = {}
    for ex in run.exchanges:
        if ex.request_id is not None:
            by_chain.setdefault(ex.chain, []).append(ex)
    deadline = time.monotonic() + timeout_s
    sem = asyncio.Semaphore(parallel)
    api = client(session, base)

    async def one(chain_id: str, exchanges: list[Any]) -> bool:
        while True:
            async with sem:
                try:
                    summary = await api.chain(chain_id)
                except QtrapClientError:
                    summary = None
            if summary is not None:
                recs = {r["id"]: r for r in summary["records"]}
                for ex in exchanges:
                    ex.record = recs.get(ex.request_id, ex.record)
                if all(ex.record is not None and ex.record.get("final") for ex in exchanges):
                    return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.2)

    results = await asyncio.gather(*(one(c, exs) for c, exs in by_chain.items()))
    return sum(len(by_chain[c]) for c, ok in zip(by_chain, results, strict=True) if not ok)
