"""A typed Python client of qtrap-proxy's admin API: the energy of a request, a chain or a time range.

    async with QtrapClient("http://127.0.0.1:8080", api_key=key) as q:
        rec = await q.wait_final(request_id, timeout_s=30)      # the settled figure
        print(rec["energy_j"], rec["j_per_token"])
        day = await q.usage(group_by=["precision"], since="2026-12-01", until="2026-12-02")
        async for r in q.iter_requests(since=t0, pool="qwen3-8b", final=True): ...

:class:`QtrapSyncClient` is the same without ``await``. Answers are :mod:`qtrap_common.wire`'s types
(plain JSON objects as the proxy wrote them); exceptions are :mod:`qtrap_client.errors`'. It imports
none of the products (an import-linter contract): only ``qtrap_common``, aiohttp and pydantic.
"""

from __future__ import annotations

from qtrap_client.client import QtrapClient
from qtrap_client.errors import (
    ApiError,
    BadRequest,
    FinalTimeout,
    Forbidden,
    NotFound,
    ProtocolError,
    ProxyUnreachable,
    QtrapClientError,
    Unauthorized,
)
from qtrap_client.sync import QtrapSyncClient

__all__ = [
    "ApiError",
    "BadRequest",
    "FinalTimeout",
    "Forbidden",
    "NotFound",
    "ProtocolError",
    "ProxyUnreachable",
    "QtrapClient",
    "QtrapClientError",
    "QtrapSyncClient",
    "Unauthorized",
]
