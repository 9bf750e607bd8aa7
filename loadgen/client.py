"""The HTTP side: one streamed chat completion per call, timed on the client.

aiohttp rather than the openai SDK: a load generator must never be the bottleneck
(docs/benchmarks.md measures 2,000 concurrent streams on two cores), and the same
session serves the proxy's admin API. The wire format is OpenAI's: ``stream: true``
with ``stream_options.include_usage`` so the last chunk carries the token counts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from qtrap_common import wire


@dataclass(slots=True)
class Exchange:
    """One request as the client saw it."""

    chain: str
    hop: int
    t_send: float  # time.monotonic() when the request was handed to the connection
    request_id: str | None = None
    status: str = "error"  # ok | error
    http_status: int | None = None
    error: str | None = None
    text: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    chunks: int = 0
    t_first: float | None = None  # first content token
    t_end: float = 0.0
    backend: str | None = None
    precision: str | None = None
    record: dict[str, Any] | None = field(default=None, repr=False)  # the proxy's final record, fetched later

    @property
    def ttft_s(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_send

    @property
    def e2e_s(self) -> float:
        return self.t_end - self.t_send

    @property
    def itl_s(self) -> float | None:
        """Mean inter-token latency after the first token."""
        n = self.completion_tokens
        if self.t_first is None or not n or n < 2:
            return None
        return (self.t_end - self.t_first) / (n - 1)


def key_session_args(api_key: str | None, admin_key: str | None) -> dict[str, Any]:
    """``aiohttp.ClientSession`` keyword arguments that send the keys (none without keys, so that an aiohttp
    older than 3.12, without client middlewares, still runs keyless)."""
    mw = key_middlewares(api_key, admin_key)
    return {"middlewares": mw} if mw else {}


def key_middlewares(api_key: str | None, admin_key: str | None) -> tuple[Any, ...]:
    """aiohttp client middlewares that send the proxy's keys (``auth.enabled``): the admin key on its
    ``/qtrap/v1/*`` routes (energy, backends, records) where one is given, else the client key; the client key
    everywhere else (the serving routes refuse the admin key). A request that already carries
    ``Authorization`` keeps it. Nothing when neither key is given."""
    if not api_key and not admin_key:
        return ()

    async def send_key(
        req: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        key = admin_key if admin_key and "/qtrap/v1/" in req.url.path else api_key
        if key and "Authorization" not in req.headers:
            req.headers["Authorization"] = f"Bearer {key}"
        return await handler(req)

    return (send_key,)


def _error_message(body: bytes) -> str:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:200].decode("utf-8", "replace").strip() or "no body"
    if isinstance(doc, dict):
        err = doc.get("error", doc)
        if isinstance(err, dict):
            return str(err.get("message") or err)[:300]
        return str(err)[:300]
    return str(doc)[:300]


class ChatClient:
    """Streams chat completions from ``base_url`` (a proxy or any OpenAI-compatible server)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        model: str,
        *,
        max_tokens: int,
        seed: int | None = 0,
        temperature: float = 0.0,
        timeout_s: float = 600.0,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        self.session = session
        self.url = base_url.rstrip("/") + "/v1/chat/completions"
        self.model = model
        self.max_tokens = max_tokens
        self.seed = seed
        self.temperature = temperature
        self.extra_body = dict(extra_body or {})  # engine sampling options, e.g. vLLM's ignore_eos
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=10)

    async def report_score(self, chain: str, correct: bool, hops: int) -> None:
        """Tell the proxy whether a chain's final answer was right (``qtrap_chains_scored_total``), so its
        dashboards can show energy per correct answer; best effort: other servers do not know the route."""
        url = self.url.rsplit("/v1/", 1)[0] + wire.path(wire.CHAIN_SCORE_PATH, chain_id=chain)
        try:
            async with self.session.post(
                url,
                data=orjson.dumps({"correct": correct, "hops": hops}),
                headers={"content-type": "application/json"},
                timeout=self.timeout,
            ) as r:
                await r.read()
        except (TimeoutError, aiohttp.ClientError):
            pass

    async def chat(self, prompt: str, *, chain: str, hop: int, headers: dict[str, str]) -> Exchange:
        body: dict[str, Any] = {
            **self.extra_body,
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.seed is not None:
            body["seed"] = self.seed
        ex = Exchange(chain, hop, time.monotonic())
        try:
            async with self.session.post(
                self.url,
                data=orjson.dumps(body),
                headers={"content-type": "application/json", **headers},
                timeout=self.timeout,
            ) as r:
                ex.http_status = r.status
                ex.request_id = r.headers.get(wire.RESP_REQUEST_ID)
                ex.backend = r.headers.get(wire.RESP_BACKEND)
                ex.precision = r.headers.get(wire.RESP_PRECISION)
                if r.status != 200:
                    ex.error = f"HTTP {r.status}: {_error_message(await r.read())}"
                    return ex
                await self._consume(r, ex)
        except TimeoutError:
            ex.error = "timed out"
        except aiohttp.ClientError as e:
            ex.error = f"connection: {e}" if str(e) else f"connection: {type(e).__name__}"
        finally:
            ex.t_end = time.monotonic()
        return ex

    @staticmethod
    async def _consume(r: aiohttp.ClientResponse, ex: Exchange) -> None:
        parts: list[str] = []
        done = False
        eof = False
        pending = b""  # the start of a line whose end has not arrived yet
        while not (done or eof):
            got = await r.content.readany()  # one await per read from the socket, not one per line
            if got:
                lines = (pending + got).split(b"\n")
                pending = lines.pop()
            else:  # the end of the body: its last line may lack a newline
                lines, eof = [pending], True
            for raw in lines:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                try:
                    doc = orjson.loads(data)
                except orjson.JSONDecodeError:
                    ex.error = "malformed stream chunk"
                    return
                if "error" in doc:
                    ex.error = f"stream error: {_error_message(data)}"
                    return
                for choice in doc.get("choices") or ():
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        if ex.t_first is None:
                            ex.t_first = time.monotonic()
                        parts.append(content)
                        ex.chunks += 1
                usage = doc.get("usage")
                if usage:
                    ex.prompt_tokens = usage.get("prompt_tokens")
                    ex.completion_tokens = usage.get("completion_tokens")
        ex.text = "".join(parts)
        if ex.completion_tokens is None:
            ex.completion_tokens = ex.chunks  # no usage from the server: one token per chunk, an estimate
        # some OpenAI-compatible servers (transformers serve) end the stream without [DONE]
        ex.status = "ok"
        if not done and not parts:
            ex.status, ex.error = "error", "stream ended with no content"
