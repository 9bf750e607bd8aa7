"""Energy in the OpenAI ``usage`` object, read through the clients people use: the official openai SDK,
LangChain's ChatOpenAI and the LiteLLM SDK, each against a real proxy (DCGM meter) in front of a
simulated vLLM backend. Each client's figure is compared with the bytes the proxy sent (an httpx
response hook keeps them): the figure must reach the caller unchanged, not merely be present."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import requests

from qtrap_proxy.energy import reasons
from tests.helpers import backend, free_port, proxy, sim, wait_meter

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # LiteLLM would fetch its price list at import

MSGS = [{"role": "user", "content": "how much energy did this take"}]


@dataclass
class Setup:
    url: str
    bodies: list[bytes] = field(default_factory=list)
    clients: list[httpx.Client] = field(default_factory=list)

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def http_client(self) -> httpx.Client:
        """An httpx client that keeps every response body it receives (streamed ones too)."""

        def keep(r: httpx.Response) -> None:
            r.read()
            self.bodies.append(r.content)

        client = httpx.Client(event_hooks={"response": [keep]}, timeout=60)
        self.clients.append(client)  # closed when the module's tests are done
        return client

    def sent_usage(self) -> dict[str, Any]:
        """The usage object of the last response body as the proxy sent it (a JSON answer or an SSE stream)."""
        body = self.bodies[-1]
        if body.startswith(b"data:"):
            for line in body.split(b"\n"):
                if line.startswith(b"data: {") and b'"usage":{' in line:
                    usage = orjson.loads(line[6:])["usage"]
            assert isinstance(usage, dict)
            return usage
        usage = orjson.loads(body)["usage"]
        assert isinstance(usage, dict)
        return usage


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp: Path = tmp_path_factory.mktemp("client-usage")
    port = free_port()
    with sim(port, "--model", "qwen3-8b", "--precision", "bf16", "--step-ms", "2"):
        cfg: dict[str, Any] = {
            "backends": [backend("sim-bf16", port, "bf16", devices=[{"host": "qtrap-sim", "index": 0}])],
            "meter": {"kind": "dcgm", "urls": [f"http://127.0.0.1:{port}/dcgm/metrics"], "settle_s": 0.3},
        }
        with proxy(tmp, cfg):
            s = Setup(f"http://127.0.0.1:{cfg['server']['port']}")
            wait_meter(s.url)
            # until the meter has seen the GPU busy: before that a request's figure is unknown (null)
            deadline = time.monotonic() + 20
            while True:
                body = {"model": "qwen3-8b", "messages": MSGS, "max_tokens": 30}
                r = requests.post(s.v1 + "/chat/completions", json=body, timeout=30)
                if r.json()["usage"]["energy_j"] is not None:
                    break
                assert time.monotonic() < deadline, r.text
                time.sleep(0.2)
            try:
                yield s
            finally:
                for c in s.clients:
                    c.close()


def _check_sent(setup: Setup, energy_j: object, qtrap: object) -> str:
    """The client's figure is the one the proxy sent, and it names a record that exists."""
    sent = setup.sent_usage()
    assert isinstance(energy_j, float) and energy_j > 0
    assert energy_j == sent["energy_j"]
    assert qtrap == sent["qtrap"]
    assert isinstance(qtrap, dict) and qtrap["provisional"] is True and "energy_unknown_reason" not in qtrap
    assert qtrap["backend"] == "sim-bf16" and qtrap["precision"] == "bf16"
    rec = requests.get(setup.url + qtrap["record_url"], timeout=5).json()
    assert rec["id"] == qtrap["request_id"] and rec["completion_tokens"] == 12
    return str(qtrap["request_id"])


def test_openai_sdk_non_streaming(setup: Setup) -> None:
    client = openai.OpenAI(base_url=setup.v1, api_key="x", max_retries=0, http_client=setup.http_client())
    raw = client.chat.completions.with_raw_response.create(model="qwen3-8b", messages=MSGS, max_tokens=12)  # type: ignore[arg-type]
    resp = raw.parse()
    assert resp.usage is not None and resp.usage.completion_tokens == 12
    extra = resp.usage.model_extra or {}
    rid = _check_sent(setup, extra["energy_j"], extra["qtrap"])
    assert getattr(resp.usage, "energy_j") == extra["energy_j"]  # noqa: B009  attribute access works too
    assert rid == raw.headers["x-qtrap-request-id"]
    # the header is the same figure, to 6 significant digits
    assert float(raw.headers["x-qtrap-energy-j-provisional"]) == pytest.approx(extra["energy_j"], rel=1e-5)


