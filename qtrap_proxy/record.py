"""The wire shapes the proxy writes (``qtrap_common.wire``), each built in one place.

:func:`build_record` is the only place a request's record is shaped, from its energy account
(``Tracked``: the token timeline and the energy attributed to it), at one of three stages:

* ``provisional``: in flight or waiting for its final figure; ``energy_j`` is the estimate so far
  (``final: false``, ``provisional: true``; idle energy, error bound and per-hop energy null);
* ``committing``: its final figure is known and queued for the ledger, not yet committed
  (``final: false``, ``provisional: false``): it turns final only once it survives a crash;
* ``final``: the figure as written to the ledger (``final: true``).

Energy is null when it is unknown, never 0, and ``energy_null_reason`` (energy/reasons.py) says why.
:func:`chain_summary` and :func:`chain_page` shape a chain's records into the chain API's answer.
"""

from __future__ import annotations

from typing import Literal

from qtrap_common.wire import ChainHop, ChainPage, ChainSummary, EngineTiming, HopEnergy, RequestRecord
from qtrap_proxy.carbon import Footprint
from qtrap_proxy.energy import reasons
from qtrap_proxy.energy.attribution import Tracked

Stage = Literal["provisional", "committing", "final"]


def build_record(
    tr: Tracked,
    stage: Stage,
    *,
    meter: str,
    devices: list[str],
    provisional_j: float | None = None,
    compare_views: bool = False,
    footprint: Footprint | None = None,
    pue: float = 1.0,
) -> RequestRecord:
    """A request's record at ``stage``; ``provisional_j`` is the estimate a provisional record shows,
    ``footprint`` the carbon and cost of a settled one (carbon.py; None: null, not final yet)."""
    tl = tr.tl
    settled = stage != "provisional"  # the energy figures are the final ones
    known = tr.energy_known and tr.devices > 0
    energy = (tr.energy_j if settled else provisional_j) if known else None
    completion = tl.completion_tokens
    return {
        "id": tl.request_id,
        "chain_id": tl.chain_id,
        "hop": tl.hop,
        "key_id": tl.key_id,
        "client_request_id": tl.client_request_id,
        "route": tl.route,
        "stream": tl.stream,
        "pool": tl.pool,
        "backend": tl.backend,
        "precision": tl.precision,
        "status": tl.status,
        "http_status": tl.http_status,
        "error": tl.error,
        "start_unix_s": tl.start_unix_s,
        "prompt_tokens": tl.prompt_tokens,
        "cached_tokens": tl.cached_tokens,
        "completion_tokens": completion,
        "ttft_s": tl.ttft_s,
        "e2e_s": tl.e2e_s,
        "chunks": len(tl.chunk_t),
        "tokens_exact": tl.tokens_exact,
        "timeline": {
            "t_s": [round(t - tl.start, 6) for t in tl.chunk_t],
            "tokens": list(tl.chunk_tokens),
        },
        "devices": devices,
        "meter": meter,
        "final": stage == "final",
        "energy_j": energy,
        "idle_energy_j": (tr.idle_energy_j if settled else None) if known else None,
        "j_per_token": (energy / completion) if energy is not None and completion else None,
        "error_bound_j": (tr.bound_j if settled else None) if known else None,
        "energy_null_reason": None if known else tr.unknown_reason,
        "provisional": not settled,
        "hops": _hops(tr, energy, known and settled),
        "facts": tr.facts,
        "facts_reason": tr.facts_reason if tr.facts == "proxy" else None,
        "engine_timing": _engine_timing(tr),
        "energy_proxy_view_j": tr.proxy_view_j if known and settled and compare_views else None,
        "co2e_g": footprint.co2e_g if footprint else None,
        "co2e_null_reason": footprint.co2e_null_reason if footprint else reasons.NOT_FINAL_YET,
        "carbon_intensity_g_per_kwh": footprint.carbon_intensity_g_per_kwh if footprint else None,
        "pue": footprint.pue if footprint else pue,
        "cost": footprint.cost if footprint else None,
        "cost_currency": footprint.cost_currency if footprint else None,
        "cost_null_reason": footprint.cost_null_reason if footprint else reasons.NOT_FINAL_YET,
    }


def settled_energy(tr: Tracked) -> tuple[float | None, str | None]:
    """A settled account's energy as its record shows it, and why it is unknown (None when known)."""
    if tr.energy_known and tr.devices > 0:
        return tr.energy_j, None
    return None, tr.unknown_reason


def _engine_timing(tr: Tracked) -> EngineTiming | None:
    e = tr.engine
    if e is None:
        return None
    t0 = tr.tl.start
    return {
        "source": e.source,
        "queued_s": None if e.queued is None else round(e.queued - t0, 6),
        "prefill_start_s": round(e.prefill_start - t0, 6),
        "first_token_s": None if e.first_token is None else round(e.first_token - t0, 6),
        "last_token_s": round(e.last_token - t0, 6),
        "prompt_tokens": e.prompt_tokens,
        "completion_tokens": e.completion_tokens,
        "clock_error_s": e.clock_error_s,
    }


def _hops(tr: Tracked, energy: float | None, hop_energy: bool) -> list[HopEnergy]:
    """The record's hops: one per hop of a stream split into hops (``x-qtrap-hop-split``; their energy
    only when ``hop_energy``), else the request itself as its chain's hop."""
    tl = tr.tl
    if not (tr.hop_split and tl.chunk_hop is not None):
        return [{"index": tl.hop or 1, "tokens": tl.completion_tokens, "energy_j": energy}]
    tokens_by_hop: dict[int, int] = {}
    for h, n in zip(tl.chunk_hop, tl.chunk_tokens, strict=False):
        tokens_by_hop[h] = tokens_by_hop.get(h, 0) + n
    count = max([*tokens_by_hop, len(tr.hop_energy_j) - 1, 0]) + 1
    return [
        {
            "index": i + 1,
            "tokens": tokens_by_hop.get(i, 0),
            "energy_j": (tr.hop_energy_j[i] if i < len(tr.hop_energy_j) else 0.0) if hop_energy else None,
        }
        for i in range(count)
    ]


def chain_summary(chain_id: str, records: list[RequestRecord]) -> ChainSummary:
    """A chain's summary over its records (by hop and start)."""
    energies = [r.get("energy_j") for r in records]
    known = all(e is not None for e in energies)
    hops: list[ChainHop] = [
        {
            "index": r.get("hop"),
            "request_id": r["id"],
            "status": r.get("status"),
            "tokens": r.get("completion_tokens"),
            "energy_j": r.get("energy_j"),
            "final": r.get("final"),
        }
        for r in records
    ]
    return {
        "chain_id": chain_id,
        "requests": len(records),
        "final": all(r.get("final") for r in records),
        "energy_j": sum(e for e in energies if e is not None) if known else None,
        "energy_null_reason": None if known else reasons.CHAIN_HOP_UNKNOWN,
        "prompt_tokens": sum(r.get("prompt_tokens") or 0 for r in records),
        "completion_tokens": sum(r.get("completion_tokens") or 0 for r in records),
        "hops": hops,
        "records": records,
    }


def chain_page(summary: ChainSummary, offset: int, limit: int) -> ChainPage:
    """``summary`` with its ``records`` and ``hops`` cut to ``limit`` from ``offset`` (the totals stay the
    chain's); ``next_offset`` is null on the last page."""
    total = len(summary["records"])
    end = offset + limit
    return {
        **summary,
        "records": summary["records"][offset:end],
        "hops": summary["hops"][offset:end],
        "offset": offset,
        "limit": limit,
        "next_offset": end if end < total else None,
    }
