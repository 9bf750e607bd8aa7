"""TGI's own text-generation client against the proxy's native TGI routes (qtrap_sim speaks TGI's API)."""

from __future__ import annotations

import pytest
import requests
from text_generation import Client
from text_generation.errors import BadRequestError, NotFoundError, ValidationError

from tests.conftest import Fleet


def test_generate_and_stream(fleet: Fleet) -> None:
    client = Client(fleet.proxy_url, timeout=30)
    resp = client.generate("What is two plus two?", max_new_tokens=9)
    assert resp.details.generated_tokens == 9 and resp.generated_text.strip()

    tokens = list(client.generate_stream("Count to ten", max_new_tokens=6))
    assert len(tokens) == 6 and all(t.token.text for t in tokens)
    assert tokens[-1].generated_text == "".join(t.token.text for t in tokens)
    assert tokens[-1].details is not None and tokens[-1].details.generated_tokens == 6


def test_native_routes_and_accounting(fleet: Fleet) -> None:
    r = requests.post(
        fleet.proxy_url + "/generate",
        json={"inputs": "a b c", "parameters": {"max_new_tokens": 4}},
        timeout=30,
    )
    assert r.status_code == 200 and r.headers["x-qtrap-backend"] == "sim-tgi-int8"
    assert r.headers["x-generated-tokens"] == "4"  # TGI's own headers are relayed
    rec = requests.get(
        f"{fleet.proxy_url}/qtrap/v1/requests/{r.headers['x-qtrap-request-id']}", timeout=5
    ).json()
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["route"]) == (3, 4, "tgi_generate")

    with requests.post(
        fleet.proxy_url + "/generate_stream",
        json={"inputs": "x", "parameters": {"max_new_tokens": 5}},
        stream=True,
        timeout=30,
    ) as r:
        events = [ln for ln in r.iter_lines() if ln]
        rid = r.headers["x-qtrap-request-id"]
    assert len(events) == 5
    rec = requests.get(f"{fleet.proxy_url}/qtrap/v1/requests/{rid}", timeout=5).json()
    assert rec["completion_tokens"] == 5 and sum(rec["timeline"]["tokens"]) == 5


def test_tgi_errors(fleet: Fleet) -> None:
    # the backend's own validation error (422) is relayed and parsed by the client
    with pytest.raises(ValidationError, match="max_new_tokens"):
        Client(fleet.proxy_url).generate("x", max_new_tokens=10**6)
    # a pool or precision the proxy does not serve
    with pytest.raises(NotFoundError):
        Client(fleet.proxy_url, headers={"x-qtrap-model": "llama"}).generate("x")
    # precision served only by vLLM backends: no TGI backend to take the native request
    with pytest.raises(NotFoundError, match="no backend of kind tgi"):
        Client(fleet.proxy_url, headers={"x-qtrap-precision": "bf16"}).generate("x")
    r = requests.post(fleet.proxy_url + "/generate", data=b"{oops", timeout=10)
    assert r.status_code == 400 and r.json()["error_type"] == "invalid_request_error"
    r = requests.post(fleet.proxy_url + "/generate", json={"inputs": ""}, timeout=10)
    assert r.status_code == 400 and "inputs" in r.json()["error"]
    with pytest.raises(BadRequestError, match="x-qtrap-hop"):
        Client(fleet.proxy_url, headers={"x-qtrap-hop": "-1"}).generate("x")
