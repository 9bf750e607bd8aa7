"""Running the app under uvicorn (uvloop and httptools when installed), and stopping it within a bound.

On the first SIGTERM (or SIGINT) uvicorn stops accepting connections and lets in-flight requests
finish until ``DRAIN_SHARE`` of ``server.shutdown_timeout_s`` has passed; then their connections are
cut (they end as a client's disconnect does) and, from ``CUT_SHARE``, uvicorn cancels what still
runs; the app's lifespan then finalises energy and flushes the ledger (app.close_proxy). A
watchdog thread started by the signal ends the process at the bound whatever is still running
(a task that ignores its cancellation, a thread stuck in a driver call, ...), with status 0 if
the ledger was flushed and 1 if not. uvicorn re-raises the signal once it is done, for the
signal's default action; that is absorbed, so the exit status says how the shutdown went.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import socket
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn
from prometheus_client import disable_created_metrics

from qtrap_proxy.app import CUT_SHARE, DRAIN_SHARE, Shutdown, create_app
from qtrap_proxy.config import ProxyConfig
from qtrap_proxy.headtimeout import protocol as head_timeout_protocol
from qtrap_proxy.proxy import Proxy

log = logging.getLogger("qtrap.server")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


_SPARE_FDS = 256  # the ledger, the meter, logs, listening sockets
# connections beyond server.max_connections that still get uvicorn's 503 for a request; past these, a new
# connection is answered 503 and closed at once, so clients and upstreams stay within the open-file limit
_OVER_LIMIT_CONNECTIONS = _SPARE_FDS // 2
_REQUEST_LINE_BYTES = 16_384


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft limit on open files towards ``wanted`` (up to the hard limit); returns the limit now.

    A relayed request holds two descriptors (client and upstream), so ``server.max_connections`` is only
    a bound before the process runs out of them if the limit is about twice that; a warning says when not."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, e)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning(
            "open-file limit %d is below the %d that server.max_connections needs (2 per connection + %d); "
            "lower server.max_connections or raise the hard limit (ulimit -Hn)",
            soft,
            wanted,
            _SPARE_FDS,
        )
    return soft


class _Server(uvicorn.Server):
    """uvicorn's server whose first exit signal starts the shutdown's clock and its watchdog."""

    def __init__(self, config: uvicorn.Config, shutdown: Shutdown) -> None:
        super().__init__(config)
        self.shutdown_bound = shutdown
        self._watchdog: threading.Timer | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if self._watchdog is None:
            self.shutdown_bound.start()
            self._watchdog = threading.Timer(self.shutdown_bound.left(), self._expire)
            self._watchdog.name = "qtrap-shutdown-watchdog"
            self._watchdog.daemon = True
            self._watchdog.start()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # in-flight requests may finish until DRAIN_SHARE of the bound; then their connections are cut, and
        # they end as on a client's disconnect (recorded as such, no traceback); uvicorn's own graceful
        # timeout, at CUT_SHARE, cancels whatever still runs
        self.shutdown_bound.start()
        cut = asyncio.get_running_loop().call_later(self.shutdown_bound.left(DRAIN_SHARE), self._cut)
        # uvicorn starts this clock after a 0.1 s pause; it types it int, but hands it to asyncio.timeout
        graceful_s = max(0.0, self.shutdown_bound.left(CUT_SHARE) - 0.1)
        self.config.timeout_graceful_shutdown = graceful_s  # type: ignore[assignment]
        try:
            await super().shutdown(sockets)
        finally:
            cut.cancel()

    def _cut(self) -> None:
        connections = list(self.server_state.connections)
        if connections:
            log.warning(
                "cutting %d connections still open %.3g s into the shutdown (server.shutdown_timeout_s = %g s)",
                len(connections),
                DRAIN_SHARE * self.shutdown_bound.timeout_s,
                self.shutdown_bound.timeout_s,
            )
        for conn in connections:
            conn.transport.abort()

    def _expire(self) -> None:
        flushed = self.shutdown_bound.flushed is True
        code = 0 if flushed else 1
        log.error(
            "shutdown did not finish within server.shutdown_timeout_s = %g s; exiting now with status %d%s",
            self.shutdown_bound.timeout_s,
            code,
            "" if flushed else " (final records may be missing from the ledger)",
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        os._exit(code)


def serve(cfg: ProxyConfig, *, log_level: str = "info", access_log: bool = False) -> int:
    """Serve until a signal; the exit status: 0 once the ledger is flushed, 1 if it could not be."""
    disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series
    raise_fd_limit(2 * cfg.server.max_connections + _SPARE_FDS)
    proxy = Proxy(cfg)
    shutdown = Shutdown(cfg.server.shutdown_timeout_s)
    app = create_app(proxy, shutdown)
    config = uvicorn.Config(
        app,
        host=cfg.server.host,
        port=cfg.server.port,
        log_level=log_level,
        access_log=access_log,
        backlog=cfg.server.backlog,
        limit_concurrency=cfg.server.max_connections,
        # h11 (when httptools is absent) refuses larger heads itself; app.Guard answers 431 past the limit
        h11_max_incomplete_event_size=cfg.server.max_header_bytes + _REQUEST_LINE_BYTES,
        timeout_keep_alive=75,
        loop="auto",
        http=head_timeout_protocol(
            cfg.server.header_timeout_s, max_open=cfg.server.max_connections + _OVER_LIMIT_CONNECTIONS
        ),
    )
    for pool, precisions in proxy.router.pools.items():
        log.info("pool %s: %s", pool, ", ".join(f"{p} x{len(bs)}" for p, bs in precisions.items()))
    server = _Server(config, shutdown)
    previous: dict[int, _Handler] = {}

    def absorb(sig: int, frame: FrameType | None) -> None:
        # uvicorn's re-raise after a graceful shutdown; a signal before uvicorn took over gets the old action
        if server.should_exit:
            return
        signal.signal(sig, previous[sig] or signal.SIG_DFL)
        signal.raise_signal(sig)

    if threading.current_thread() is threading.main_thread():
        previous.update({sig: signal.signal(sig, absorb) for sig in _SIGNALS})
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler or signal.SIG_DFL)
    if shutdown.flushed is False or (shutdown.flushed is None and server.started):
        log.error("final records could not be flushed to the ledger; exiting with status 1")
        return 1
    return 0
