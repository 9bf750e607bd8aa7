"""A blocking wrapper of :class:`~qtrap_client.client.QtrapClient` for scripts and notebooks.

It owns a private event loop and runs each call to completion on it, so it must not be called from
inside a running event loop (use :class:`~qtrap_client.client.QtrapClient` there). Same methods, same
answers, same exceptions; :meth:`QtrapSyncClient.iter_requests` is a plain iterator.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from types import TracebackType
from typing import Any, Literal, TypeVar

from qtrap_client.client import GroupBy, QtrapClient, Time
from qtrap_common.wire import ChainPage, ChainSummary, RecordPage, RequestRecord, UsageReport

T = TypeVar("T")


class QtrapSyncClient:
    """Blocking :class:`QtrapClient` (same arguments, no ``session``); close it, or use ``with``."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout_s: float = 10.0) -> None:
        self._loop = asyncio.new_event_loop()
        self._client = QtrapClient(base_url, api_key=api_key, timeout_s=timeout_s)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(coro)

    def __enter__(self) -> QtrapSyncClient:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if not self._loop.is_closed():
            self._run(self._client.close())
            self._loop.close()

    def request(self, request_id: str) -> RequestRecord:
        return self._run(self._client.request(request_id))

    def wait_final(self, request_id: str, timeout_s: float = 60.0, **kw: float) -> RequestRecord:
        return self._run(self._client.wait_final(request_id, timeout_s, **kw))

    def chain(self, chain_id: str, *, page_size: int | None = None) -> ChainSummary:
        return self._run(self._client.chain(chain_id, page_size=page_size))

    def chain_page(self, chain_id: str, offset: int = 0, limit: int | None = None) -> ChainPage:
        return self._run(self._client.chain_page(chain_id, offset, limit))

    def wait_chain_final(self, chain_id: str, timeout_s: float = 60.0) -> ChainSummary:
        return self._run(self._client.wait_chain_final(chain_id, timeout_s))

    def score_chain(self, chain_id: str, correct: bool, hops: int | None = None) -> dict[str, Any]:
        return self._run(self._client.score_chain(chain_id, correct, hops))

    def requests(self, **kw: Any) -> RecordPage:
        return self._run(self._client.requests(**kw))

    def iter_requests(self, *, order: Literal["desc", "asc"] = "asc", **kw: Any) -> Iterator[RequestRecord]:
        it: AsyncIterator[RequestRecord] = self._client.iter_requests(order=order, **kw)

        async def step() -> tuple[bool, RequestRecord | None]:
            try:
                return True, await anext(it)
            except StopAsyncIteration:
                return False, None

        while True:
            more, rec = self._run(step())
            if not more or rec is None:
                return
            yield rec

    def usage(self, *, group_by: Sequence[GroupBy] = (), **kw: Time | str | None) -> UsageReport:
        return self._run(self._client.usage(group_by=group_by, **kw))  # type: ignore[arg-type]

    def key_usage(
        self, key_id: str, *, since: Time | None = None, until: Time | None = None
    ) -> dict[str, Any]:
        return self._run(self._client.key_usage(key_id, since=since, until=until))

    def models(self) -> list[str]:
        return self._run(self._client.models())

    def energy(self) -> dict[str, Any]:
        return self._run(self._client.energy())

    def backends(self) -> list[dict[str, Any]]:
        return self._run(self._client.backends())
