"""The energy an OpenAI answer carries in its ``usage`` object (docs/clients.md), and where that object sits.

Shared by the OpenAI routes (chat, completions, embeddings: ``openai_route.py``; responses:
``responses_route.py``). ``usage.energy_j`` is the provisional figure (null when unknown, never 0) and
``usage.qtrap`` says where it stands (:func:`usage_members`); only the usage object is rewritten, the
rest of an answer stays byte for byte (:func:`add_to_usage`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from qtrap_common import wire
from qtrap_proxy.proxy import AnswerEnergy
from qtrap_proxy.timeline import Timeline

_USAGE = b'"usage":{'
_USAGE_SPACED = re.compile(rb'"usage"\s*:\s*\{')  # any layout; a key inside a string has escaped quotes


def usage_span(payload: bytes) -> tuple[int, int, int, int] | None:
    """Where the ``"usage":{...}`` member sits in a compact JSON chunk (as vLLM writes them).

    Returns (cut_start, cut_end, obj_start, obj_end): ``payload[obj_start:obj_end]`` is the
    usage object and removing ``payload[cut_start:cut_end]`` leaves valid JSON without it.
    A key inside a string value cannot match: its quotes would be escaped.
    """
    u = payload.find(_USAGE)
    if u < 0:
        return None
    start = u + 8
    end = payload.find(b"}", start)
    while end >= 0 and payload.count(b"{", start, end + 1) > payload.count(b"}", start, end + 1):
        end = payload.find(b"}", end + 1)
    if end < 0:
        return None
    end += 1
    if payload[u - 1 : u] == b",":
        return u - 1, end, start, end
    if payload[end : end + 1] == b",":
        return u, end + 1, start, end
    return u, end, start, end


def usage_members(tl: Timeline, energy: AnswerEnergy) -> dict[str, Any]:
    """What the proxy adds to an answer's ``usage`` object.

    ``energy_j``: joules attributed to the request so far plus an estimate for the time the meter has
    not read yet; null when unknown (never 0). ``qtrap.provisional``: true while the final figure, which
    settles in the ledger once the meter has read past the request's end, may still differ; false when
    it is already known to be null. ``qtrap.record_url``: the record's path on the proxy (relative to
    its base URL), where the final figure appears (``final: true``).
    """
    q: dict[str, Any] = {
        "provisional": energy.provisional,
        "request_id": tl.request_id,
        "record_url": wire.path(wire.REQUEST_PATH, request_id=tl.request_id),
        "backend": tl.backend,
        "precision": tl.precision,
    }
    if energy.joules is None:
        q["energy_unknown_reason"] = energy.reason
    return {"energy_j": energy.joules, "qtrap": q}


def _object_end(payload: bytes, start: int) -> int:
    """The index after the JSON object whose ``{`` is at ``start`` (braces counted; -1 if unclosed)."""
    end = payload.find(b"}", start)
    while end >= 0 and payload.count(b"{", start, end + 1) > payload.count(b"}", start, end + 1):
        end = payload.find(b"}", end + 1)
    return -1 if end < 0 else end + 1


def add_to_usage(payload: bytes, members: Mapping[str, Any]) -> bytes | None:
    """``payload`` (a JSON answer or chunk) with ``members`` set in its ``usage`` object; None when it
    has no usage object. Only the usage object is rewritten (compactly); the rest stays byte for byte,
    whatever the layout (vLLM's compact JSON, a server's indented JSON). Where the usage object cannot
    be cut out on its own, the whole document is rewritten."""
    span = usage_span(payload)
    if span is not None:
        start, end = span[2], span[3]
    else:
        m = _USAGE_SPACED.search(payload)
        start = -1 if m is None else m.end() - 1
        end = -1 if start < 0 else _object_end(payload, start)
    if end > 0:
        try:
            usage = orjson.loads(payload[start:end])
        except orjson.JSONDecodeError:
            usage = None  # cut in the wrong place (a brace inside a string): the whole document below
        if isinstance(usage, dict):
            usage.update(members)
            return payload[:start] + orjson.dumps(usage) + payload[end:]
    try:
        obj = orjson.loads(payload)  # no usage object found, or one that could not be cut out alone
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("usage"), dict):
        return None
    obj["usage"].update(members)
    return orjson.dumps(obj)
