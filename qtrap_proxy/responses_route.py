"""``POST /v1/responses``: OpenAI's Responses API, relayed to a vLLM or OpenAI-compatible backend.

Accounted as the other OpenAI routes: a record (route ``responses``) with the answer's
``usage.input_tokens`` and ``output_tokens``, and its energy added to ``usage`` (``usage.py``). A
stream is a sequence of typed events (``event: response.output_text.delta`` ...) without ``[DONE]``:
each text or reasoning delta counts as one token on the timeline (an estimate, ``tokens_exact: false``)
until ``response.completed`` gives the true counts; that event's ``response.usage`` gains the energy.
Nothing is injected into the request: the Responses API has no ``stream_options``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from qtrap_common.asgi import Scope
from qtrap_proxy.edge import OpenAIEdgeRoute
from qtrap_proxy.errors import BadRequest, QtrapError
from qtrap_proxy.limits import ClientHeaders, check_model, dump_json_object, parse_json_object
from qtrap_proxy.relay import Prepared, StreamFilter
from qtrap_proxy.sse import data_of
from qtrap_proxy.timeline import Timeline
from qtrap_proxy.usage import add_to_usage, usage_members

_KINDS = frozenset({"vllm", "openai"})
_DELTAS = frozenset({b"response.output_text.delta", b"response.reasoning_text.delta"})
_ENDS = frozenset({b"response.completed", b"response.incomplete", b"response.failed"})


def _type_of(payload: bytes) -> bytes | None:
    """The ``type`` of a compact event payload (``{"type":"...",``), without parsing it; None otherwise."""
    if payload.startswith(b'{"type":"'):
        end = payload.find(b'"', 9)
        if end > 0:
            return payload[9:end]
    return None


def _count(tl: Timeline, usage: Any) -> None:
    if isinstance(usage, dict):
        pt, ct = usage.get("input_tokens"), usage.get("output_tokens")
        if isinstance(pt, int):
            tl.prompt_tokens = pt
        if isinstance(ct, int):
            tl.completion_tokens = ct


class ResponsesStreamFilter(StreamFilter):
    """Counts a Responses stream's deltas and adds the energy to its last event's usage."""

    __slots__ = ("tl", "usage_extra")

    def __init__(self, tl: Timeline, usage_extra: Callable[[], Mapping[str, Any]]) -> None:
        self.tl = tl
        self.usage_extra = usage_extra
        self.upstream_error = None
        tl.tokens_exact = False

    def process(self, events: list[bytes], now: float) -> bytes:
        out: list[bytes] = []
        for ev in events:
            payload = data_of(ev)
            if payload is None:
                if ev:
                    out.append(ev)
                continue
            kind = _type_of(payload)
            if kind is None:  # another layout: parse it
                try:
                    obj = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    out.append(ev)
                    continue
                t = obj.get("type") if isinstance(obj, dict) else None
                kind = t.encode() if isinstance(t, str) else b""
            if kind in _DELTAS:
                self.tl.add_chunk(now, 1)
            elif kind in _ENDS:
                ev = self._final(ev, payload)
            elif kind == b"error":
                self.upstream_error = payload[:300].decode("utf-8", "replace")
            out.append(ev)
        if not out:
            return b""
        return b"\n\n".join(out) + b"\n\n"

    def _final(self, ev: bytes, payload: bytes) -> bytes:
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return ev
        resp = obj.get("response") if isinstance(obj, dict) else None
        if not isinstance(resp, dict):
            return ev
        _count(self.tl, resp.get("usage"))
        new = add_to_usage(payload, self.usage_extra())
        if new is None:
            return ev
        head = ev[: ev.find(b"data:")] if b"\ndata:" in ev else b""  # keep the `event:` line
        return head + b"data: " + new

    def error_event(self, err: QtrapError) -> bytes:
        body = orjson.dumps({"type": "error", "code": err.code or err.type, "message": err.message})
        return b"event: error\ndata: " + body + b"\n\n"


class ResponsesRoute(OpenAIEdgeRoute):
    path = "/v1/responses"
    route_name = "responses"

    def prepare_checked(self, scope: Scope, body: bytes, tl: Timeline, headers: ClientHeaders) -> Prepared:
        req = parse_json_object(body)
        model = check_model(req.get("model"), "model")
        value = req.get("input")
        if not isinstance(value, str | list) or not value:
            raise BadRequest("`input` is required (a string or a non-empty array of items)", param="input")
        stream = req.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise BadRequest("`stream` must be a boolean", param="stream")
        if headers.hop_split is not None:
            raise BadRequest("x-qtrap-hop-split is not supported on /v1/responses", param="x-qtrap-hop-split")
        backend = self.route_to(req, model, headers, tl, _KINDS)
        filt = None
        if stream:
            proxy = self.proxy
            filt = ResponsesStreamFilter(tl, lambda: usage_members(tl, proxy.answer_energy(tl)))
        return Prepared(backend, self.path, dump_json_object(req), stream, filt)

    def account_full_body(self, tl: Timeline, body: bytes, headers: Mapping[str, str]) -> None:
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
        if isinstance(obj, dict):
            _count(tl, obj.get("usage"))
            if tl.completion_tokens:
                tl.tokens_exact = True
                tl.add_chunk(time.monotonic(), tl.completion_tokens)