def test_openai_sdk_streaming_usage_chunk(setup: Setup) -> None:
    client = openai.OpenAI(base_url=setup.v1, api_key="x", max_retries=0, http_client=setup.http_client())
    chunks = list(
        client.chat.completions.create(
            model="qwen3-8b",
            messages=MSGS,  # type: ignore[arg-type]
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    with_usage = [c for c in chunks if c.usage is not None]
    assert len(with_usage) == 1 and with_usage[0] is chunks[-1] and not with_usage[0].choices
    usage = with_usage[0].usage
    assert usage is not None and usage.completion_tokens == 12
    extra = usage.model_extra or {}
    _check_sent(setup, extra["energy_j"], extra["qtrap"])
    assert "qtrap" not in (chunks[-1].model_extra or {}), "the energy is in usage only, not beside it"


def test_langchain_chat_openai(setup: Setup) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model="qwen3-8b",
        base_url=setup.v1,
        api_key="x",  # type: ignore[arg-type]
        max_tokens=12,  # type: ignore[call-arg]
        max_retries=0,
        http_client=setup.http_client(),
    )
    msg = llm.invoke("how much energy did this take")
    usage = msg.response_metadata["token_usage"]
    assert msg.usage_metadata is not None and msg.usage_metadata["output_tokens"] == 12
    _check_sent(setup, usage["energy_j"], usage["qtrap"])


def test_litellm_completion(setup: Setup) -> None:
    import litellm

    before = litellm.client_session
    litellm.client_session = setup.http_client()
    try:
        resp = litellm.completion(
            model="openai/qwen3-8b", api_base=setup.v1, api_key="x", messages=MSGS, max_tokens=12
        )
    finally:
        litellm.client_session = before
    usage = resp.usage  # type: ignore[union-attr]
    assert usage.completion_tokens == 12
    _check_sent(setup, usage.energy_j, usage.qtrap)


def test_litellm_headers_as_its_proxy_server_relays_them(setup: Setup) -> None:
    """What a LiteLLM proxy server (qtrap as its upstream, docs/clients.md) builds on: the client's headers
    it forwards (``forward_client_headers_to_llm_api``) go to LiteLLM's SDK as ``headers``, so the client's
    X-Request-Id becomes the record's client_request_id; and the upstream's response headers come back in
    ``_hidden_params["additional_headers"]`` with an ``llm_provider-`` prefix, which the proxy server sends
    to its client: ``llm_provider-x-qtrap-request-id`` names the record, and ``request-id`` is qtrap's
    ``x-request-id`` (the client's id when it sent one). The answer's id is ``chatcmpl-`` + the record id
    (qtrap sends its id upstream as X-Request-Id; vLLM and qtrap-sim name the answer after it)."""
    import litellm

    before = litellm.client_session
    litellm.client_session = setup.http_client()
    try:
        resp = litellm.completion(
            model="openai/qwen3-8b",
            api_base=setup.v1,
            api_key="x",
            messages=MSGS,
            max_tokens=12,
            headers={"X-Request-Id": "litellm-order-1"},
        )
    finally:
        litellm.client_session = before
    rid = _check_sent(setup, resp.usage.energy_j, resp.usage.qtrap)
    relayed = resp._hidden_params["additional_headers"]
    assert relayed["llm_provider-x-qtrap-request-id"] == rid
    assert relayed["llm_provider-x-request-id"] == "litellm-order-1"
    assert float(relayed["llm_provider-x-qtrap-energy-j-provisional"]) == pytest.approx(
        resp.usage.energy_j, rel=1e-5
    )
    assert resp.id == "chatcmpl-" + rid
    found = requests.get(
        setup.url + "/qtrap/v1/requests", params={"client_request_id": "litellm-order-1"}, timeout=5
    ).json()["data"]
    assert [r["id"] for r in found] == [rid]


def test_stream_without_include_usage_gets_no_usage_chunk(setup: Setup) -> None:
    """Not asked for usage, a stream stays as the client expects it: its energy is in the record."""
    with (
        openai.OpenAI(base_url=setup.v1, api_key="x", max_retries=0) as client,
        client.chat.completions.with_streaming_response.create(
            model="qwen3-8b",
            messages=MSGS,  # type: ignore[arg-type]
            max_tokens=12,
            stream=True,
        ) as raw,
    ):
        rid = raw.headers["x-qtrap-request-id"]
        chunks = list(raw.parse())
    assert chunks and all(c.usage is None and c.choices for c in chunks)
    rec = requests.get(f"{setup.url}/qtrap/v1/requests/{rid}", timeout=5).json()
    assert rec["completion_tokens"] == 12


def test_no_meter_says_why_and_is_not_provisional(tmp_path: Path) -> None:
    port = free_port()
    with sim(port, "--model", "qwen3-8b", "--precision", "bf16", "--step-ms", "2"):
        cfg: dict[str, Any] = {"backends": [backend("sim-bf16", port, "bf16")]}
        with proxy(tmp_path, cfg):
            url = f"http://127.0.0.1:{cfg['server']['port']}/v1"
            r = requests.post(
                url + "/completions", json={"model": "qwen3-8b", "prompt": "x", "max_tokens": 3}, timeout=30
            )
            usage = r.json()["usage"]
            assert usage["completion_tokens"] == 3
            assert usage["energy_j"] is None
            assert usage["qtrap"]["provisional"] is False
            assert usage["qtrap"]["energy_unknown_reason"] == reasons.NO_METER
            assert "x-qtrap-energy-j-provisional" not in r.headers
