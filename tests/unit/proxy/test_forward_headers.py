"""server.forward_headers: the client headers named there go upstream, nothing else of the client's does;
the config refuses names the proxy sets itself, x-qtrap-* and Authorization."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from qtrap_common.asgi import Scope
from qtrap_proxy.app import Shutdown, close_proxy
from qtrap_proxy.config import load_config
from qtrap_proxy.errors import ConfigError
from qtrap_proxy.openai_route import OpenAIRoute
from qtrap_proxy.passthrough import PassthroughRoute
from qtrap_proxy.proxy import Proxy
from tests.unit.proxy.mock_transport import MockTransport, Script

JSON_HEAD = [(b"content-type", b"application/json")]
ANSWER = b'{"id":"x","choices":[{"index":0,"message":{"content":"hi"}}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}'
CLIENT_HEADERS = [
    (b"content-type", b"application/json"),
    (b"x-tenant", b"team-a"),
    (b"openai-organization", b"org-1"),
    (b"x-other", b"not forwarded"),
    (b"authorization", b"Bearer client-secret"),
]


def _proxy(tmp_path: Path, forward: list[str]) -> Proxy:
    backends = [
        {"name": "b", "pool": "p", "precision": "bf16", "url": "http://10.0.3.7:8000", "model": "m"},
    ]
    cfg = {
        "backends": backends,
        "ledger": {"path": str(tmp_path / "ledger.sqlite"), "batch_s": 0.01},
        "server": {"forward_headers": forward},
    }
    return Proxy(load_config(data=cfg))


async def _post(app: Any, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    raw = orjson.dumps(body)
    out: dict[str, Any] = {"body": b""}
    done = False

    async def receive() -> dict[str, Any]:
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def send(msg: dict[str, Any]) -> None:
        if msg["type"] == "http.response.start":
            out["status"] = msg["status"]
        else:
            out["body"] += msg.get("body", b"")

    scope: Scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "query_string": b"",
        "headers": CLIENT_HEADERS,
    }
    await app(scope, receive, send)
    return out["status"], out["body"]


def _sent_headers(
    tmp_path: Path, forward: list[str], passthrough: bool = False
) -> tuple[dict[str, str], bytes]:
    proxy = _proxy(tmp_path, forward)
    mock = MockTransport("b", Script(headers=JSON_HEAD, chunks=[ANSWER]))
    proxy.backends[0].transport = mock

    async def run() -> tuple[dict[str, str], bytes]:
        await proxy.start()
        try:
            if passthrough:
                status, body = await _post(
                    PassthroughRoute(proxy, "/tokenize"), "/tokenize", {"prompt": "a b"}
                )
            else:
                chat = {"model": "p", "messages": [{"role": "user", "content": "hi"}]}
                status, body = await _post(OpenAIRoute(proxy, chat=True), "/v1/chat/completions", chat)
            assert status == 200, body
            if passthrough:  # no model given, one pool: the pool's backend, its upstream id
                assert orjson.loads(mock.sent[0].body or b"") == {"prompt": "a b", "model": "m"}
            return {k.lower(): v for k, v in mock.sent[0].headers.items()}, body
        finally:
            await close_proxy(proxy, Shutdown(5))

    return asyncio.run(run())


def test_only_listed_headers_are_forwarded(tmp_path: Path) -> None:
    sent, body = _sent_headers(tmp_path, ["X-Tenant", "openai-organization"])
    assert sent["x-tenant"] == "team-a" and sent["openai-organization"] == "org-1"
    assert "x-other" not in sent
    assert sent["authorization"] == "Bearer client-secret"  # auth off: as before, not through the list
    # the non-streaming answer gets the energy in usage (no meter: null, why, not provisional)
    usage = orjson.loads(body)["usage"]
    assert usage["completion_tokens"] == 1 and usage["energy_j"] is None
    assert usage["qtrap"]["provisional"] is False and usage["qtrap"]["energy_unknown_reason"]


def test_default_forwards_no_client_header(tmp_path: Path) -> None:
    sent, _ = _sent_headers(tmp_path, [])
    assert "x-tenant" not in sent and "openai-organization" not in sent and "x-other" not in sent


def test_passthrough_forwards_listed_headers_and_rewrites_model(tmp_path: Path) -> None:
    sent, _ = _sent_headers(tmp_path, ["x-tenant"], passthrough=True)
    assert sent["x-tenant"] == "team-a" and "x-other" not in sent


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("Authorization", "authorization is not forwarded by name"),
        ("x-qtrap-chain-id", "set by the proxy itself"),
        ("Host", "set by the proxy itself"),
        ("content-length", "set by the proxy itself"),
        ("x-request-id", "set by the proxy itself"),
        ("bad header", "is not an HTTP header name"),
    ],
)
def test_config_refuses_what_cannot_be_forwarded(tmp_path: Path, name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as ei:
        _proxy(tmp_path, [name])
    assert "server.forward_headers" in str(ei.value)


def test_config_normalises_names(tmp_path: Path) -> None:
    proxy = _proxy(tmp_path, ["X-Tenant", "x-tenant ", "OpenAI-Organization"])
    assert proxy.config.server.forward_headers == ["x-tenant", "openai-organization"]
