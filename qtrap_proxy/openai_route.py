"""``POST /v1/chat/completions`` and ``POST /v1/completions``.

Streams always get ``stream_options.include_usage`` upstream (plus vLLM's
``continuous_usage_stats``), so prompt and completion tokens are always known;
what the client did not ask for is taken out again before it reaches it.

Energy where clients look: the ``usage`` object of a non-streaming answer and of a stream's
usage-only chunk (sent when the client asks ``stream_options.include_usage``; a stream that did
not ask gets no usage chunk, its figure is in the record) gains ``energy_j`` (the provisional
figure, null when unknown, never 0) and ``qtrap`` (:func:`usage_members`). Everything else in the
answer is relayed byte for byte; only the usage object is rewritten.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from qtrap_common.asgi import Scope
from qtrap_proxy.edge import OpenAIEdgeRoute
from qtrap_proxy.errors import BadRequest, QtrapError, openai_error_body
from qtrap_proxy.limits import ClientHeaders, bounded, check_model, dump_json_object, parse_json_object
from qtrap_proxy.proxy import Proxy
from qtrap_proxy.relay import Prepared, StreamFilter
from qtrap_proxy.sse import data_of
from qtrap_proxy.timeline import Timeline
from qtrap_proxy.usage import add_to_usage, usage_members, usage_span

_DONE = b"[DONE]"
_LINES = re.compile(r"\n")
_NO_CHOICES = b'"choices":[]'


class OpenAIStreamFilter(StreamFilter):
    """Counts tokens per chunk and strips the usage the client did not ask for."""

    __slots__ = (
        "continuous",
        "fast",
        "hop",
        "hop_has_text",
        "hop_pattern",
        "keep_usage_chunk",
        "last_completion",
        "strip_usage",
        "tl",
        "usage_extra",
    )

    def __init__(
        self,
        tl: Timeline,
        *,
        continuous: bool,
        keep_usage_chunk: bool,
        strip_usage: bool,
        hop_pattern: re.Pattern[str] | None = None,
        usage_extra: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        self.tl = tl
        self.continuous = continuous  # usage on every chunk: token counts are exact
        self.keep_usage_chunk = keep_usage_chunk
        self.strip_usage = strip_usage
        self.last_completion = 0
        self.upstream_error = None
        tl.tokens_exact = continuous
        # hop splitting needs each chunk's text, so it skips the byte-level fast path
        self.hop_pattern = hop_pattern
        self.fast = continuous and hop_pattern is None
        self.hop = 0
        self.hop_has_text = False
        if hop_pattern is not None:
            tl.chunk_hop = []
        self.usage_extra = usage_extra  # members added to the usage chunk's usage (energy)

    def process(self, events: list[bytes], now: float) -> bytes:
        out: list[bytes] = []
        tl = self.tl
        for ev in events:
            payload = data_of(ev)
            if payload is None or payload == _DONE:
                if ev:
                    out.append(ev)
                continue
            if self.fast:
                span = usage_span(payload)
                if span is not None:  # fast path: vLLM's compact chunk with continuous usage
                    try:
                        usage = orjson.loads(payload[span[2] : span[3]])
                    except orjson.JSONDecodeError:
                        usage = None
                    if isinstance(usage, dict):
                        tokens = self._usage(usage)
                        if tokens > 0:
                            tl.add_chunk(now, tokens)  # no hop split on the fast path
                        if _NO_CHOICES in payload:  # the usage-only chunk
                            if self.keep_usage_chunk:
                                out.append(self._with_energy(ev, payload))
                        elif self.strip_usage:
                            out.append(b"data: " + payload[: span[0]] + payload[span[1] :])
                        else:
                            out.append(ev)
                        continue
            try:
                obj = orjson.loads(payload)
            except orjson.JSONDecodeError:
                out.append(ev)
                continue
            if not isinstance(obj, dict):
                out.append(ev)
                continue
            if obj.get("error"):
                self.upstream_error = str(obj["error"])[:300]
                out.append(ev)
                continue
            choices = obj.get("choices")
            usage = obj.get("usage")
            tokens = 0
            if isinstance(usage, dict):
                tokens = self._usage(usage)
                if not choices:  # the usage-only chunk
                    if tokens > 0:
                        self._add(now, tokens, None)
                    if self.keep_usage_chunk:
                        out.append(self._with_energy(ev, payload))
                    continue
                if self.strip_usage:
                    del obj["usage"]
                    ev = b"data: " + orjson.dumps(obj)
            if choices and (not self.continuous or not isinstance(usage, dict)):
                tokens = _content_choices(choices)
                if self.continuous and tokens:
                    tl.tokens_exact = False  # the backend ignored continuous_usage_stats
            if tokens > 0:
                self._add(now, tokens, choices)
            out.append(ev)
        if not out:
            return b""
        return b"\n\n".join(out) + b"\n\n"

    def _add(self, now: float, tokens: int, choices: Any) -> None:
        tl = self.tl
        tl.add_chunk(now, tokens)
        if self.hop_pattern is not None and tl.chunk_hop is not None:
            tl.chunk_hop.append(self.hop)
            text = _content_text(choices)
            if text:
                pieces = self.hop_pattern.split(text)
                for k, piece in enumerate(pieces):
                    if piece.strip():
                        self.hop_has_text = True
                    if k < len(pieces) - 1 and self.hop_has_text:  # a separator ends a hop that has text
                        self.hop += 1
                        self.hop_has_text = False

    def _with_energy(self, ev: bytes, payload: bytes) -> bytes:
        if self.usage_extra is None:
            return ev
        out = add_to_usage(payload, self.usage_extra())
        return ev if out is None else b"data: " + out

    def _usage(self, usage: dict[str, Any]) -> int:
        """Record a usage object; returns the new completion tokens it reports (continuous usage only)."""
        tl = self.tl
        pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(pt, int):
            tl.prompt_tokens = pt
            tl.cached_tokens = cached_tokens(usage, pt)
        if isinstance(ct, int):
            tl.completion_tokens = ct
            if self.continuous and tl.tokens_exact:  # not after a fallback to per-chunk estimates
                new = ct - self.last_completion
                self.last_completion = ct
                return new
        return 0

    def error_event(self, err: QtrapError) -> bytes:
        body = openai_error_body(err.message, err.type, None, err.status)
        return b"data: " + body + b"\n\ndata: [DONE]\n\n"


def cached_tokens(usage: Mapping[str, Any], prompt_tokens: int) -> int | None:
    """``usage.prompt_tokens_details.cached_tokens`` (vLLM with --enable-prompt-tokens-details, OpenAI's
    field) when it is an integer in 0..prompt_tokens, else None (unknown: the whole prompt counts as
    prefilled). An upstream value, bounded before it reaches the attribution."""
    details = usage.get("prompt_tokens_details")
    if not isinstance(details, dict):
        return None
    n = details.get("cached_tokens")
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= prompt_tokens:
        return None
    return n


def _content_text(choices: Any) -> str:
    parts = []
    if isinstance(choices, list):
        for c in choices:
            if isinstance(c, dict):
                d = c.get("delta")
                t = d.get("content") if isinstance(d, dict) else c.get("text")
                if isinstance(t, str):
                    parts.append(t)
    return "".join(parts)


def _content_choices(choices: Any) -> int:
    """Chunks carrying generated content (one token each, an estimate where usage is not continuous)."""
    n = 0
    if isinstance(choices, list):
        for c in choices:
            if not isinstance(c, dict):
                continue
            d = c.get("delta")
            if isinstance(d, dict):
                if (
                    d.get("content")
                    or d.get("reasoning_content")
                    or d.get("tool_calls")
                    or d.get("reasoning")
                ):
                    n += 1
            elif c.get("text"):
                n += 1
    return n


class OpenAIRoute(OpenAIEdgeRoute):
    def __init__(self, proxy: Proxy, chat: bool) -> None:
        super().__init__(proxy)
        self.chat = chat
        self.path = "/v1/chat/completions" if chat else "/v1/completions"
        self.route_name = "chat" if chat else "completions"

    def prepare_checked(self, scope: Scope, body: bytes, tl: Timeline, headers: ClientHeaders) -> Prepared:
        req = parse_json_object(body)
        model = check_model(req.get("model"), "model")
        if self.chat:
            msgs = req.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise BadRequest("`messages` is required and must be a non-empty array", param="messages")
        elif "prompt" not in req or not isinstance(req["prompt"], str | list):
            raise BadRequest("`prompt` is required (a string or an array)", param="prompt")
        stream = req.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise BadRequest("`stream` must be a boolean", param="stream")
        so = req.get("stream_options")
        if so is not None and not isinstance(so, dict):
            raise BadRequest("`stream_options` must be an object", param="stream_options")

        hop_split = headers.hop_split
        hop_pattern: re.Pattern[str] | None = None
        if hop_split is not None:
            mode = hop_split.strip().lower()
            if mode == "lines":
                hop_pattern = _LINES
            elif mode == "regex":
                hop_pattern = self.proxy.hop_regex
            else:
                raise BadRequest(
                    f"x-qtrap-hop-split must be `lines` or `regex`, got {bounded(repr(hop_split), 80)}",
                    param="x-qtrap-hop-split",
                )
            if not stream:
                raise BadRequest(
                    "x-qtrap-hop-split needs a streamed request (`stream: true`)", param="x-qtrap-hop-split"
                )
        backend = self.route_to(req, model, headers, tl)
        filt: OpenAIStreamFilter | None = None
        if stream:
            client_so: Mapping[str, Any] = so or {}
            client_usage = bool(client_so.get("include_usage"))
            client_continuous = bool(client_so.get("continuous_usage_stats"))
            continuous = backend.kind == "vllm"
            new_so = dict(client_so)
            new_so["include_usage"] = True
            if continuous:
                new_so["continuous_usage_stats"] = True
            req["stream_options"] = new_so
            proxy = self.proxy
            filt = OpenAIStreamFilter(
                tl,
                continuous=continuous,
                keep_usage_chunk=client_usage,
                strip_usage=(not client_continuous) if continuous else not client_usage,
                hop_pattern=hop_pattern,
                usage_extra=lambda: usage_members(tl, proxy.answer_energy(tl)),
            )
        return Prepared(
            backend, self.path, dump_json_object(req), stream, filt, hop_split=hop_pattern is not None
        )

    def account_full_body(self, tl: Timeline, body: bytes, headers: Mapping[str, str]) -> None:
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
        usage = obj.get("usage") if isinstance(obj, dict) else None
        if isinstance(usage, dict):
            pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if isinstance(pt, int):
                tl.prompt_tokens = pt
                tl.cached_tokens = cached_tokens(usage, pt)
            if isinstance(ct, int):
                tl.completion_tokens = ct
                tl.tokens_exact = True
                tl.add_chunk(time.monotonic(), ct)


_VLLM_OR_OPENAI = frozenset({"vllm", "openai"})


class EmbeddingsRoute(OpenAIEdgeRoute):
    """``POST /v1/embeddings``, relayed to a vLLM or OpenAI-compatible backend of the pool and accounted
    as any request: a record with its prompt tokens (no completion tokens) and its energy, which is also
    added to the answer's ``usage`` as on the other OpenAI routes. Never streamed."""

    path = "/v1/embeddings"
    route_name = "embeddings"

    def prepare_checked(self, scope: Scope, body: bytes, tl: Timeline, headers: ClientHeaders) -> Prepared:
        req = parse_json_object(body)
        model = check_model(req.get("model"), "model")
        value = req.get("input")
        if not isinstance(value, str | list) or not value:
            raise BadRequest(
                "`input` is required (a string, an array of strings or of token arrays)", param="input"
            )
        if headers.hop_split is not None:
            raise BadRequest(
                "x-qtrap-hop-split needs a streamed request; embeddings are not", param="x-qtrap-hop-split"
            )
        backend = self.route_to(req, model, headers, tl, _VLLM_OR_OPENAI)
        return Prepared(backend, self.path, dump_json_object(req), False, None)

    def account_full_body(self, tl: Timeline, body: bytes, headers: Mapping[str, str]) -> None:
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
        usage = obj.get("usage") if isinstance(obj, dict) else None
        if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
            tl.prompt_tokens = usage["prompt_tokens"]
            tl.completion_tokens = 0
            tl.tokens_exact = True
