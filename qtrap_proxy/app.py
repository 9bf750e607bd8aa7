"""The ASGI application: routes, admin endpoints and lifecycle."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from qtrap_common import wire
from qtrap_common.background import STOP_TIMEOUT_S
from qtrap_proxy.asgi import read_body
from qtrap_proxy.auth import AuthGate, principal_of
from qtrap_proxy.errors import BadRequest, QtrapError, openai_error_body
from qtrap_proxy.guard import Guard
from qtrap_proxy.keystore import KEY_ID
from qtrap_proxy.ledger import Ledger
from qtrap_proxy.limits import (
    MAX_ADMIN_BODY_BYTES,
    bounded,
    check_hops,
    check_id,
    parse_json_object,
    parse_page,
    parse_time,
)
from qtrap_proxy.openai_route import OpenAIRoute
from qtrap_proxy.openapi import build_openapi
from qtrap_proxy.proxy import Proxy
from qtrap_proxy.tgi_route import TGIRoute

log = logging.getLogger("qtrap.shutdown")

# Shares of server.shutdown_timeout_s, counted from the signal (or from the lifespan's end without one):
DRAIN_SHARE = 0.5  # in-flight requests may finish until then; then the server cuts their connections
CUT_SHARE = 0.6  # requests still running then (not ended by the cut) are cancelled
CLOSE_SHARE = 0.9  # energy finalised and the ledger flushed by then; the rest is the process's own teardown
REQUESTS_GRACE_S = 1.0  # longest wait for cut requests to unwind (end their timelines) before finalising
ENERGY_SHARE = 0.6  # of the time left for closing: finalising energy; the rest is the ledger's


@dataclass
class Shutdown:
    """A shutdown's bound (``server.shutdown_timeout_s``), when it began and whether it flushed the ledger.

    server.py starts it at the first SIGTERM/SIGINT and ends the process at the bound whatever is still
    running; the lifespan's close (:func:`close_proxy`) aims at ``CLOSE_SHARE`` of it."""

    timeout_s: float
    started: float | None = None  # time.monotonic() at the signal
    flushed: bool | None = None  # once the ledger is closed: whether every final record was committed

    def start(self) -> None:
        if self.started is None:
            self.started = time.monotonic()

    def left(self, share: float = 1.0) -> float:
        """Seconds until ``share`` of the bound has passed since the start (the whole share if not started)."""
        used = 0.0 if self.started is None else time.monotonic() - self.started
        return max(0.0, share * self.timeout_s - used)


async def close_proxy(proxy: Proxy, shutdown: Shutdown) -> bool:
    """Close the proxy within the shutdown's bound; True if every final record reached the ledger.

    In order, each step bounded by what is left of ``CLOSE_SHARE`` of the bound: requests the server
    cut unwind (their timelines end); energy is finalised (EnergyService.stop: requests that ended
    get their measured figure if the meter can still close their last interval, else energy unknown
    with the reason); the backends' connection pools are closed; the ledger flushes and stops, in a
    daemon thread so that a stuck write cannot hold the process. What overran is logged.
    """
    shutdown.start()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + shutdown.left(CLOSE_SHARE)

    def left(cap: float = math.inf) -> float:
        return max(0.0, min(cap, deadline - loop.time()))

    running = await _requests_ended(proxy, left(REQUESTS_GRACE_S))
    if running:
        log.warning(
            "%d requests still in flight at shutdown; finalised if they end before the ledger closes", running
        )
    if not await proxy.energy.stop(left() * ENERGY_SHARE):
        log.error("energy service did not stop cleanly within the shutdown bound")
    try:
        async with asyncio.timeout(left(STOP_TIMEOUT_S)):
            await asyncio.gather(*(b.close() for b in proxy.backends))
    except TimeoutError:
        log.error("closing the backends' connection pools overran the shutdown bound; left open")
    shutdown.flushed = await _close_ledger(proxy.ledger, left())
    if proxy.key_ring is not None:
        proxy.key_ring.store.close()
    return shutdown.flushed


async def _requests_ended(proxy: Proxy, timeout_s: float) -> int:
    """Wait (at most ``timeout_s``) until no request is in flight; returns how many still are."""
    loop = asyncio.get_running_loop()
    until = loop.time() + timeout_s
    while True:
        running = proxy.energy.running()
        if not running or loop.time() >= until:
            return running
        await asyncio.sleep(min(0.01, max(0.0, until - loop.time())))


