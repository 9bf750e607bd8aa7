"""An in-process transport for the relay's tests: scripted backend answers, no sockets, no processes.

A :class:`Script` says what the backend does; failures are given as the exceptions an HTTP library
would raise (``ConnectionRefusedError``, ``TimeoutError``, ``ConnectionResetError``, ...) and go through
the same :class:`~qtrap_proxy.transport.UpstreamFaults` mapping as the real transports', so the relay
sees exactly the errors it sees in production.

    mock = MockTransport("b", Script(chunks=[b"data: {...}\\n\\n", ConnectionResetError("reset")]))
    proxy.backends[0].transport = mock
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

from qtrap_proxy.config import Timeouts
from qtrap_proxy.transport import Transport, UpstreamFaults, UpstreamResponse

SSE = [(b"content-type", b"text/event-stream")]


@dataclass
class Script:
    """One scripted answer.

    ``head``: raised instead of an answer (before the head). Otherwise the answer has ``status`` and
    ``headers``, and its body is ``chunks`` in order; an exception among them is raised when reached.
    ``hang``: after the chunks, the body never ends (until the request is cancelled)."""

    status: int = 200
    headers: Sequence[tuple[bytes, bytes]] = field(default_factory=lambda: list(SSE))
    chunks: Sequence[bytes | BaseException] = ()
    head: BaseException | None = None
    hang: bool = False


@dataclass
class Sent:
    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes | None


class MockResponse(UpstreamResponse):
    __slots__ = ("_faults", "_script", "chunks_read", "closed", "released")

    def __init__(self, script: Script, faults: UpstreamFaults) -> None:
        self.status = script.status
        self.raw_headers = list(script.headers)
        self.headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in script.headers}
        self._script = script
        self._faults = faults
        self.chunks_read = 0
        self.closed = False  # aborted (the backend would see its client go)
        self.released = False  # finished with normally

    async def _body(self, streaming: bool) -> AsyncIterator[bytes]:
        for item in self._script.chunks:
            await asyncio.sleep(0)  # a chunk arrives: one event-loop round
            if isinstance(item, BaseException):
                raise self._faults.in_body(item, streaming=streaming) from item
            self.chunks_read += 1
            yield item
        if self._script.hang:
            await asyncio.get_running_loop().create_future()  # until cancelled

    def aiter_bytes(self) -> AsyncIterator[bytes]:
        return self._body(streaming=True)

    async def read(self) -> bytes:
        return b"".join([c async for c in self._body(streaming=False)])

    def close(self) -> None:
        self.closed = True

    def release(self) -> None:
        self.released = True


class MockTransport(Transport):
    """Answers every request with ``script`` (or, given a list, the next script of it)."""

    def __init__(self, name: str, script: Script | list[Script], expose_address: bool = False) -> None:
        self.faults = UpstreamFaults(name, expose_address)
        self.scripts = script if isinstance(script, list) else None
        self.script = script if isinstance(script, Script) else None
        self.sent: list[Sent] = []
        self.responses: list[MockResponse] = []
        self.answered = asyncio.Event()  # set once an answer's head has been returned
        self.closed = False

    async def send(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes | None = None,
        *,
        timeouts: Timeouts | None = None,
    ) -> UpstreamResponse:
        self.sent.append(Sent(method, path, dict(headers), body))
        script = self.scripts.pop(0) if self.scripts is not None else self.script
        assert script is not None, "no script left"
        await asyncio.sleep(0)
        if script.head is not None:
            raise self.faults.before_head(script.head) from script.head
        resp = MockResponse(script, self.faults)
        self.responses.append(resp)
        self.answered.set()
        return resp

    async def aclose(self) -> None:
        self.closed = True
