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
from starlette.types import ASGIApp, Receive, Scope, Send

from qtrap_proxy.asgi import read_body
from qtrap_proxy.errors import BadRequest, QtrapError, openai_error_body
from qtrap_proxy.limits import MAX_ADMIN_BODY_BYTES, check_hops, check_id, parse_json_object
from qtrap_proxy.openai_route import OpenAIRoute
from qtrap_proxy.proxy import Proxy
from qtrap_proxy.tgi_route import TGIRoute


class _FastPath:
    """Sends the relay routes straight to their handlers; everything else goes through Starlette.

    The relay routes do their own error handling, so Starlette's middleware layers
    (which wrap every send) would only add cost on the hottest path.
    """

    def __init__(self, routes: dict[str, ASGIApp], app: Starlette) -> None:
        self.routes = routes
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            handler = self.routes.get(scope["path"])
            if handler is not None:
                await handler(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(proxy: Proxy) -> ASGIApp:
    async def models(_: Request) -> JSONResponse:
        return JSONResponse(proxy.models())

    async def health(_: Request) -> JSONResponse:
        code, body = await proxy.health()
        return JSONResponse(body, status_code=code)

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(proxy.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def request_record(request: Request) -> Response:
        try:
            rid = check_id(request.path_params["request_id"], "request id")
        except QtrapError as e:
            return _qtrap_error(e)
        rec = proxy.record(rid)
        if rec is None:
            return _error(404, f"no record of request {rid!r}", "not_found_error")
        return JSONResponse(rec)

    async def chain_record(request: Request) -> Response:
        try:
            cid = check_id(request.path_params["chain_id"], "chain id")
        except QtrapError as e:
            return _qtrap_error(e)
        rec = proxy.chain(cid)
        if rec is None:
            return _error(404, f"no record of chain {cid!r}", "not_found_error")
        return JSONResponse(rec)

    async def chain_score(request: Request) -> Response:
        try:
            cid = check_id(request.path_params["chain_id"], "chain id")
            raw = await read_body(request.scope, request.receive, MAX_ADMIN_BODY_BYTES)
            body = parse_json_object(raw)
            if not isinstance(body.get("correct"), bool):
                raise BadRequest("'correct' must be true or false", param="correct")
            hops = body.get("hops")
            if hops is not None:
                hops = check_hops(hops, "hops")
        except QtrapError as e:
            return _qtrap_error(e)
        res = proxy.score_chain(cid, body["correct"], hops)
        if res is None:
            return _error(404, f"no record of chain {cid!r}", "not_found_error")
        return JSONResponse(res)

    async def energy(_: Request) -> JSONResponse:
        return JSONResponse(proxy.energy.energy_report())

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        response = _error(exc.status_code, str(exc.detail), kind)
        response.headers.update(exc.headers or {})  # a 405 carries Allow
        return response

    relay: dict[str, ASGIApp] = {
        "/v1/chat/completions": OpenAIRoute(proxy, chat=True),
        "/v1/completions": OpenAIRoute(proxy, chat=False),
        "/generate": TGIRoute(proxy, "/generate"),
        "/generate_stream": TGIRoute(proxy, "/generate_stream"),
        "/": TGIRoute(proxy, "/"),
    }
    routes = [
        *(Route(path, handler, methods=["POST"]) for path, handler in relay.items()),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/qtrap/v1/requests/{request_id}", request_record, methods=["GET"]),
        Route("/qtrap/v1/chains/{chain_id}", chain_record, methods=["GET"]),
        Route("/qtrap/v1/chains/{chain_id}/score", chain_score, methods=["POST"]),
        Route("/qtrap/v1/energy", energy, methods=["GET"]),
    ]

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await proxy.start()
        try:
            yield
        finally:
            await proxy.close()

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    return _FastPath(relay, app)


def _qtrap_error(e: QtrapError) -> Response:
    return Response(e.openai_body(), status_code=e.status, media_type="application/json")


def _error(status: int, message: str, kind: str) -> Response:
    return Response(
        openai_error_body(message, kind, None, status), status_code=status, media_type="application/json"
    )
