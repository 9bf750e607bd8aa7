"""The record store: every request's record, wherever it is in its life, and what is read from them.

A request's record lives in three places over its life: while in flight or waiting for its final
energy figure it is built on demand from its account in the energy service (``provisional``); once
final, the service hands the account to :meth:`RecordStore.commit`, which queues the final record for
the ledger and reads it as ``committing`` (``final: false``) until the ledger has committed it; then it
is kept in a small cache of recent finals (``final: true``), and older records are read back from the
ledger. Records are shaped by record.py only.

Reads over records live here too: a chain's summary and its pages, scoring a chain (counted once per
chain in ``qtrap_chains_scored_total``) and one client key's usage over the ledger.

The reads are coroutines: what they ask the ledger runs in its read threads (``Ledger.read``), off the
event loop, while everything held in memory here (the recent finals, the records committing, the
energy service's accounts, the chains scored, the metrics and listeners) is read and changed on the
event loop only, none of it being thread-safe. What is in memory is read before the ledger is asked,
so that a record committed meanwhile is found in one place or the other, never in neither.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from qtrap_common.wire import ChainPage, ChainSummary, RecordPage, RequestRecord
from qtrap_proxy.auth import KeyRing, Principal
from qtrap_proxy.carbon import Carbon, Footprint
from qtrap_proxy.energy import reasons
from qtrap_proxy.energy.attribution import Tracked
from qtrap_proxy.energy.service import EnergyService
from qtrap_proxy.errors import Forbidden
from qtrap_proxy.ledger import Ledger, UsageRow
from qtrap_proxy.metrics import Metrics, hop_label
from qtrap_proxy.query import MAX_USAGE_GROUPS, RecordFilter, RecordQuery
from qtrap_proxy.record import Stage, build_record, chain_page, chain_summary, settled_energy
from qtrap_proxy.timeline import Timeline

log = logging.getLogger("qtrap.records")

FinalListener = Callable[[Timeline, RequestRecord], None]
ScoreListener = Callable[[str | None, str | None, bool], None]  # pool, precision, correct


class RecordStore:
    def __init__(
        self,
        energy: EnergyService,
        ledger: Ledger,
        metrics: Metrics,
        key_ring: KeyRing | None = None,
        keep: int = 2_000,
        carbon: Carbon | None = None,
    ) -> None:
        self.energy = energy
        self.carbon = carbon  # the carbon intensity and the price (None: carbon and cost never known)
        self._footprints: dict[str, Footprint] = {}  # of the records committing: computed once, at commit
        self.ledger = ledger
        self.metrics = metrics
        self.key_ring = key_ring  # the client keys (auth.enabled), for their usage
        self._finals: OrderedDict[str, RequestRecord] = OrderedDict()  # recent durable finals
        self._committing: dict[str, Tracked] = {}  # final, queued for the ledger
        self._keep = keep
        self._scored: OrderedDict[str, None] = OrderedDict()  # chains already scored
        self._loop: asyncio.AbstractEventLoop | None = None
        # told of each final record as it is committed, and of each chain scored (once): routing by cost
        self.final_listeners: list[FinalListener] = []
        self.score_listeners: list[ScoreListener] = []

    def start(self) -> None:
        """Start the ledger's writer (on the running event loop, where its reports are handled)."""
        self._loop = asyncio.get_running_loop()
        self.ledger.start(self._on_durable, self._on_dropped)

    # -- a record's life ---------------------------------------------------------------
    def commit(self, tr: Tracked) -> None:
        """The energy service's final sink: count the final figure and queue the record for the ledger."""
        if self.carbon is not None:
            energy, why = settled_energy(tr)
            self._footprints[tr.tl.request_id] = self.carbon.footprint(energy, why, tr.tl.start_unix_s)
        rec = self._build(tr, "final")
        self.metrics.energy_final(tr, rec)
        self._committing[rec["id"]] = tr
        self.ledger.put(rec)
        for listener in self.final_listeners:
            try:
                listener(tr.tl, rec)
            except Exception:  # a listener must not lose a record
                log.exception("a final-record listener failed on request %s", rec["id"])

    def _on_durable(self, records: list[RequestRecord]) -> None:
        """Called by the ledger's writer thread once records are committed."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._durable, records)

    def _on_dropped(self, records: list[RequestRecord]) -> None:
        """Called by the ledger's writer thread for records it gave up (counted and logged there)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._dropped, records)

    def _dropped(self, records: list[RequestRecord]) -> None:
        for rec in records:
            self._committing.pop(str(rec.get("id")), None)
            self._footprints.pop(str(rec.get("id")), None)

    def _durable(self, records: list[RequestRecord]) -> None:
        for rec in records:
            self._committing.pop(rec["id"], None)
            self._footprints.pop(rec["id"], None)
            self._finals[rec["id"]] = rec
        while len(self._finals) > self._keep:
            self._finals.popitem(last=False)

    def _build(self, tr: Tracked, stage: Stage) -> RequestRecord:
        energy = self.energy
        provisional = energy.provisional_j(tr) if stage == "provisional" else None
        return build_record(
            tr,
            stage,
            meter=energy.kind,
            devices=energy.backend_devices_of(tr),
            provisional_j=provisional,
            compare_views=energy.cfg.compare_views,
            footprint=self._footprints.get(tr.tl.request_id) if stage != "provisional" else None,
            pue=self.carbon.cfg.pue if self.carbon is not None else 1.0,
        )

    # -- reads -------------------------------------------------------------------------
    async def record(self, request_id: str) -> RequestRecord | None:
        """A request's record: from memory while it is not final or recently final, else the ledger's.
        (A record leaves memory only once the ledger holds it, so one not in memory now is not missed.)"""
        rec = self._finals.get(request_id)
        if rec is not None:
            return rec
        tr = self._committing.get(request_id)
        if tr is not None:  # final figure, not yet durable: it turns final once committed
            return self._build(tr, "committing")
        tr = self.energy.account(request_id)
        if tr is not None:
            return self._build(tr, "provisional")
        return await self.ledger.read(self.ledger.get, request_id)

    async def _chain_records(self, chain_id: str) -> list[RequestRecord]:
        """Every record of a chain, by hop and start: those in memory (read first, on the event loop)
        over the ledger's (read in its thread)."""
        mine: dict[str, RequestRecord] = {}
        for tr in self._committing.values():
            if tr.tl.chain_id == chain_id:
                mine[tr.tl.request_id] = self._build(tr, "committing")
        mine.update({r["id"]: r for r in self._finals.values() if r.get("chain_id") == chain_id})
        for tr in self.energy.open_accounts(chain_id=chain_id):
            mine[tr.tl.request_id] = self._build(tr, "provisional")
        recs = {r["id"]: r for r in await self.ledger.read(self.ledger.chain, chain_id)}
        recs.update(mine)
        return sorted(recs.values(), key=lambda r: (r.get("hop") or 0, r["start_unix_s"]))

    async def chain(self, chain_id: str, who: Principal | None = None) -> ChainSummary | None:
        """A chain's summary; for a client key (``who``) only that key's records of it. None if none."""
        recs = await self._chain_records(chain_id)
        if who is not None:
            recs = [r for r in recs if who.may_see(r.get("key_id"))]
        return chain_summary(chain_id, recs) if recs else None

    async def chain_page(
        self, chain_id: str, offset: int, limit: int, who: Principal | None = None
    ) -> ChainPage | None:
        """:meth:`chain` with its ``records`` and ``hops`` cut to ``limit`` from ``offset`` (totals stay
        the chain's); ``next_offset`` is null on the last page."""
        summary = await self.chain(chain_id, who)
        return None if summary is None else chain_page(summary, offset, limit)

    async def score_chain(
        self, chain_id: str, correct: bool, hops: int | None, who: Principal | None = None
    ) -> dict[str, Any] | None:
        """Count a client's verdict on a chain's final answer (once per chain); None if the chain is unknown
        (to ``who``). With auth on only the chain's owner, the key of its first record, or the admin may
        score it: another key that has records in the chain gets Forbidden, one that has none None."""
        recs = await self._chain_records(chain_id)
        if who is not None and not who.admin:
            if not any(who.may_see(r.get("key_id")) for r in recs):
                return None
            owner = min(recs, key=lambda r: r["start_unix_s"]).get("key_id")
            if not who.may_see(owner):
                raise Forbidden(f"chain {chain_id!r} belongs to another API key; only its owner may score it")
        if not recs:
            return None
        last = recs[-1]
        n = hops if hops is not None else len(recs)
        first = chain_id not in self._scored
        if first:
            self._scored[chain_id] = None
            if len(self._scored) > 10 * self._keep:
                self._scored.popitem(last=False)
            self.metrics.chains_scored.labels(
                last.get("pool") or "",
                last.get("precision") or "",
                hop_label(n),
                "correct" if correct else "wrong",
            ).inc()
            for listener in self.score_listeners:
                try:
                    listener(last.get("pool"), last.get("precision"), correct)
                except Exception:
                    log.exception("a score listener failed on chain %s", chain_id)
        return {
            "chain_id": chain_id,
            "counted": first,
            "correct": correct,
            "hops": n,
            "pool": last.get("pool"),
            "precision": last.get("precision"),
        }

    # -- the records query and usage sums (issue 17) ------------------------------------
    def _open(self, filt: RecordFilter) -> list[tuple[dict[str, Any], Tracked, Stage]]:
        """The requests not yet final (in flight, waiting for their final figure, or committing) that
        ``filt`` selects, each with the fields a filter reads, decided on the timeline without building
        its record (a provisional record's energy estimate is not free)."""
        out: list[tuple[dict[str, Any], Tracked, Stage]] = []
        for tr in self._committing.values():
            fields = _fields(tr.tl)
            if filt.matches(fields):
                out.append((fields, tr, "committing"))
        for tr in self.energy.open_accounts(chain_id=filt.chain_id, key_id=filt.key_id):
            if tr.tl.request_id in self._committing:
                continue
            fields = _fields(tr.tl)
            if filt.matches(fields):
                out.append((fields, tr, "provisional"))
        return out

    async def list_records(self, query: RecordQuery) -> RecordPage:
        """One page of the records ``query`` selects, final ones (the ledger) and, unless ``final`` is
        true, those not final yet, merged in the query's order on (start_unix_s, id). A record is in one
        place at a time and its key never changes, so pages neither repeat nor skip a record that existed
        when the first was read (one that starts later is on a later page of an ascending query, or
        before the first of a descending one).

        Those not final are taken first, on the event loop, then the ledger's page is read in its thread:
        a record that commits meanwhile is in the one or the other (in both: the ledger's, final)."""
        recs: dict[str, RequestRecord] = {}
        if query.final is not True:
            candidates = [c for c in self._open(query.filter) if query.past_cursor(c[0])]
            candidates.sort(key=lambda c: query.sort_key(c[0]), reverse=query.order == "desc")
            # the first limit + 1 are enough: one also in the ledger's page has the same place there
            for _, tr, stage in candidates[: query.limit + 1]:
                rec = self._build(tr, stage)
                recs[rec["id"]] = rec
        recs.update({r["id"]: r for r in await self.ledger.read(self.ledger.records, query)})
        page = sorted(recs.values(), key=query.sort_key, reverse=query.order == "desc")
        more = len(page) > query.limit
        page = page[: query.limit]
        return {
            "object": "list",
            "data": page,
            "order": query.order,
            "limit": query.limit,
            "has_more": more,
            "next_cursor": query.cursor(page[-1]) if more else None,
        }

    async def usage(self, filt: RecordFilter, group_by: tuple[str, ...]) -> dict[str, Any]:
        """The final records ``filt`` selects, summed per group of ``group_by`` (each group's fields, then
        the sums as per-key usage shows them: energy null with the unknown requests counted, never 0 J;
        no groups without ``group_by``), the totals, and how many selected requests are not final yet
        (not in the sums)."""
        not_final = len(self._open(filt))  # now, before the sums are read (in the ledger's thread)
        rows, total = await self.ledger.read(self._usage_rows, filt, group_by)
        truncated = len(rows) > MAX_USAGE_GROUPS
        groups = [{**dict(zip(group_by, row.group, strict=True)), **_usage([row])} for row in rows]
        return {
            "since_unix_s": filt.since_unix_s,
            "until_unix_s": filt.until_unix_s,
            "group_by": list(group_by),
            "groups": groups[:MAX_USAGE_GROUPS],
            "truncated": truncated,
            "total": _usage([r for r in total if r.requests]),
            "not_final_requests": not_final,
            "note": "sums over the final records in the ledger; requests in flight or waiting for their final "
            "energy figure (not_final_requests, now) count once they are final",
        }

    def _usage_rows(
        self, filt: RecordFilter, group_by: tuple[str, ...]
    ) -> tuple[list[UsageRow], list[UsageRow]]:
        """The ledger's groups (one more than shown: truncated) and totals, in one call of its read thread."""
        rows = self.ledger.usage(filt, group_by, limit=MAX_USAGE_GROUPS + 1) if group_by else []
        return rows, self.ledger.usage(filt, ())

    # -- per-key usage (issue 13) ------------------------------------------------
    async def key_usage(self, key_id: str, since_unix_s: float, until_unix_s: float) -> dict[str, Any] | None:
        """What one client key used from the ledger's final records that started in [since, until):
        requests, tokens, attributed and idle energy, by precision; None for a key the store does not
        hold. Energy sums cover the requests whose energy is known; the others are counted, never as 0 J."""
        if self.key_ring is None:
            return None
        key = self.key_ring.get(key_id)
        if key is None:
            return None
        pending = sum(1 for _ in self.energy.open_accounts(key_id=key_id))
        pending += sum(1 for tr in self._committing.values() if tr.tl.key_id == key_id)
        rows = await self.ledger.read(self.ledger.key_usage, key_id, since_unix_s, until_unix_s)
        by_precision = [{"precision": row.group[0], **_usage([row])} for row in rows]
        return {
            "key_id": key.id,
            "name": key.name,
            "since_unix_s": since_unix_s,
            "until_unix_s": until_unix_s,
            **_usage(rows),
            "by_precision": by_precision,
            "not_final_requests": pending,
            "note": "sums over the final records in the ledger; requests in flight or waiting for their final "
            "energy figure (not_final_requests, now) count once they are final",
        }


