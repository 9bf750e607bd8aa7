"""The backends' health probes, shared and bounded (issue 13).

Every backend's probe is at most ``server.health_cache_s`` old; callers that arrive while a probe runs
share it, so a flood of ``/health`` calls probes each backend once per period.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from qtrap_proxy.config import ServerConfig
from qtrap_proxy.upstream import Backend, Health


class BackendProbes:
    def __init__(self, backends: Sequence[Backend], server: ServerConfig) -> None:
        self.backends = backends
        self.server = server  # health_cache_s, health_timeout_s
        self._last: tuple[float, list[Health]] | None = None  # (monotonic, the backends' probes)
        self._probe: asyncio.Future[list[Health]] | None = None

    async def results(self) -> list[Health]:
        """Every backend's probe, in the order of the backends, at most ``health_cache_s`` old."""
        last = self._last
        if last is not None and time.monotonic() - last[0] < self.server.health_cache_s:
            return last[1]
        if self._probe is None:
            self._probe = asyncio.ensure_future(self._probe_backends())
        return await asyncio.shield(self._probe)

    def expire(self) -> None:
        """Forget the cached probes: the next call probes the backends."""
        self._last = None

    async def _probe_backends(self) -> list[Health]:
        try:
            timeout = self.server.health_timeout_s
            results: list[Health] = await asyncio.gather(*(b.probe(timeout) for b in self.backends))
            for b, h in zip(self.backends, results, strict=True):
                b.probe_ok = h.ok
                if h.ok:
                    b.down_until = 0.0
            self._last = (time.monotonic(), results)
            return results
        finally:
            self._probe = None
