"""The backends' health probes, shared and bounded (issue 13).

Every backend's probe is at most ``server.health_cache_s`` old; callers that arrive while a probe runs
share it, so a flood of ``/health`` calls probes each backend once per period.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

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


ENGINE_NAMES = {"vllm": "vLLM", "tgi": "TGI", "openai": "OpenAI-compatible"}
SIMULATED_ENGINE = "qtrap-sim (simulated)"


async def engine_info(backend: Backend, timeout_s: float) -> dict[str, Any]:
    """What the backend says it runs: vLLM's ``GET /version`` and ``GET /v1/models`` (``max_model_len``),
    TGI's ``GET /info`` (``version``, ``model_id``, ``model_dtype``, ``max_total_tokens``); an
    OpenAI-compatible server's ``/version`` when it has one. A backend that says ``"simulated": true``
    (qtrap-sim) is named ``qtrap-sim (simulated)``. Figures the backend does not give are null, with
    ``engine_error`` saying why when it did not answer."""
    out: dict[str, Any] = {
        "engine": ENGINE_NAMES.get(backend.kind, backend.kind),
        "engine_version": None,
        "simulated": False,
        "served_model": None,
        "max_model_len": None,
        "dtype": None,
        "engine_error": None,
    }
    if backend.kind == "tgi":
        status, doc, err = await backend.get_json("/info", timeout_s)
        if isinstance(doc, dict) and status == 200:
            out.update(
                engine_version=_str(doc.get("version")),
                served_model=_str(doc.get("model_id")),
                dtype=_str(doc.get("model_dtype")),
                max_model_len=_int(doc.get("max_total_tokens")),
            )
        else:
            out["engine_error"] = err or f"GET /info: HTTP {status}"
    else:
        (status, doc, err), (mstatus, models, _) = await asyncio.gather(
            backend.get_json("/version", timeout_s), backend.get_json("/v1/models", timeout_s)
        )
        if isinstance(doc, dict) and status == 200:
            out["engine_version"] = _str(doc.get("version"))
        else:
            out["engine_error"] = err or f"GET /version: HTTP {status}"
        data = models.get("data") if isinstance(models, dict) and mstatus == 200 else None
        mine = [m for m in data or [] if isinstance(m, dict)]
        match = next((m for m in mine if m.get("id") == backend.cfg.model), mine[0] if mine else None)
        if match is not None:
            out["served_model"] = _str(match.get("root") or match.get("id"))
            out["max_model_len"] = _int(match.get("max_model_len"))
    if isinstance(doc, dict) and doc.get("simulated") is True:
        out["engine"], out["simulated"] = SIMULATED_ENGINE, True
    return out


def _str(x: Any) -> str | None:
    return None if x is None else str(x)[:200]


def _int(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) else None
