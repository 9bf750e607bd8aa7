"""Wire limits: every value a client controls is checked here before it reaches a record, a log or SQLite.

One place for the limits (README, "HTTP interface", lists them). A value outside
them is a :class:`~qtrap_proxy.errors.BadRequest` (400) whose message names the
header or field and the limit; a bad value is never echoed raw or unbounded.

* every ``x-qtrap-*`` request header: printable ASCII (0x20-0x7E), at most
  ``MAX_HEADER_CHARS`` characters;
* ``x-qtrap-hop`` and a score's ``hops``: an integer from 1 to ``MAX_HOP``;
* ``x-qtrap-chain-id`` and the ids in admin paths: 1 to ``MAX_ID_CHARS``
  characters of printable ASCII;
* ``model`` in a body and ``x-qtrap-model``: 1 to ``MAX_MODEL_CHARS`` printable
  characters (no control characters);
* JSON bodies: valid UTF-8, nested at most ``JSON_MAX_DEPTH`` levels (orjson's
  own limit), an object at the top; a body the proxy rewrites before relaying it
  (the OpenAI routes) at most ``MAX_REWRITE_DEPTH`` levels (what orjson can write);
* bodies of ``POST /qtrap/v1/*``: at most ``MAX_ADMIN_BODY_BYTES`` (413 beyond);
* an error message kept in a record: cut at ``MAX_ERROR_CHARS``;
* ``GET /qtrap/v1/chains/{id}?offset=N&limit=M``: ``offset`` from 0, ``limit`` from 1 to
  ``MAX_PAGE`` (default ``DEFAULT_PAGE``) records a page;
* a client's ``X-Request-Id``: kept (``client_request_id``) when it is 1 to
  ``MAX_CLIENT_REQUEST_ID_CHARS`` characters of printable ASCII once surrounding spaces are
  stripped; any other value is ignored (not recorded, not echoed), never a 400: gateways and SDKs
  add the header on their own, and a request must not fail over a tracing aid;
* the records query and usage parameters: ``query.py``;
* ``?since=`` and ``?until=`` (``GET /qtrap/v1/keys/{id}/usage``, the records query and usage): Unix seconds or an ISO 8601 date or
  time (UTC unless it says otherwise), at most ``MAX_HEADER_CHARS`` characters.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from qtrap_common import wire
from qtrap_proxy.errors import BadRequest

MAX_HOP = 10_000
MAX_ID_CHARS = 256
MAX_HEADER_CHARS = 256
MAX_MODEL_CHARS = 256
MAX_ADMIN_BODY_BYTES = 1_048_576
MAX_ERROR_CHARS = 1_000
MAX_CLIENT_REQUEST_ID_CHARS = 128
DEFAULT_PAGE = 1_000
MAX_PAGE = 1_000
JSON_MAX_DEPTH = 1_024  # orjson refuses deeper documents; stated here so the README can say it
MAX_REWRITE_DEPTH = 254  # orjson.dumps refuses deeper documents ("Recursion limit reached")

HEADER_PREFIX = wire.B_HEADER_PREFIX
H_CHAIN_ID = wire.B_CHAIN_ID
H_HOP = wire.B_HOP
H_HOP_SPLIT = wire.B_HOP_SPLIT
H_PRECISION = wire.B_PRECISION
H_MODEL = wire.B_MODEL


@dataclass(frozen=True, slots=True)
class ClientHeaders:
    """The ``x-qtrap-*`` request headers, checked (first occurrence of each)."""

    chain_id: str | None = None
    hop: int | None = None
    hop_split: str | None = None
    precision: str | None = None
    model: str | None = None


def _printable_ascii(value: bytes) -> int:
    """Index of the first byte outside 0x20-0x7E, or -1."""
    if value.isascii() and value.decode("ascii").isprintable():
        return -1
    return next(i for i, b in enumerate(value) if not 0x20 <= b <= 0x7E)


def parse_qtrap_headers(headers: Iterable[tuple[bytes, bytes]]) -> ClientHeaders:
    """Check every ``x-qtrap-*`` header; BadRequest (naming the header) for the first bad one."""
    found: dict[bytes, str] = {}
    for name, value in headers:
        if not name.startswith(HEADER_PREFIX):
            continue
        label = name.decode("latin-1")
        if len(value) > MAX_HEADER_CHARS:
            raise BadRequest(
                f"{label} is {len(value)} characters long; the limit is {MAX_HEADER_CHARS}", param=label
            )
        bad = _printable_ascii(value)
        if bad >= 0:
            raise BadRequest(
                f"{label} must be printable ASCII (0x20-0x7E); byte {bad} is 0x{value[bad]:02x}", param=label
            )
        found.setdefault(name, value.decode("ascii").strip())
    hop_text = found.get(H_HOP)
    chain_id = found.get(H_CHAIN_ID)
    if chain_id is not None and not chain_id:
        raise BadRequest(f"{H_CHAIN_ID.decode()} must not be empty", param=H_CHAIN_ID.decode())
    return ClientHeaders(
        chain_id=chain_id,
        hop=None if hop_text is None else parse_hop(hop_text, H_HOP.decode()),
        hop_split=found.get(H_HOP_SPLIT),
        precision=found.get(H_PRECISION) or None,
        model=found.get(H_MODEL),
    )


def parse_hop(text: str, what: str) -> int:
    """A hop index or count given as text: an integer from 1 to MAX_HOP."""
    if text.isascii() and text.isdigit() and len(text) <= MAX_HEADER_CHARS and 1 <= int(text) <= MAX_HOP:
        return int(text)
    raise BadRequest(
        f"{what} must be an integer from 1 to {MAX_HOP} (1-based), got {_show(text)}", param=what
    )


def check_hops(value: Any, what: str) -> int:
    """A hop count in a JSON body: an integer (not a boolean) from 1 to MAX_HOP."""
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_HOP:
        return value
    raise BadRequest(f"'{what}' must be an integer from 1 to {MAX_HOP}", param=what)


def check_id(value: str, what: str) -> str:
    """A chain or request id (headers, admin paths): 1..MAX_ID_CHARS characters of printable ASCII."""
    if 0 < len(value) <= MAX_ID_CHARS and value.isascii() and value.isprintable():
        return value
    raise BadRequest(
        f"{what} must be 1 to {MAX_ID_CHARS} characters of printable ASCII, got {_show(value)}", param=what
    )


def check_client_request_id(value: str) -> str | None:
    """A client's ``X-Request-Id`` (spaces around it stripped) if it is 1..MAX_CLIENT_REQUEST_ID_CHARS
    characters of printable ASCII, else None."""
    value = value.strip(" \t")
    if 0 < len(value) <= MAX_CLIENT_REQUEST_ID_CHARS and value.isascii() and value.isprintable():
        return value
    return None


def check_model(value: Any, what: str) -> str:
    """A model or pool name: a string of 1..MAX_MODEL_CHARS printable characters."""
    if not isinstance(value, str) or not value:
        raise BadRequest(f"`{what}` is required and must be a non-empty string", param=what)
    if len(value) > MAX_MODEL_CHARS or not value.isprintable():
        raise BadRequest(
            f"`{what}` must be at most {MAX_MODEL_CHARS} printable characters, got {_show(value)}", param=what
        )
    return value


def parse_json_object(body: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object (UTF-8, nested at most JSON_MAX_DEPTH levels)."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise BadRequest(
            f"request body is not valid JSON (UTF-8, nested at most {JSON_MAX_DEPTH} levels): {bounded(str(e), 200)}"
        ) from e
    if not isinstance(obj, dict):
        raise BadRequest("request body must be a JSON object")
    return obj


def dump_json_object(obj: dict[str, Any]) -> bytes:
    """A request body the proxy changed, written back: BadRequest (not a 500) for one orjson can read
    but not write (nested deeper than MAX_REWRITE_DEPTH levels)."""
    try:
        return orjson.dumps(obj)
    except orjson.JSONEncodeError as e:
        raise BadRequest(
            f"request body cannot be relayed ({e}): a body nested deeper than {MAX_REWRITE_DEPTH} levels "
            "is refused on this route"
        ) from e


def parse_page(offset: str | None, limit: str | None) -> tuple[int, int]:
    """A page's ``offset`` (from 0) and ``limit`` (1..MAX_PAGE) query parameters, given as text."""
    start = 0
    if offset is not None:
        if not (offset.isascii() and offset.isdigit() and len(offset) <= 12):
            raise BadRequest(f"offset must be an integer from 0, got {_show(offset)}", param="offset")
        start = int(offset)
    size = DEFAULT_PAGE
    if limit is not None:
        if not (limit.isascii() and limit.isdigit() and len(limit) <= 12 and 1 <= int(limit) <= MAX_PAGE):
            raise BadRequest(
                f"limit must be an integer from 1 to {MAX_PAGE}, got {_show(limit)}", param="limit"
            )
        size = int(limit)
    return start, size


