"""A real proxy served by uvicorn in a thread of the test process, on loopback.

For tests that must reach inside the proxy (inject a fault into its ledger) or
that need the h11 parser, which passes control bytes in header values on to the
application where httptools (the proxy's default) refuses them itself.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from qtrap_proxy.app import create_app
from qtrap_proxy.config import load_config
from qtrap_proxy.proxy import Proxy
from tests.helpers import free_port


@dataclass
class InProc:
    url: str
    proxy: Proxy


@contextmanager
def running_proxy(tmp: Path, config: dict[str, Any], http: str = "h11") -> Iterator[InProc]:
    port = free_port()
    config = {**config, "server": {**config.get("server", {}), "host": "127.0.0.1", "port": port}}
    config.setdefault("ledger", {"path": str(tmp / f"ledger-{port}.sqlite")})
    proxy = Proxy(load_config(data=config))
    server = uvicorn.Server(
        uvicorn.Config(create_app(proxy), host="127.0.0.1", port=port, log_level="critical", http=http)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise TimeoutError("the in-process proxy did not start")
        time.sleep(0.02)
    try:
        yield InProc(f"http://127.0.0.1:{port}", proxy)
    finally:
        server.should_exit = True
        thread.join(30)
