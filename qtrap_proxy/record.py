"""The request record (DESIGN.md's contract) and the chain summary, built from a request's account."""

from __future__ import annotations

from typing import Any

from qtrap_proxy.energy import reasons
from qtrap_proxy.energy.attribution import Tracked


def build_record(
    tr: Tracked, *, final: bool, meter: str, devices: list[str], provisional_j: float | None = None
) -> dict[str, Any]:
    tl = tr.tl
    rec = tl.record()
    known = tr.energy_known and tr.devices > 0
    energy = (tr.energy_j if final else provisional_j) if known else None
    completion = tl.completion_tokens
    hops: list[dict[str, Any]]
    if tr.hop_split and tl.chunk_hop is not None:
        tokens_by_hop: dict[int, int] = {}
        for h, n in zip(tl.chunk_hop, tl.chunk_tokens, strict=False):
            tokens_by_hop[h] = tokens_by_hop.get(h, 0) + n
        count = max([*tokens_by_hop, len(tr.hop_energy_j) - 1, 0]) + 1
        hops = [
            {
                "index": i + 1,
                "tokens": tokens_by_hop.get(i, 0),
                "energy_j": (tr.hop_energy_j[i] if i < len(tr.hop_energy_j) else 0.0)
                if known and final
                else None,
            }
            for i in range(count)
        ]
    else:
        hops = [{"index": tl.hop or 1, "tokens": completion, "energy_j": energy}]
    rec.update(
        devices=devices,
        meter=meter,
        final=final,
        energy_j=energy,
        idle_energy_j=(tr.idle_energy_j if final else None) if known else None,
        j_per_token=(energy / completion) if energy is not None and completion else None,
        error_bound_j=(tr.bound_j if final else None) if known else None,
        energy_null_reason=None if known else tr.unknown_reason,
        provisional=not final,
        hops=hops,
    )
    return rec


def chain_summary(chain_id: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    energies = [r.get("energy_j") for r in records]
    known = all(e is not None for e in energies)
    return {
        "chain_id": chain_id,
        "requests": len(records),
        "final": all(r.get("final") for r in records),
        "energy_j": sum(e for e in energies if e is not None) if known else None,
        "energy_null_reason": None if known else reasons.CHAIN_HOP_UNKNOWN,
        "prompt_tokens": sum(r.get("prompt_tokens") or 0 for r in records),
        "completion_tokens": sum(r.get("completion_tokens") or 0 for r in records),
        "hops": [
            {
                "index": r.get("hop"),
                "request_id": r["id"],
                "status": r.get("status"),
                "tokens": r.get("completion_tokens"),
                "energy_j": r.get("energy_j"),
                "final": r.get("final"),
            }
            for r in records
        ],
        "records": records,
    }
