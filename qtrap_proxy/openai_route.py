"""``POST /v1/chat/completions`` and ``POST /v1/completions``.

Streams always get ``stream_options.include_usage`` upstream (plus vLLM's
``continuous_usage_stats``), so prompt and completion tokens are always known;
what the client did not ask for is taken out again before it reaches it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson

from qtrap_proxy.asgi import Scope, header
from qtrap_proxy.errors import BadRequest, QtrapError, openai_error_body
from qtrap_proxy.relay import Prepared, RelayRoute, StreamFilter
from qtrap_proxy.sse import data_of
from qtrap_proxy.timeline import Timeline

_DONE = b"[DONE]"


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise BadRequest("request body must be a JSON object")
    return obj


class OpenAIStreamFilter(StreamFilter):
    """Counts tokens per chunk and strips the usage the client did not ask for."""

    __slots__ = ("continuous", "keep_usage_chunk", "last_completion", "strip_usage", "tl")

    def __init__(self, tl: Timeline, *, continuous: bool, keep_usage_chunk: bool, strip_usage: bool) -> None:
        self.tl = tl
        self.continuous = continuous  # usage on every chunk: token counts are exact
        self.keep_usage_chunk = keep_usage_chunk
        self.strip_usage = strip_usage
        self.last_completion = 0
        self.upstream_error = None
        tl.tokens_exact = continuous

    def process(self, events: list[bytes], now: float) -> bytes:
        out: list[bytes] = []
        tl = self.tl
        for ev in events:
            payload = data_of(ev)
            if payload is None or payload == _DONE:
                if ev:
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
                pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
                if isinstance(pt, int):
                    tl.prompt_tokens = pt
                if isinstance(ct, int):
                    tl.completion_tokens = ct
                    if self.continuous:
                        tokens = ct - self.last_completion
                        self.last_completion = ct
                if not choices:  # the usage-only chunk
                    if tokens > 0:
                        tl.add_chunk(now, tokens)
                    if self.keep_usage_chunk:
                        out.append(ev)
                    continue
                if self.strip_usage:
                    del obj["usage"]
                    ev = b"data: " + orjson.dumps(obj)
            if choices and not self.continuous:
                tokens = _content_choices(choices)
            if tokens > 0:
                tl.add_chunk(now, tokens)
            out.append(ev)
        if not out:
            return b""
        return b"\n\n".join(out) + b"\n\n"

    def error_event(self, err: QtrapError) -> bytes:
        body = openai_error_body(err.message, err.type, None, err.status)
        return b"data: " + body + b"\n\ndata: [DONE]\n\n"


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


class OpenAIRoute(RelayRoute):
    def __init__(self, proxy: Any, chat: bool) -> None:
        super().__init__(proxy)
        self.chat = chat
        self.path = "/v1/chat/completions" if chat else "/v1/completions"
        self.route_name = "chat" if chat else "completions"

    def error_body(self, err: QtrapError) -> bytes:
        return err.openai_body()

    def prepare(self, scope: Scope, body: bytes, tl: Timeline) -> Prepared:
        req = parse_json_object(body)
        model = req.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("`model` is required and must be a non-empty string", param="model")
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

        pool, precision = self.proxy.router.resolve(model, header(scope, b"x-qtrap-precision"))
        backend = self.proxy.router.choose(pool, precision)
        req["model"] = backend.cfg.model
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
            filt = OpenAIStreamFilter(
                tl,
                continuous=continuous,
                keep_usage_chunk=client_usage,
                strip_usage=(not client_continuous) if continuous else not client_usage,
            )
        return Prepared(backend, self.path, orjson.dumps(req), stream, filt)

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
            if isinstance(ct, int):
                tl.completion_tokens = ct
                tl.tokens_exact = True
                tl.add_chunk(time.monotonic(), ct)
