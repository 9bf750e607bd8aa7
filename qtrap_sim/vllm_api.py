"""vLLM's OpenAI-compatible API over a simulated backend."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from qtrap_common import wire
from qtrap_common.version import version
from qtrap_sim.backend import SimBackend
from qtrap_sim.textgen import count_tokens, detokenize, embedding, token_ids
from qtrap_sim.tracing import SpanRequest


class VLLMError(Exception):
    def __init__(self, status: int, message: str, type_: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param

    def response(self) -> Response:
        body = {
            "error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}
        }
        return Response(orjson.dumps(body), status_code=self.status, media_type="application/json")


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json")


def _prompt_of(body: dict[str, Any], chat: bool) -> tuple[str, int]:
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise VLLMError(400, "messages: Field required (a non-empty list)", param="messages")
        parts = []
        for m in msgs:
            if not isinstance(m, dict) or "role" not in m:
                raise VLLMError(400, "messages: each message needs a role", param="messages")
            c = m.get("content")
            if isinstance(c, list):
                c = " ".join(p.get("text", "") for p in c if isinstance(p, dict))
            parts.append(str(c or ""))
        text = "\n".join(parts)
        return text, count_tokens(text) + 4 * len(msgs)  # chat-template tokens per message
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return " ".join(map(str, prompt)), len(prompt)
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise VLLMError(
            400, "prompt: a string, a one-element list of strings, or a list of token ids", param="prompt"
        )
    return prompt, count_tokens(prompt)


def create_vllm_app(backend: SimBackend) -> Starlette:
    cfg = backend.cfg

    async def completions(request: Request, chat: bool) -> Response:
        try:
            try:
                body = orjson.loads(await request.body())
            except orjson.JSONDecodeError as e:
                raise VLLMError(400, f"invalid JSON: {e}") from e
            if not isinstance(body, dict):
                raise VLLMError(400, "request body must be a JSON object")
            model = body.get("model")
            if model != cfg.served_name:
                raise VLLMError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
            prompt, prompt_tokens = _prompt_of(body, chat)
            if body.get("n", 1) not in (1, None):
                raise VLLMError(400, "qtrap_sim supports n=1 only", param="n")
            max_tokens = body.get("max_completion_tokens") if chat else None
            max_tokens = max_tokens or body.get("max_tokens")
            room = cfg.max_model_len - prompt_tokens
            if max_tokens is None:
                max_tokens = min(256, room)
            if not isinstance(max_tokens, int) or max_tokens < 1:
                raise VLLMError(400, "max_tokens must be a positive integer", param="max_tokens")
            if max_tokens > room:
                raise VLLMError(
                    400,
                    f"This model's maximum context length is {cfg.max_model_len} tokens. However, you requested "
                    f"{max_tokens + prompt_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
                    "completion). Please reduce the length of the messages or completion.",
                    param="max_tokens",
                )
            stop = body.get("stop") or []
            if isinstance(stop, str):
                stop = [stop]
            if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop):
                raise VLLMError(400, "stop: a string or an array of strings", param="stop")
            temperature = body.get("temperature")
            temperature = 1.0 if temperature is None else float(temperature)
            top_p = body.get("top_p")
            top_p = 1.0 if top_p is None else float(top_p)  # SamplingParams' default: in vLLM's span
            seed = body.get("seed")
            ignore_eos = body.get("ignore_eos", False)
            if not isinstance(ignore_eos, bool):
                raise VLLMError(400, "ignore_eos must be a boolean", param="ignore_eos")
            stream = bool(body.get("stream"))
            so = body.get("stream_options") or {}
        except VLLMError as e:
            return e.response()
        except (TypeError, ValueError) as e:
            return VLLMError(400, str(e)).response()

        rid = request.headers.get(wire.REQUEST_ID) or uuid.uuid4().hex
        req, text = backend.new_request(rid, prompt, prompt_tokens, max_tokens, seed, temperature, ignore_eos)
        # vLLM's request id (its span's gen_ai.request.id and the answer's id): the X-Request-Id, prefixed
        oid = ("chatcmpl-" if chat else "cmpl-") + rid
        span = None
        if backend.tracer is not None:
            span = SpanRequest(
                request_id=oid,
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                n=1,
                carrier=SpanRequest.trace_headers(request.headers),
            )
        gen = backend.generate(req, text, stop, span)
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        details = backend.cfg.enable_prompt_tokens_details

        def usage() -> dict[str, Any]:
            u: dict[str, Any] = {
                "prompt_tokens": prompt_tokens,
                "total_tokens": prompt_tokens + req.generated,
                "completion_tokens": req.generated,
            }
            if details:  # as vLLM with --enable-prompt-tokens-details
                u["prompt_tokens_details"] = {"cached_tokens": req.cached_tokens}
            return u

        if not stream:
            answer = await backend.collect(gen, request.receive)
            if answer is None:
                return Response(b"", status_code=499)
            if chat:
                choice: dict[str, Any] = {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer},
                    "logprobs": None,
                    "finish_reason": req.finish_reason,
                }
            else:
                choice = {"index": 0, "text": answer, "logprobs": None, "finish_reason": req.finish_reason}
            return _json(
                {
                    "id": oid,
                    "object": obj,
                    "created": created,
                    "model": cfg.served_name,
                    "choices": [choice],
                    "usage": usage(),
                },
                200,
            )

        include_usage = bool(so.get("include_usage")) if isinstance(so, dict) else False
        continuous = include_usage and bool(so.get("continuous_usage_stats"))
        head = {
            "id": oid,
            "object": obj + ".chunk" if chat else obj,
            "created": created,
            "model": cfg.served_name,
        }

        def chunk(text: str | None, finish: str | None, role: bool = False) -> bytes:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {"content": text}
                c: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                c = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            d: dict[str, Any] = {**head, "choices": [c]}
            if continuous:
                d["usage"] = usage()
            return b"data: " + orjson.dumps(d) + b"\n\n"

        async def events() -> AsyncIterator[bytes]:
            try:
                if chat:
                    yield chunk(None, None, role=True)
                async for text, _ in gen:
                    yield chunk(text, req.finish_reason if req.done else None)
                if include_usage:
                    yield b"data: " + orjson.dumps({**head, "choices": [], "usage": usage()}) + b"\n\n"
                yield b"data: [DONE]\n\n"
            finally:
                await gen.aclose()

        return StreamingResponse(events(), media_type="text/event-stream")

    async def chat_route(request: Request) -> Response:
        return await completions(request, True)

    async def completions_route(request: Request) -> Response:
        return await completions(request, False)

    async def models(_: Request) -> Response:
        return _json(
            {
                "object": "list",
                "data": [
                    {
                        "id": cfg.served_name,
                        "object": "model",
                        "created": backend.started_unix_s,
                        "owned_by": "qtrap_sim",
                        "root": cfg.model,
                        "max_model_len": cfg.max_model_len,
                    }
                ],
            }
        )

    async def version_route(_: Request) -> Response:
        # vLLM answers {"version": "0.26.0"}; the simulator says what it is, so that reports built on it
        # (loadgen's context header, the proxy's /qtrap/v1/backends) never pass it off as a real engine
        return _json(
            {
                "version": version(),
                "engine": "qtrap-sim",
                "simulated": True,
                "api": "vllm",
                "gpu": backend.gpu.name,
                "model": cfg.model,
                "precision": cfg.precision,
            }
        )

    async def _body(request: Request) -> dict[str, Any]:
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError as e:
            raise VLLMError(400, f"invalid JSON: {e}") from e
        if not isinstance(body, dict):
            raise VLLMError(400, "request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != cfg.served_name:
            raise VLLMError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        return body

    async def embeddings(request: Request) -> Response:
        """vLLM's pooling API, minimal: each input is prefilled on the engine (one step of GPU work, so
        it draws energy) and answered with a deterministic unit vector (`dimensions`, default 16)."""
        try:
            body = await _body(request)
            if body.get("model") is None:
                raise VLLMError(400, "model: Field required", param="model")
            raw = body.get("input")
            if isinstance(raw, str) or (
                isinstance(raw, list) and raw and all(isinstance(t, int) for t in raw)
            ):
                raw = [raw]
            if not isinstance(raw, list) or not raw or not all(isinstance(x, str | list) for x in raw):
                raise VLLMError(400, "input: a string, an array of strings or of token arrays", param="input")
            texts = [x if isinstance(x, str) else " ".join(map(str, x)) for x in raw]
            dims = body.get("dimensions") or 16
            if not isinstance(dims, int) or not 1 <= dims <= 4096:
                raise VLLMError(400, "dimensions must be an integer from 1 to 4096", param="dimensions")
            counts = [len(x) if isinstance(x, list) else count_tokens(x) for x in raw]
            if max(counts) >= cfg.max_model_len:
                raise VLLMError(
                    400, f"This model's maximum context length is {cfg.max_model_len} tokens.", param="input"
                )
        except VLLMError as e:
            return e.response()
        rid = request.headers.get(wire.REQUEST_ID) or uuid.uuid4().hex
        req, text = backend.new_request(rid, "\n".join(texts), sum(counts), 1, 0, 0.0)
        if await backend.collect(backend.generate(req, text, []), request.receive) is None:
            return Response(b"", status_code=499)
        n = sum(counts)
        return _json(
            {
                "id": "embd-" + rid,
                "object": "list",
                "created": int(time.time()),
                "model": cfg.served_name,
                "data": [
                    {"index": i, "object": "embedding", "embedding": embedding(t, dims)}
                    for i, t in enumerate(texts)
                ],
                "usage": {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0},
            }
        )

    async def responses(request: Request) -> Response:
        """OpenAI's Responses API as vLLM serves it, minimal: `input` (a string or messages),
        `instructions`, `max_output_tokens`, `stream`; text output only. A stream is vLLM's event
        sequence (`response.created`, `response.output_text.delta` per token, `response.completed` with
        the usage), with no `[DONE]`."""
        try:
            body = await _body(request)
            if body.get("model") is None:
                raise VLLMError(400, "model: Field required", param="model")
            raw = body.get("input")
            if isinstance(raw, str):
                msgs: list[Any] = [{"role": "user", "content": raw}]
            elif isinstance(raw, list) and raw:
                msgs = raw
            else:
                raise VLLMError(400, "input: a string or a non-empty array of messages", param="input")
            if isinstance(body.get("instructions"), str):
                msgs = [{"role": "system", "content": body["instructions"]}, *msgs]
            prompt, prompt_tokens = _prompt_of({"messages": msgs}, True)
            max_tokens = body.get("max_output_tokens") or min(256, cfg.max_model_len - prompt_tokens)
            if not isinstance(max_tokens, int) or max_tokens < 1:
                raise VLLMError(
                    400, "max_output_tokens must be a positive integer", param="max_output_tokens"
                )
            if max_tokens + prompt_tokens > cfg.max_model_len:
                raise VLLMError(
                    400, f"This model's maximum context length is {cfg.max_model_len} tokens.", param="input"
                )
            temperature = body.get("temperature")
            temperature = 1.0 if temperature is None else float(temperature)
            stream = bool(body.get("stream"))
        except VLLMError as e:
            return e.response()
        except (TypeError, ValueError) as e:
            return VLLMError(400, str(e)).response()
        rid = request.headers.get(wire.REQUEST_ID) or uuid.uuid4().hex
        req, text = backend.new_request(rid, prompt, prompt_tokens, max_tokens, None, temperature)
        gen = backend.generate(req, text, [])
        oid, mid = "resp_" + rid, "msg_" + rid

        def response(status: str, out: str | None) -> dict[str, Any]:
            content = [] if out is None else [{"type": "output_text", "text": out, "annotations": []}]
            return {
                "id": oid,
                "object": "response",
                "created_at": int(time.time()),
                "model": cfg.served_name,
                "status": status,
                "output": [
                    {"type": "message", "id": mid, "status": status, "role": "assistant", "content": content}
                ],
                "usage": None
                if out is None
                else {
                    "input_tokens": prompt_tokens,
                    "input_tokens_details": {"cached_tokens": 0},
                    "output_tokens": req.generated,
                    "output_tokens_details": {"reasoning_tokens": 0},
                    "total_tokens": prompt_tokens + req.generated,
                },
            }

        if not stream:
            answer = await backend.collect(gen, request.receive)
            if answer is None:
                return Response(b"", status_code=499)
            return _json(response("completed", answer))

        def event(kind: str, data: dict[str, Any]) -> bytes:
            return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **data}) + b"\n\n"

        async def events() -> AsyncIterator[bytes]:
            seq = 0
            parts: list[str] = []
            try:
                yield event(
                    "response.created", {"sequence_number": seq, "response": response("in_progress", None)}
                )
                async for piece, _ in gen:
                    seq += 1
                    parts.append(piece)
                    yield event(
                        "response.output_text.delta",
                        {
                            "sequence_number": seq,
                            "item_id": mid,
                            "output_index": 0,
                            "content_index": 0,
                            "delta": piece,
                        },
                    )
                seq += 1
                yield event(
                    "response.completed",
                    {"sequence_number": seq, "response": response("completed", "".join(parts))},
                )
            finally:
                await gen.aclose()

        return StreamingResponse(events(), media_type="text/event-stream")

    async def tokenize(request: Request) -> Response:
        try:
            body = await _body(request)
            if "messages" in body:
                text, _ = _prompt_of(body, True)
            elif isinstance(body.get("prompt"), str):
                text = body["prompt"]
            else:
                raise VLLMError(400, "prompt (a string) or messages is required", param="prompt")
        except VLLMError as e:
            return e.response()
        ids = token_ids(text)
        return _json(
            {"count": len(ids), "max_model_len": cfg.max_model_len, "tokens": ids, "token_strs": None}
        )

    async def detokenize_route(request: Request) -> Response:
        try:
            body = await _body(request)
            ids = body.get("tokens")
            if not isinstance(ids, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in ids
            ):
                raise VLLMError(400, "tokens: an array of integers", param="tokens")
        except VLLMError as e:
            return e.response()
        return _json({"prompt": detokenize(ids)})

    return Starlette(
        routes=[
            Route("/version", version_route, methods=["GET"]),
            Route("/v1/chat/completions", chat_route, methods=["POST"]),
            Route("/v1/completions", completions_route, methods=["POST"]),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/v1/responses", responses, methods=["POST"]),
            Route("/tokenize", tokenize, methods=["POST"]),
            Route("/detokenize", detokenize_route, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            *backend.common_routes(),
        ],
        lifespan=backend.lifespan,
    )
