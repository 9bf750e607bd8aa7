"""TGI's native API (``/generate``, ``/generate_stream``, ``/``) over a simulated backend."""

from __future__ import annotations

import time
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
from qtrap_sim.textgen import count_tokens
from qtrap_sim.tracing import TGITimings

_FINISH = {"length": "length", "stop": "stop_sequence", "abort": "length"}


class TGIError(Exception):
    def __init__(self, status: int, message: str, error_type: str = "validation") -> None:
        super().__init__(message)
        self.status, self.message, self.error_type = status, message, error_type

    def response(self) -> Response:
        return Response(
            orjson.dumps({"error": self.message, "error_type": self.error_type}),
            status_code=self.status,
            media_type="application/json",
        )


def create_tgi_app(backend: SimBackend) -> Starlette:
    cfg = backend.cfg
    compute_type = f"sim-{cfg.gpu}"  # TGI's COMPUTE_TYPE (its default: gpu+optimized)

    async def handle(request: Request, mode: str) -> Response:
        started = time.monotonic()  # TGI's start_time: its timing headers count from here
        try:
            try:
                body = orjson.loads(await request.body())
            except orjson.JSONDecodeError as e:
                raise TGIError(422, f"Failed to deserialize the JSON body into the target type: {e}") from e
            if not isinstance(body, dict):
                raise TGIError(422, "Failed to deserialize the JSON body: expected an object")
            inputs = body.get("inputs")
            if not isinstance(inputs, str) or not inputs:
                raise TGIError(422, "`inputs` cannot be empty")
            params = body.get("parameters") or {}
            if not isinstance(params, dict):
                raise TGIError(422, "`parameters` must be an object")
            max_new = params.get("max_new_tokens")
            max_new = 100 if max_new is None else max_new
            if not isinstance(max_new, int) or max_new < 1:
                raise TGIError(422, "`max_new_tokens` must be strictly positive")
            prompt_tokens = count_tokens(inputs)
            if prompt_tokens + max_new > cfg.max_model_len:
                raise TGIError(
                    422,
                    f"`inputs` tokens + `max_new_tokens` must be <= {cfg.max_model_len}. "
                    f"Given: {prompt_tokens} `inputs` tokens and {max_new} `max_new_tokens`",
                )
            temperature = params.get("temperature")
            temperature = 0.0 if not params.get("do_sample") else float(temperature or 1.0)
            stream = mode == "stream" or (mode == "compat" and body.get("stream") is True)
            stop = params.get("stop") or []
            if not isinstance(stop, list) or not all(isinstance(x, str) for x in stop):
                raise TGIError(422, "`stop` must be an array of strings")
        except TGIError as e:
            return e.response()
        except (TypeError, ValueError) as e:
            return TGIError(422, str(e)).response()

        seed = params.get("seed")
        req, text = backend.new_request(
            request.headers.get(wire.REQUEST_ID), inputs, prompt_tokens, max_new, seed, temperature
        )
        gen = backend.generate(req, text, stop)
        details_wanted = bool(params.get("details"))

        def details() -> dict[str, Any]:
            return {
                "finish_reason": _FINISH.get(req.finish_reason or "length", "length"),
                "generated_tokens": req.generated,
                "seed": seed,
            }

        if stream:

            async def events() -> AsyncIterator[bytes]:
                # One event per token; the last is held back until the end is known,
                # then carries generated_text (and details when asked for), as TGI does.
                index = 0
                full: list[str] = []
                held: dict[str, Any] | None = None
                try:
                    async for text, _ in gen:
                        for w in [" " + w for w in text.split(" ")[1:]] or [text]:
                            if held is not None:
                                yield b"data:" + orjson.dumps(held) + b"\n\n"
                            index += 1
                            full.append(w)
                            held = {
                                "index": index,
                                "token": {"id": index, "text": w, "logprob": -1.0, "special": False},
                                "generated_text": None,
                                "details": None,
                                "top_tokens": None,
                            }
                    if held is not None:
                        held["generated_text"] = "".join(full)
                        if details_wanted:
                            held["details"] = details()
                        yield b"data:" + orjson.dumps(held) + b"\n\n"
                finally:
                    await gen.aclose()

            # as TGI's generate_stream: no timing headers (they are not known when the headers go)
            stream_headers = {
                "x-compute-type": compute_type,
                "x-compute-characters": str(len(inputs)),
                "x-accel-buffering": "no",
            }
            return StreamingResponse(events(), media_type="text/event-stream", headers=stream_headers)

        answer = await backend.collect(gen, request.receive)
        if answer is None:
            return Response(b"", status_code=499)
        out: dict[str, Any] = {"generated_text": answer}
        if details_wanted:
            out["details"] = {
                **details(),
                "prefill": [],
                "tokens": [],
                "top_tokens": None,
                "best_of_sequences": None,
            }
        # TGI's router's headers, timed by the engine's own timestamps (qtrap_sim/tracing.py)
        headers = {
            "x-compute-type": compute_type,
            "x-compute-characters": str(len(inputs)),
            **TGITimings.of(req, started, time.monotonic()).headers(),
            "x-prompt-tokens": str(prompt_tokens),
            "x-generated-tokens": str(req.generated),
        }
        payload = orjson.dumps([out] if mode == "compat" else out)
        return Response(payload, media_type="application/json", headers=headers)

    async def generate(request: Request) -> Response:
        return await handle(request, "generate")

    async def generate_stream(request: Request) -> Response:
        return await handle(request, "stream")

    async def compat(request: Request) -> Response:
        return await handle(request, "compat")

    async def info(_: Request) -> Response:
        return Response(
            orjson.dumps(
                {
                    "model_id": cfg.served_name,
                    "model_dtype": cfg.precision,
                    "max_input_tokens": cfg.max_model_len - 1,
                    "max_total_tokens": cfg.max_model_len,
                    "router": "qtrap_sim",
                    "version": version(),
                    "simulated": True,
                    "gpu": backend.gpu.name,
                }
            ),
            media_type="application/json",
        )

    return Starlette(
        routes=[
            Route("/generate", generate, methods=["POST"]),
            Route("/generate_stream", generate_stream, methods=["POST"]),
            Route("/", compat, methods=["POST"]),
            Route("/info", info, methods=["GET"]),
            *backend.common_routes(),
        ],
        lifespan=backend.lifespan,
    )
