"""The ASGI application: routes, admin endpoints and lifecycle."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from qtrap_proxy.errors import openai_error_body
from qtrap_proxy.openai_route import OpenAIRoute
from qtrap_proxy.proxy import Proxy
from qtrap_proxy.tgi_route import TGIRoute


def create_app(proxy: Proxy) -> Starlette:
    async def models(_: Request) -> JSONResponse:
        return JSONResponse(proxy.models())

    async def health(_: Request) -> JSONResponse:
        code, body = await proxy.health()
        return JSONResponse(body, status_code=code)

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(proxy.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def request_record(request: Request) -> Response:
        rid = request.path_params["request_id"]
        rec = proxy.record(rid)
        if rec is None:
            return _error(404, f"no record of request {rid!r}", "not_found_error")
        return JSONResponse(rec)

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), kind)

    routes = [
        Route("/v1/chat/completions", OpenAIRoute(proxy, chat=True), methods=["POST"]),
        Route("/v1/completions", OpenAIRoute(proxy, chat=False), methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/generate", TGIRoute(proxy, "/generate"), methods=["POST"]),
        Route("/generate_stream", TGIRoute(proxy, "/generate_stream"), methods=["POST"]),
        Route("/", TGIRoute(proxy, "/"), methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/qtrap/v1/requests/{request_id}", request_record, methods=["GET"]),
    ]

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await proxy.close()

    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})


def _error(status: int, message: str, kind: str) -> Response:
    return Response(
        openai_error_body(message, kind, None, status), status_code=status, media_type="application/json"
    )