def parse_time(value: str, what: str) -> float:
    """A query parameter naming a time: Unix seconds, or an ISO 8601 date or time (UTC unless it says),
    RFC 3339's included (its ``t`` and ``z`` may be lower case)."""
    if len(value) <= MAX_HEADER_CHARS and value.isascii():
        try:
            t = float(value)
        except ValueError:
            try:
                when = dt.datetime.fromisoformat(value.upper())  # RFC 3339 allows `t` and `z`
            except ValueError:
                pass
            else:
                return (when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)).timestamp()
        else:
            if math.isfinite(t) and 0 <= t < 1e11:
                return t
    raise BadRequest(
        f"{what} must be Unix seconds or an ISO 8601 date or time, got {_show(value)}", param=what
    )


_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.ASCII)
MAX_TRACESTATE_CHARS = 512  # W3C trace context: at most 32 list members, 512 characters


def trace_context(traceparent: str | None, tracestate: str | None) -> tuple[str | None, str | None]:
    """The client's trace id and tracestate when its ``traceparent`` is valid W3C trace context, else
    (None, None): an invalid one is not an error (the spec says to start a new trace), it is dropped.
    A tracestate longer than 512 characters or with characters outside printable ASCII is dropped."""
    trace_id, _, state = parse_trace_context(traceparent, tracestate)
    return trace_id, state


def parse_trace_context(
    traceparent: str | None, tracestate: str | None
) -> tuple[str | None, str | None, str | None]:
    """:func:`trace_context` with the client's parent span id between: (trace id, parent span id,
    tracestate), each None when not valid."""
    if traceparent is None:
        return None, None, None
    m = _TRACEPARENT.fullmatch(traceparent.strip())
    if m is None:
        return None, None, None
    version, trace_id, parent, _flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == "0" * 32 or parent == "0" * 16:
        return None, None, None
    state = None
    if tracestate is not None:
        state = tracestate.strip()
        if not state or len(state) > MAX_TRACESTATE_CHARS or not all(" " <= c <= "~" for c in state):
            state = None
    return trace_id, parent, state


def bounded(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """``text`` cut to ``limit`` characters (with a marker when cut)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show(value: str) -> str:
    """A client's value for an error message: escaped (repr) and short."""
    return bounded(repr(value), 80)
