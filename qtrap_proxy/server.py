"""Running the app under uvicorn (uvloop and httptools when installed)."""

from __future__ import annotations

import logging

import uvicorn
from prometheus_client import disable_created_metrics

from qtrap_proxy.app import create_app
from qtrap_proxy.config import ProxyConfig
from qtrap_proxy.proxy import Proxy

log = logging.getLogger("qtrap.server")


def serve(cfg: ProxyConfig, *, log_level: str = "info", access_log: bool = False) -> None:
    disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series
    proxy = Proxy(cfg)
    app = create_app(proxy)
    config = uvicorn.Config(
        app,
        host=cfg.server.host,
        port=cfg.server.port,
        log_level=log_level,
        access_log=access_log,
        backlog=4096,
        timeout_keep_alive=75,
        loop="auto",
        http="auto",
    )
    for pool, precisions in proxy.router.pools.items():
        log.info("pool %s: %s", pool, ", ".join(f"{p} x{len(bs)}" for p, bs in precisions.items()))
    uvicorn.Server(config).run()
