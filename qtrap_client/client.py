"""The async client of the proxy's admin API: a request's, a chain's and a time range's energy.

:class:`QtrapClient` wraps one ``aiohttp.ClientSession`` (its own, or one given to it) and answers with
the wire types of :mod:`qtrap_common.wire` (``RequestRecord``, ``ChainSummary``, ``RecordPage``,
``UsageReport``): plain JSON objects as the proxy wrote them, typed for mypy and checked at run time by
pydantic for the fields every proxy version writes, so a field a newer proxy adds passes through.
Errors are :mod:`qtrap_client.errors`' exceptions; nothing else escapes (aiohttp's own errors and
timeouts become :class:`~qtrap_client.errors.ProxyUnreachable`).

A record is provisional (``final: false``) until its energy settles: the meter's next update after the
request's end, then the ledger's commit. :meth:`QtrapClient.wait_final` polls until it is final.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Literal, TypeVar, cast
from urllib.parse import quote

import aiohttp
from pydantic import BaseModel, ConfigDict, ValidationError

from qtrap_client.errors import (
    ApiError,
    FinalTimeout,
    ProtocolError,
    ProxyUnreachable,
    QtrapClientError,
    api_error,
)
from qtrap_common import wire
from qtrap_common.wire import ChainPage, ChainSummary, RecordPage, RequestRecord, UsageReport

Time = float | datetime | str  # Unix seconds, an aware datetime, or ISO 8601 / RFC 3339 as the proxy reads it
GroupBy = Literal["pool", "precision", "backend", "key", "status"]
T = TypeVar("T")


class _Record(BaseModel):
    """The fields every proxy version writes in a record (older ledgers lack some others)."""

    model_config = ConfigDict(extra="allow", strict=False)
    id: str
    status: str
    start_unix_s: float
    final: bool
    energy_j: float | None = None
    energy_null_reason: str | None = None


class _Page(BaseModel):
    model_config = ConfigDict(extra="allow")
    data: list[_Record]
    has_more: bool
    next_cursor: str | None


class _Chain(BaseModel):
    model_config = ConfigDict(extra="allow")
    chain_id: str
    requests: int
    final: bool
    energy_j: float | None
    records: list[_Record]
    next_offset: int | None = None


class _Sums(BaseModel):
    model_config = ConfigDict(extra="allow")
    requests: int
    prompt_tokens: int
    completion_tokens: int
    energy_j: float | None
    energy_unknown_requests: int


class _Usage(BaseModel):
    model_config = ConfigDict(extra="allow")
    groups: list[_Sums]
    total: _Sums
    not_final_requests: int


def _time(v: Time) -> str:
    if isinstance(v, datetime):
        if v.tzinfo is None:
            raise ValueError("a datetime for since/until must carry its time zone (e.g. tzinfo=UTC)")
        return repr(v.timestamp())
    if isinstance(v, int | float):
        if not math.isfinite(v):
            raise ValueError(f"not a time: {v!r}")
        return repr(float(v))
    return v


class QtrapClient:
    """The proxy's admin API at ``base_url`` (``http://host:port``, no path).

    ``api_key``: sent as ``Authorization: Bearer <key>``: the admin key, or a client key (with auth on a
    client key sees its own records, chains and usage only). ``timeout_s``: each HTTP call's limit.
    ``session``: an ``aiohttp.ClientSession`` to use (not closed by :meth:`close`); else the client makes
    its own, on the running event loop, at the first call. Use as ``async with QtrapClient(...) as c:``.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 10.0,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session = session
        self._own = session is None

    async def __aenter__(self) -> QtrapClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the client's own session (a session given to it stays open)."""
        if self._own and self._session is not None:
            await self._session.close()
            self._session = None

    # -- HTTP ---------------------------------------------------------------------------------------
    async def _call(
        self,
        method: str,
        path: str,
        params: Sequence[tuple[str, str]] = (),
        body: Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        url = self.base_url + path
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.timeout_s)
        try:
            async with self._session.request(
                method, url, params=list(params), json=body, headers=self._headers, timeout=timeout
            ) as r:
                text = await r.read()
                status = r.status
        except (TimeoutError, aiohttp.ClientError) as e:
            raise ProxyUnreachable(f"{method} {url}: {e or type(e).__name__}") from e
        try:
            doc = json.loads(text) if text else None
        except ValueError:
            doc = None
        if status >= 400:
            raise api_error(status, doc, method, path)
        if doc is None:
            raise ProtocolError(f"{method} {path}: HTTP {status} without a JSON body (is it a qtrap proxy?)")
        return doc

    @staticmethod
    def _check(model: type[BaseModel], doc: Any, what: str) -> None:
        try:
            model.model_validate(doc)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ProtocolError(f"{what}: not the admin API's shape ({where}: {first['msg']})") from e

    # -- a request ------------------------------------------------------------------------------------
    async def request(self, request_id: str, *, timeout_s: float | None = None) -> RequestRecord:
        """A request's record (``x-qtrap-request-id`` of its answer): provisional or final."""
        path = wire.path(wire.REQUEST_PATH, request_id=quote(request_id, safe=""))
        doc = await self._call("GET", path, timeout_s=timeout_s)
        self._check(_Record, doc, f"GET {path}")
        return cast(RequestRecord, doc)

    async def wait_final(
        self, request_id: str, timeout_s: float = 60.0, *, poll_s: float = 0.1, max_poll_s: float = 1.0
    ) -> RequestRecord:
        """The request's final record, polled until ``final`` is true (the first read at once, then after
        ``poll_s``, doubling up to ``max_poll_s``). :class:`FinalTimeout` (carrying the last record read)
        when ``timeout_s`` passes first. A read that fails for want of an answer (unreachable, a 5xx, a
        body of the wrong shape) is retried within the time and raised at the end if no record was ever
        read; a 4xx (:class:`NotFound` for an id the proxy does not know) is raised at once."""
        deadline = time.monotonic() + timeout_s
        last: RequestRecord | None = None
        error: QtrapClientError | None = None
        wait = poll_s
        while True:
            left = deadline - time.monotonic()
            try:
                last = await self.request(request_id, timeout_s=max(min(self.timeout_s, left), 0.1))
                error = None
            except ApiError as e:
                if e.status < 500:
                    raise
                error = e
            except (ProxyUnreachable, ProtocolError) as e:
                error = e
            if last is not None and last["final"]:
                return last
            left = deadline - time.monotonic()
            if left <= 0:
                if last is None and error is not None:
                    raise error
                raise FinalTimeout(f"request {request_id}", timeout_s, last)
            await asyncio.sleep(min(wait, left))
            wait = min(wait * 2, max_poll_s)

    # -- a chain --------------------------------------------------------------------------------------
    async def chain_page(self, chain_id: str, offset: int = 0, limit: int | None = None) -> ChainPage:
        """One page of a chain's summary (``?offset=&limit=``; the totals stay the chain's)."""
        path = wire.path(wire.CHAIN_PATH, chain_id=quote(chain_id, safe=""))
        params = [("offset", str(offset))] if offset else []
        if limit is not None:
            params.append(("limit", str(limit)))
        doc = await self._call("GET", path, params)
        self._check(_Chain, doc, f"GET {path}")
        return cast(ChainPage, doc)

    async def chain(self, chain_id: str, *, page_size: int | None = None) -> ChainSummary:
        """A chain's summary with every record and hop (its pages of ``page_size`` followed; default the
        proxy's, 1000): ``energy_j`` is the sum of its requests' (null when one is unknown), ``final``
        whether all are final."""
        page = await self.chain_page(chain_id, 0, page_size)
        out: dict[str, Any] = dict(page)
        records, hops = list(page["records"]), list(page["hops"])
        while page.get("next_offset") is not None:
            page = await self.chain_page(chain_id, int(page["next_offset"] or 0), page_size)
            records += page["records"]
            hops += page["hops"]
        for k in ("offset", "limit", "next_offset"):
            out.pop(k, None)
        out["records"], out["hops"] = records, hops
        return cast(ChainSummary, out)

    async def wait_chain_final(
        self, chain_id: str, timeout_s: float = 60.0, *, poll_s: float = 0.2
    ) -> ChainSummary:
        """The chain's summary once every record of it is final (as :meth:`wait_final` for a request).
        Hops sent after this returns are not in it."""
        deadline = time.monotonic() + timeout_s
        while True:
            summary = await self.chain(chain_id)
            if summary["final"]:
                return summary
            left = deadline - time.monotonic()
            if left <= 0:
                raise FinalTimeout(f"chain {chain_id}", timeout_s)
            await asyncio.sleep(min(poll_s, left))

    async def score_chain(self, chain_id: str, correct: bool, hops: int | None = None) -> dict[str, Any]:
        """Report a verdict on a chain's final answer (counted once per chain in
        ``qtrap_chains_scored_total``); the answer says whether this call was the one counted."""
        path = wire.path(wire.CHAIN_SCORE_PATH, chain_id=quote(chain_id, safe=""))
        body: dict[str, Any] = {"correct": correct}
        if hops is not None:
            body["hops"] = hops
        doc = await self._call("POST", path, body=body)
        if not isinstance(doc, dict):
            raise ProtocolError(f"POST {path}: not a JSON object")
        return doc

    # -- a time range ---------------------------------------------------------------------------------
    @staticmethod
    def _filters(
        since: Time | None,
        until: Time | None,
        pool: str | None,
        precision: str | None,
        backend: str | None,
        chain_id: str | None,
        key: str | None,
        status: str | None,
        client_request_id: str | None,
    ) -> list[tuple[str, str]]:
        params: list[tuple[str, str]] = []
        if since is not None:
            params.append(("since", _time(since)))
        if until is not None:
            params.append(("until", _time(until)))
        given = {
            "pool": pool,
            "precision": precision,
            "backend": backend,
            "chain_id": chain_id,
            "key": key,
            "status": status,
            "client_request_id": client_request_id,
        }
        params += [(k, v) for k, v in given.items() if v is not None]
        return params

    async def requests(
        self,
        *,
        since: Time | None = None,
        until: Time | None = None,
        pool: str | None = None,
        precision: str | None = None,
        backend: str | None = None,
        chain_id: str | None = None,
        key: str | None = None,
        status: str | None = None,
        client_request_id: str | None = None,
        final: bool | None = None,
        order: Literal["desc", "asc"] = "desc",
        limit: int | None = None,
        cursor: str | None = None,
    ) -> RecordPage:
        """One page of the records query (``GET /qtrap/v1/requests``): records that started in
        ``[since, until)`` matching every filter given; ``final`` True: final ones only, False: those not
        final yet, None: both. Give ``cursor=page["next_cursor"]`` with the same filters for the next."""
        params = self._filters(
            since, until, pool, precision, backend, chain_id, key, status, client_request_id
        )
        if final is not None:
            params.append(("final", "true" if final else "false"))
        params.append(("order", order))
        if limit is not None:
            params.append(("limit", str(limit)))
        if cursor is not None:
            params.append(("cursor", cursor))
        doc = await self._call("GET", wire.REQUESTS_PATH, params)
        self._check(_Page, doc, f"GET {wire.REQUESTS_PATH}")
        return cast(RecordPage, doc)

    async def iter_requests(
        self,
        *,
        since: Time | None = None,
        until: Time | None = None,
        pool: str | None = None,
        precision: str | None = None,
        backend: str | None = None,
        chain_id: str | None = None,
        key: str | None = None,
        status: str | None = None,
        client_request_id: str | None = None,
        final: bool | None = None,
        order: Literal["desc", "asc"] = "asc",
        page_size: int = 500,
    ) -> AsyncIterator[RequestRecord]:
        """Every record the query selects, page after page (oldest first by default): each record that
        existed when the first page was read is yielded once (keyset pages, never offsets)."""
        cursor: str | None = None
        while True:
            page = await self.requests(
                since=since,
                until=until,
                pool=pool,
                precision=precision,
                backend=backend,
                chain_id=chain_id,
                key=key,
                status=status,
                client_request_id=client_request_id,
                final=final,
                order=order,
                limit=page_size,
                cursor=cursor,
            )
            for rec in page["data"]:
                yield rec
            cursor = page["next_cursor"]
            if not page["has_more"] or cursor is None:
                return

    async def usage(
        self,
        *,
        group_by: Sequence[GroupBy] = (),
        since: Time | None = None,
        until: Time | None = None,
        pool: str | None = None,
        precision: str | None = None,
        backend: str | None = None,
        chain_id: str | None = None,
        key: str | None = None,
        status: str | None = None,
        client_request_id: str | None = None,
    ) -> UsageReport:
        """Requests, tokens and energy of the final records the filters select, summed per group of
        ``group_by`` (``GET /qtrap/v1/usage``), with the ``total`` and ``not_final_requests`` (not yet in
        the sums). Energy sums cover the requests whose energy is known; the others are counted."""
        params = self._filters(
            since, until, pool, precision, backend, chain_id, key, status, client_request_id
        )
        if group_by:
            params.append(("group_by", ",".join(group_by)))
        doc = await self._call("GET", wire.USAGE_PATH, params)
        self._check(_Usage, doc, f"GET {wire.USAGE_PATH}")
        return cast(UsageReport, doc)

    async def key_usage(
        self, key_id: str, *, since: Time | None = None, until: Time | None = None
    ) -> dict[str, Any]:
        """One client key's usage (auth on; the admin key or that key): the usage sums and ``by_precision``."""
        params = self._filters(since, until, None, None, None, None, None, None, None)
        path = wire.path(wire.KEY_USAGE_PATH, key_id=quote(key_id, safe=""))
        doc = await self._call("GET", path, params)
        if not isinstance(doc, dict):
            raise ProtocolError(f"GET {path}: not a JSON object")
        return doc

    # -- the proxy ------------------------------------------------------------------------------------
    async def models(self) -> list[str]:
        """The ids of ``GET /v1/models``: each pool and each ``pool@precision``."""
        doc = await self._call("GET", "/v1/models")
        data = doc.get("data") if isinstance(doc, dict) else None
        if not isinstance(data, list):
            raise ProtocolError("GET /v1/models: no list of models (is it a qtrap proxy?)")
        return [str(m.get("id")) for m in data if isinstance(m, dict)]

    async def energy(self, timeout_s: float | None = None) -> dict[str, Any]:
        """``GET /qtrap/v1/energy``: the meter (``meter``, ``policy``, ``interval_s``) and per device its
        measured, attributed, idle and foreign joules (``devices``)."""
        doc = await self._call("GET", wire.ENERGY_PATH, timeout_s=timeout_s)
        if not isinstance(doc, dict):
            raise ProtocolError(f"GET {wire.ENERGY_PATH}: not a JSON object")
        return doc

    async def backends(self, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """``GET /qtrap/v1/backends``: each backend as configured and what its engine says it is."""
        doc = await self._call("GET", wire.BACKENDS_PATH, timeout_s=timeout_s)
        rows = doc.get("backends") if isinstance(doc, dict) else None
        if not isinstance(rows, list):
            raise ProtocolError(f"GET {wire.BACKENDS_PATH}: not a list of backends")
        return [b for b in rows if isinstance(b, dict)]
