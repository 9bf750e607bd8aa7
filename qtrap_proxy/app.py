"""The ASGI application: the relay routes' fast path, the admin edge (admin.py), the limits and the
API-key gate in front of them, and the lifespan (start, and the bounded close at shutdown)."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from qtrap_common.background import STOP_TIMEOUT_S
from qtrap_proxy import admin
from qtrap_proxy.auth import AuthGate
from qtrap_proxy.errors import LedgerUnavailable
from qtrap_proxy.guard import Guard
from qtrap_proxy.ledger import Ledger
from qtrap_proxy.openai_route import EmbeddingsRoute, OpenAIRoute
from qtrap_proxy.passthrough import PassthroughRoute
from qtrap_proxy.proxy import Proxy
from qtrap_proxy.responses_route import ResponsesRoute
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

    await proxy.stop_probing()
    running = await _requests_ended(proxy, left(REQUESTS_GRACE_S))
    if running:
        log.warning(
            "%d requests still in flight at shutdown; finalised if they end before the ledger closes", running
        )
    if not await proxy.energy.stop(left() * ENERGY_SHARE):
        log.error("energy service did not stop cleanly within the shutdown bound")
    if proxy.carbon.polling:
        await proxy.carbon.stop(left(STOP_TIMEOUT_S))
    if proxy.otel is not None:  # the spans of the requests finalised above, flushed (bounded)
        otel = proxy.otel
        try:
            await asyncio.wait_for(asyncio.to_thread(otel.shutdown), max(0.1, left(otel.cfg.timeout_s)))
        except TimeoutError:
            log.error("the OpenTelemetry exporter did not flush within the shutdown bound")
    if proxy.otlp is not None and not await proxy.otlp.stop(left(STOP_TIMEOUT_S)):
        log.error("the OTLP receiver did not stop within the shutdown bound")
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

    relay: dict[str, ASGIApp] = {
        "/v1/chat/completions": OpenAIRoute(proxy, chat=True),
        "/v1/completions": OpenAIRoute(proxy, chat=False),
        "/v1/embeddings": EmbeddingsRoute(proxy),
        "/v1/responses": ResponsesRoute(proxy),
        "/tokenize": PassthroughRoute(proxy, "/tokenize"),
        "/detokenize": PassthroughRoute(proxy, "/detokenize"),
        "/generate": TGIRoute(proxy, "/generate"),
        "/generate_stream": TGIRoute(proxy, "/generate_stream"),
        "/": TGIRoute(proxy, "/"),
    }
    routes = [
        *(Route(path, handler, methods=["POST"]) for path, handler in relay.items()),
        *admin.routes(proxy),
    ]

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await proxy.start()
        try:
            yield
        finally:
            await close_proxy(proxy, bound)

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: admin.http_error, LedgerUnavailable: admin.ledger_error},
    )
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