def _fields(tl: Timeline) -> dict[str, Any]:
    """What a records filter reads of a request not yet final, from its timeline (as its record has it)."""
    return {
        "id": tl.request_id,
        "start_unix_s": tl.start_unix_s,
        "pool": tl.pool,
        "precision": tl.precision,
        "backend": tl.backend,
        "chain_id": tl.chain_id,
        "key_id": tl.key_id,
        "status": tl.status,
        "client_request_id": tl.client_request_id,
    }


def _usage(rows: list[UsageRow]) -> dict[str, Any]:
    """The sums of some usage rows, as the usage API shows them (energy None when no request's is known;
    CO2e and cost likewise, and cost None too when the rows' costs are in more than one currency)."""
    requests = sum(r.requests for r in rows)
    energies = [r.energy_j for r in rows if r.energy_j is not None]
    idles = [r.idle_energy_j for r in rows if r.idle_energy_j is not None]
    none = 0.0 if requests == 0 else None  # nothing used is 0 J; used but never measured is unknown
    energy = sum(energies) if energies else none
    idle = sum(idles) if idles else none
    known_tokens = sum(r.completion_tokens_energy_known for r in rows)
    total = (energy or 0.0) + (idle or 0.0)
    co2es = [r.co2e_g for r in rows if r.co2e_g is not None]
    co2e = sum(co2es) if co2es else none
    costs = [r.cost for r in rows if r.cost is not None]
    currencies = {c for r in rows for c in (r.cost_currency_min, r.cost_currency_max) if c is not None}
    cost = (sum(costs) if costs else none) if len(currencies) <= 1 else None
    if cost is not None or requests == 0:
        cost_reason = None
    elif len(currencies) > 1:
        cost_reason = reasons.COST_CURRENCIES
    else:
        cost_reason = reasons.COST_NONE_KNOWN
    return {
        "requests": requests,
        "ok_requests": sum(r.ok_requests for r in rows),
        "prompt_tokens": sum(r.prompt_tokens for r in rows),
        "completion_tokens": sum(r.completion_tokens for r in rows),
        "energy_j": energy,
        "idle_energy_j": idle,
        "idle_share": idle / total if idle is not None and total > 0 else None,
        "j_per_token": energy / known_tokens if energy is not None and known_tokens else None,
        "energy_unknown_requests": sum(r.energy_unknown_requests for r in rows),
        "energy_null_reason": None if energy is not None else reasons.KEY_NONE_MEASURED,
        "co2e_g": co2e,
        "co2e_unknown_requests": sum(r.co2e_unknown_requests for r in rows),
        "co2e_null_reason": None if co2e is not None else reasons.CO2E_NONE_KNOWN,
        "cost": cost,
        "cost_currency": min(currencies) if len(currencies) == 1 else None,
        "cost_unknown_requests": sum(r.cost_unknown_requests for r in rows),
        "cost_null_reason": cost_reason,
    }
