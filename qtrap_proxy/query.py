"""What a records query asks for, checked: ``GET /qtrap/v1/requests``, ``GET /qtrap/v1/usage`` and
``qtrap-proxy records export``.

Every query parameter is checked here against ``limits.py``'s style of bounds before it reaches SQLite
(a :class:`~qtrap_proxy.errors.BadRequest` naming it otherwise): an unknown or repeated parameter is
refused too, so a misspelt filter is a 400 rather than a silently wider answer.

* ``since`` / ``until``: Unix seconds or an ISO 8601 / RFC 3339 time (``limits.parse_time``); a record
  is in the window when its ``start_unix_s`` is in ``[since, until)``; ``since`` after ``until`` is a 400;
* ``pool``, ``precision``, ``backend``: 1 to ``MAX_MODEL_CHARS`` printable characters;
* ``chain_id``: an id (``limits.check_id``); ``key``: a key id (``key_`` and 12 hex digits);
* ``status``: one of ``wire.STATUSES``; ``final``: ``true`` or ``false``;
* ``client_request_id``: 1 to ``MAX_CLIENT_REQUEST_ID_CHARS`` printable ASCII characters;
* ``limit``: 1 to ``MAX_LIST`` (default ``DEFAULT_LIST``); ``order``: ``desc`` (newest first, the
  default) or ``asc``; ``cursor``: the ``next_cursor`` of the previous page, as it was given;
* ``group_by`` (usage): a comma-separated subset of ``GROUP_BY``, each at most once.

Pages are keyset-paginated on ``(start_unix_s, id)``, a key a record never changes over its life
(provisional, committing, final), so a record is listed at most once however the pages interleave with
new requests. The cursor is opaque: base64url of the last record's key, the order and a digest of the
filters, so a cursor used with other filters or another order is a 400 instead of a wrong page.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import astuple, dataclass, replace
from typing import Any, Final, Literal

import orjson

from qtrap_common import wire
from qtrap_proxy.errors import BadRequest
from qtrap_proxy.keystore import KEY_ID
from qtrap_proxy.limits import (
    MAX_CLIENT_REQUEST_ID_CHARS,
    MAX_MODEL_CHARS,
    bounded,
    check_client_request_id,
    check_id,
    parse_time,
)

DEFAULT_LIST: Final = 100
MAX_LIST: Final = 1_000
MAX_CURSOR_CHARS: Final = 512
ORDERS: Final = ("desc", "asc")
# what usage may be grouped by (chain ids are not offered: unbounded groups; GET /qtrap/v1/chains/{id} sums one)
GROUP_BY: Final = ("pool", "precision", "backend", "key", "status")
MAX_USAGE_GROUPS: Final = 1_000  # groups in one usage answer; beyond, `truncated` (the totals stay whole)
_CURSOR_VERSION = 1

Order = Literal["desc", "asc"]
# the filters that compare one field of a record (the field of the same name; in SQL: ledger.py)
EQUALITY_FIELDS: Final = ("pool", "precision", "backend", "chain_id", "key_id", "status", "client_request_id")

FILTER_PARAMS: Final = (
    "since", "until", "pool", "precision", "backend", "chain_id", "key", "status", "client_request_id",
)  # fmt: skip
LIST_PARAMS: Final = (*FILTER_PARAMS, "final", "limit", "order", "cursor")
USAGE_PARAMS: Final = (*FILTER_PARAMS, "group_by")


@dataclass(frozen=True, slots=True)
class RecordFilter:
    """Which records: those that started in ``[since_unix_s, until_unix_s)`` (no upper bound when None)
    whose fields equal every filter given (None: any)."""

    since_unix_s: float = 0.0
    until_unix_s: float | None = None
    pool: str | None = None
    precision: str | None = None
    backend: str | None = None
    chain_id: str | None = None
    key_id: str | None = None
    status: str | None = None
    client_request_id: str | None = None

    def equalities(self) -> list[tuple[str, str]]:
        """(record field, value) of each equality filter given."""
        out = []
        for name in EQUALITY_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out.append((name, value))
        return out

    def matches(self, rec: Mapping[str, Any]) -> bool:
        """Whether a record (one held in memory: in flight or committing) passes the filter, as the
        ledger's SQL would decide for a stored one."""
        start = rec.get("start_unix_s")
        if not isinstance(start, int | float) or isinstance(start, bool):
            return False
        if start < self.since_unix_s or (self.until_unix_s is not None and start >= self.until_unix_s):
            return False
        return all(rec.get(name) == value for name, value in self.equalities())

    def restricted_to(self, key_id: str) -> RecordFilter:
        """The same filter limited to one key's records."""
        return replace(self, key_id=key_id)

    def digest(self) -> str:
        return hashlib.sha256(repr(astuple(self)).encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class RecordQuery:
    """A page of records: the filter, ``final`` (None: both), the order, the page size, and the key of
    the last record of the previous page (None: the first page)."""

    filter: RecordFilter = RecordFilter()
    final: bool | None = None
    order: Order = "desc"
    limit: int = DEFAULT_LIST
    after: tuple[float, str] | None = None

    def sort_key(self, rec: Mapping[str, Any]) -> tuple[float, str]:
        return float(rec["start_unix_s"]), str(rec["id"])

    def past_cursor(self, rec: Mapping[str, Any]) -> bool:
        """Whether a record comes after the cursor in this query's order."""
        if self.after is None:
            return True
        key = self.sort_key(rec)
        return key < self.after if self.order == "desc" else key > self.after

    def digest(self) -> str:
        return f"{self.filter.digest()}:{self.final}"

    def cursor(self, last: Mapping[str, Any]) -> str:
        """The opaque cursor of the page that ends with ``last``."""
        start, rid = self.sort_key(last)
        raw = orjson.dumps([_CURSOR_VERSION, self.order, start, rid, self.digest()])
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def check_params(params: Iterable[tuple[str, str]], allowed: tuple[str, ...]) -> dict[str, str]:
    """The query parameters as a dict: BadRequest for an unknown or a repeated one."""
    out: dict[str, str] = {}
    for name, value in params:
        if name not in allowed:
            raise BadRequest(
                f"unknown query parameter {bounded(repr(name), 60)}; known: {', '.join(allowed)}",
                param=bounded(name, 60),
            )
        if name in out:
            raise BadRequest(f"query parameter {name!r} given more than once", param=name)
        out[name] = value
    return out


def parse_filter(q: Mapping[str, str]) -> RecordFilter:
    """The filter parameters of a records query or a usage query (already in a dict)."""
    since = parse_time(q["since"], "since") if "since" in q else 0.0
    until = parse_time(q["until"], "until") if "until" in q else None
    if until is not None and since > until:
        raise BadRequest(f"since ({since:.6f}) is after until ({until:.6f})", param="since")
    key = q.get("key")
    if key is not None and not KEY_ID.fullmatch(key):
        raise BadRequest(f"key must be a key id (key_ and 12 hex digits), got {_show(key)}", param="key")
    status = q.get("status")
    if status is not None and status not in wire.STATUSES:
        raise BadRequest(
            f"status must be one of {', '.join(wire.STATUSES)}, got {_show(status)}", param="status"
        )
    raw_crid = q.get("client_request_id")
    crid = None if raw_crid is None else check_client_request_id(raw_crid)
    if raw_crid is not None and crid is None:
        raise BadRequest(
            f"client_request_id must be 1 to {MAX_CLIENT_REQUEST_ID_CHARS} characters of printable ASCII, "
            f"got {_show(raw_crid or '')}",
            param="client_request_id",
        )
    chain = q.get("chain_id")
    return RecordFilter(
        since_unix_s=since,
        until_unix_s=until,
        pool=_name(q, "pool"),
        precision=_name(q, "precision"),
        backend=_name(q, "backend"),
        chain_id=None if chain is None else check_id(chain, "chain_id"),
        key_id=key,
        status=status,
        client_request_id=crid,
    )


def parse_record_query(params: Iterable[tuple[str, str]]) -> RecordQuery:
    """``GET /qtrap/v1/requests``'s query parameters, checked."""
    q = check_params(params, LIST_PARAMS)
    filt = parse_filter(q)
    final = q.get("final")
    if final is not None and final not in ("true", "false"):
        raise BadRequest(f"final must be true or false, got {_show(final)}", param="final")
    order = q.get("order", "desc")
    if order not in ORDERS:
        raise BadRequest(f"order must be desc (newest first) or asc, got {_show(order)}", param="order")
    limit = DEFAULT_LIST
    if "limit" in q:
        text = q["limit"]
        if not (text.isascii() and text.isdigit() and len(text) <= 12 and 1 <= int(text) <= MAX_LIST):
            raise BadRequest(
                f"limit must be an integer from 1 to {MAX_LIST}, got {_show(text)}", param="limit"
            )
        limit = int(text)
    query = RecordQuery(
        filt,
        None if final is None else final == "true",
        "asc" if order == "asc" else "desc",
        limit,
    )
    if "cursor" in q:
        query = RecordQuery(query.filter, query.final, query.order, limit, _decode_cursor(q["cursor"], query))
    return query


def parse_usage_query(params: Iterable[tuple[str, str]]) -> tuple[RecordFilter, tuple[str, ...]]:
    """``GET /qtrap/v1/usage``'s query parameters, checked: the filter and the ``group_by`` fields."""
    q = check_params(params, USAGE_PARAMS)
    filt = parse_filter(q)
    group_by: list[str] = []
    text = q.get("group_by", "")
    for part in (p.strip() for p in text.split(",")) if text.strip() else ():
        if part not in GROUP_BY:
            raise BadRequest(
                f"group_by takes a comma-separated subset of {', '.join(GROUP_BY)}, got {_show(part)}",
                param="group_by",
            )
        if part in group_by:
            raise BadRequest(f"group_by names {part} twice", param="group_by")
        group_by.append(part)
    return filt, tuple(group_by)


def _decode_cursor(text: str, query: RecordQuery) -> tuple[float, str]:
    bad = BadRequest(
        "cursor is not one this API gave (give next_cursor as it was, with the same filters and order)",
        param="cursor",
    )
    if not (0 < len(text) <= MAX_CURSOR_CHARS and text.isascii()):
        raise bad
    try:
        obj = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (binascii.Error, ValueError):
        raise bad from None
    if not (isinstance(obj, list) and len(obj) == 5 and obj[0] == _CURSOR_VERSION):
        raise bad
    _, order, start, rid, digest = obj
    if order != query.order or digest != query.digest():
        raise BadRequest(
            "cursor was given for other filters or another order: repeat the query that gave it",
            param="cursor",
        )
    if not (isinstance(start, int | float) and not isinstance(start, bool) and math.isfinite(start)):
        raise bad
    if not isinstance(rid, str):
        raise bad
    try:
        check_id(rid, "cursor")
    except BadRequest:
        raise bad from None
    return float(start), rid


def _name(q: Mapping[str, str], what: str) -> str | None:
    value = q.get(what)
    if value is None:
        return None
    if 0 < len(value) <= MAX_MODEL_CHARS and value.isprintable():
        return value
    raise BadRequest(
        f"{what} must be 1 to {MAX_MODEL_CHARS} printable characters, got {_show(value)}", param=what
    )


def _show(value: str) -> str:
    return bounded(repr(value), 80)