async def _close_ledger(ledger: Ledger, timeout_s: float) -> bool:
    """Flush and close the ledger within ``timeout_s``; True if no final record was left out."""
    loop = asyncio.get_running_loop()
    dropped = ledger.write_errors["dropped"]
    done: asyncio.Future[None] = loop.create_future()

    def finished() -> None:
        if not done.done():
            done.set_result(None)

    def close() -> None:
        try:
            ledger.close()
        except Exception:
            log.exception("closing the ledger failed")
        finally:
            try:
                loop.call_soon_threadsafe(finished)
            except RuntimeError:  # the event loop is already closed: nobody waits any more
                pass

    threading.Thread(target=close, name="qtrap-ledger-close", daemon=True).start()
    await asyncio.wait((done,), timeout=timeout_s)
    left_out = ledger.pending() + ledger.write_errors["dropped"] - dropped
    if not done.done():
        log.error(
            "the ledger did not flush within %.3g s (server.shutdown_timeout_s); %d final records not committed",
            timeout_s,
            ledger.pending(),
        )
        return False
    if left_out:
        log.error("%d final records could not be written to the ledger at shutdown", left_out)
        return False
    return True


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


def create_app(proxy: Proxy, shutdown: Shutdown | None = None) -> ASGIApp:
    """The proxy's ASGI app; ``shutdown`` bounds its close (default: ``server.shutdown_timeout_s`` from
    the lifespan's end)."""
    bound = shutdown if shutdown is not None else Shutdown(proxy.config.server.shutdown_timeout_s)

    async def models(request: Request) -> JSONResponse:
        return JSONResponse(proxy.models(principal_of(request.scope)))

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
        rec = proxy.records.record(rid)
        who = principal_of(request.scope)
        if rec is None or (who is not None and not who.may_see(rec.get("key_id"))):
            # another key's record is not found either: a key cannot tell others' ids from unknown ones
            return _error(404, f"no record of request {rid!r}", "not_found_error")
        return JSONResponse(rec)

    async def chain_record(request: Request) -> Response:
        try:
            cid = check_id(request.path_params["chain_id"], "chain id")
            offset, limit = parse_page(request.query_params.get("offset"), request.query_params.get("limit"))
        except QtrapError as e:
            return _qtrap_error(e)
        rec = proxy.records.chain_page(cid, offset, limit, principal_of(request.scope))
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
            res = proxy.records.score_chain(cid, body["correct"], hops, principal_of(request.scope))
        except QtrapError as e:
            return _qtrap_error(e)
        if res is None:
            return _error(404, f"no record of chain {cid!r}", "not_found_error")
        return JSONResponse(res)

    async def energy(_: Request) -> JSONResponse:
        return JSONResponse(proxy.energy.energy_report())

    async def keys(_: Request) -> Response:
        if proxy.key_ring is None:
            return _error(
                404, "authentication is off (auth.enabled: false): there are no keys", "not_found_error"
            )
        now = time.time()
        return JSONResponse({"keys": [k.public(now) for k in proxy.key_ring.all_keys()]})

    async def key_usage(request: Request) -> Response:
        raw = request.path_params["key_id"]
        who = principal_of(request.scope)
        if proxy.key_ring is None or who is None:
            return _error(
                404, "authentication is off (auth.enabled: false): there are no keys", "not_found_error"
            )
        if not KEY_ID.fullmatch(raw) or not who.may_see(raw):  # another key's usage is not found either
            return _error(404, f"no key {bounded(repr(raw), 80)}", "not_found_error")
        try:
            q = request.query_params
            since = parse_time(q["since"], "since") if "since" in q else 0.0
            until = parse_time(q["until"], "until") if "until" in q else time.time() + 1.0
        except QtrapError as e:
            return _qtrap_error(e)
        usage = proxy.records.key_usage(raw, since, until)
        if usage is None:
            return _error(404, f"no key {raw}", "not_found_error")
        return JSONResponse(usage)

    spec = orjson.dumps(build_openapi(proxy.config.server))

    async def openapi(_: Request) -> Response:
        return Response(spec, media_type="application/json")

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
        Route(wire.REQUEST_PATH, request_record, methods=["GET"]),
        Route(wire.CHAIN_PATH, chain_record, methods=["GET"]),
        Route(wire.CHAIN_SCORE_PATH, chain_score, methods=["POST"]),
        Route(wire.ENERGY_PATH, energy, methods=["GET"]),
        Route(wire.KEYS_PATH, keys, methods=["GET"]),
        Route(wire.KEY_USAGE_PATH, key_usage, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await proxy.start()
        try:
            yield
        finally:
            await close_proxy(proxy, bound)

    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    refused = proxy.metrics.refused

    def on_refuse(reason: str) -> None:
        refused.labels(reason).inc()

    inner: ASGIApp = _FastPath(relay, app)
    if proxy.key_ring is not None and proxy.admin_sha256 is not None:
        tgi = [path for path, handler in relay.items() if isinstance(handler, TGIRoute)]
        inner = AuthGate(
            inner, proxy.config.auth, proxy.key_ring, proxy.admin_sha256, relay, tgi, on_refuse=on_refuse
        )
    return Guard(inner, proxy.config.server, relay, on_refuse)


def _qtrap_error(e: QtrapError) -> Response:
    return Response(e.openai_body(), status_code=e.status, media_type="application/json")


def _error(status: int, message: str, kind: str) -> Response:
    return Response(
        openai_error_body(message, kind, None, status), status_code=status, media_type="application/json"
    )
