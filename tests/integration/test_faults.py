"""Error paths and faults: each gets the right status, OpenAI's error shape, and never a hang."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import orjson
import pytest
import requests

from tests.helpers import backend, free_port, proxy, running_requests, sim
from tests.integration import fake_backend
from tests.integration.fake_backend import FakeBackend


@dataclass
class Setup:
    url: str
    fake: FakeBackend
    sim_port: int


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp: Path = tmp_path_factory.mktemp("faults")
    fport, sport, dead = free_port(), free_port(), free_port()
    timeouts = {"connect_s": 2, "read_s": 1}
    with fake_backend.running(fport) as fake, sim(sport, "--step-ms", "10"):
        cfg = {
            "server": {"max_body_bytes": 4096},
            "backends": [
                # the fake backend picks its behaviour from the upstream model id
                *[
                    backend(
                        f"fake-{m}",
                        fport,
                        pool=m,
                        model=m,
                        kind="openai",
                        timeouts=timeouts,
                        health_path="/health",
                    )
                    for m in (
                        "echo",
                        "status:503",
                        "status:429",
                        "slow-headers",
                        "stream-die",
                        "stream-stall",
                        "stream-cut-event",
                    )
                ],
                # credentials in its URL: they must show nowhere (qtrap_proxy/redact.py)
                backend(
                    "dead",
                    dead,
                    pool="dead",
                    model="m",
                    timeouts=timeouts,
                    url=f"http://admin:s3cret@127.0.0.1:{dead}",
                ),
                backend(
                    "dead-exposed",
                    dead,
                    pool="dead-exposed",
                    model="m",
                    timeouts=timeouts,
                    expose_address=True,
                ),
                backend("sim", sport, pool="sim", model="qwen3-8b"),
            ],
        }
        with proxy(tmp, cfg):
            yield Setup(f"http://127.0.0.1:{cfg['server']['port']}", fake, sport)


def _post(s: Setup, body: object, path: str = "/v1/chat/completions", **kw: object) -> requests.Response:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return requests.post(
        s.url + path, data=data, headers={"content-type": "application/json"}, timeout=30, **kw
    )


def _msgs() -> list[dict[str, str]]:
    return [{"role": "user", "content": "hello"}]


def _assert_openai_error(r: requests.Response, status: int) -> dict[str, object]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert r.headers["x-qtrap-request-id"]
    return err  # type: ignore[no-any-return]


def test_unknown_fields_pass_through_and_body_relayed_unchanged(setup: Setup) -> None:
    body = {
        "model": "echo",
        "messages": _msgs(),
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        "logprobs": True,
        "top_logprobs": 2,
        "n": 2,
        "response_format": {"type": "json_object"},
        "seed": 42,
        "top_k": 5,
        "min_p": 0.1,
        "repetition_penalty": 1.1,
        "guided_choice": ["a", "b"],
        "priority": -1,
    }
    r = _post(setup, body)
    assert r.status_code == 200
    # byte for byte but for the usage object, which gains the energy (no meter here: null, and why)
    canned = fake_backend.CANNED
    u0 = canned.index(b'"usage": {') + len(b'"usage": ')
    u1 = canned.index(b"}", u0) + 1
    assert r.content[:u0] == canned[:u0] and r.content.endswith(canned[u1:])
    usage = r.json()["usage"]
    assert {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")} == orjson.loads(
        canned[u0:u1]
    )
    assert usage["energy_j"] is None and usage["qtrap"]["request_id"] == r.headers["x-qtrap-request-id"]
    assert setup.fake.received[-1] == body  # model id unchanged here (upstream id == pool name)
    assert setup.fake.headers[-1]["x-request-id"] == r.headers["x-qtrap-request-id"]
    assert r.headers["x-qtrap-backend"] == "fake-echo"

    r = _post(setup, {**body, "stream": True, "stream_options": {"include_usage": False, "x_extra": 1}})
    sent = setup.fake.received[-1]
    assert sent["stream_options"] == {"include_usage": True, "x_extra": 1}  # openai kind: no continuous stats
    assert {k: v for k, v in sent.items() if k != "stream_options"} == {k: v for k, v in body.items()} | {
        "stream": True
    }


def test_malformed_json_400(setup: Setup) -> None:
    err = _assert_openai_error(_post(setup, b"{not json"), 400)
    assert err["type"] == "invalid_request_error"
    _assert_openai_error(_post(setup, b"[1, 2]"), 400)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "echo"}, "messages"),
        ({"model": "echo", "messages": "hi"}, "messages"),
        ({"model": "echo", "messages": _msgs(), "stream": "yes"}, "stream"),
        ({"model": "echo", "messages": _msgs(), "stream": True, "stream_options": 3}, "stream_options"),
    ],
)
def test_missing_or_bad_fields_400(setup: Setup, body: dict[str, object], param: str) -> None:
    assert _assert_openai_error(_post(setup, body), 400)["param"] == param


def test_completions_needs_prompt(setup: Setup) -> None:
    assert _assert_openai_error(_post(setup, {"model": "sim"}, "/v1/completions"), 400)["param"] == "prompt"


def test_bad_hop_header_400(setup: Setup) -> None:
    r = requests.post(
        setup.url + "/v1/chat/completions",
        json={"model": "echo", "messages": _msgs()},
        headers={"x-qtrap-hop": "zero"},
        timeout=10,
    )
    assert _assert_openai_error(r, 400)["param"] == "x-qtrap-hop"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("x-qtrap-chain-id", b"caf\xc3\xa9"),
        ("x-qtrap-model", b"\xff"),
        ("x-qtrap-precision", b"int\t4"),
        ("x-qtrap-hop", str(10**30).encode()),
        ("x-qtrap-hop", b"-3"),
        ("x-qtrap-hop", b"\xb2"),  # a superscript two: str.isdigit() says yes, int() raised (a 500)
        ("x-qtrap-hop-split", b"lin\xe9s"),
    ],
)
def test_odd_or_out_of_range_qtrap_headers_400(setup: Setup, name: str, value: bytes) -> None:
    """Through the proxy's default HTTP parser (httptools), which passes these bytes on."""
    r = requests.post(
        setup.url + "/v1/chat/completions",
        json={"model": "echo", "messages": _msgs(), "stream": True},
        headers={name: value},
        timeout=10,
    )
    assert _assert_openai_error(r, 400)["param"] == name


def test_unknown_model_or_precision_404(setup: Setup) -> None:
    assert (
        _assert_openai_error(_post(setup, {"model": "nope", "messages": _msgs()}), 404)["code"]
        == "model_not_found"
    )
    err = _assert_openai_error(_post(setup, {"model": "sim@int3", "messages": _msgs()}), 404)
    assert err["code"] == "precision_not_found"


def test_body_too_large_413(setup: Setup) -> None:
    big = {"model": "echo", "messages": [{"role": "user", "content": "x" * 5000}]}
    assert _assert_openai_error(_post(setup, big), 413)["code"] == "request_too_large"
    # chunked upload without a Content-Length is cut off as it arrives
    payload = orjson.dumps(big)
    r = requests.post(
        setup.url + "/v1/chat/completions",
        data=iter([payload[:3000], payload[3000:]]),
        headers={"content-type": "application/json"},
        timeout=10,
    )
    _assert_openai_error(r, 413)
    # the proxy still serves normally afterwards
    assert _post(setup, {"model": "echo", "messages": _msgs()}).status_code == 200


def test_unreachable_backend_502(setup: Setup) -> None:
    err = _assert_openai_error(_post(setup, {"model": "dead", "messages": _msgs()}), 502)
    assert err["code"] == "upstream_unreachable"
    # the backend by name; not its address (aiohttp's error spells it out) nor its credentials
    msg = str(err["message"])
    assert "backend dead is unreachable" in msg and "<address>" in msg
    assert "127.0.0.1" not in msg and "s3cret" not in msg and "admin" not in msg
    # a backend configured with expose_address: true names where it failed
    err = _assert_openai_error(_post(setup, {"model": "dead-exposed", "messages": _msgs()}), 502)
    assert "127.0.0.1" in str(err["message"])


def test_no_credentials_in_health_or_energy(setup: Setup) -> None:
    health = requests.get(setup.url + "/health", timeout=10)
    assert "s3cret" not in health.text and "admin" not in health.text
    dead = next(b for b in health.json()["backends"] if b["name"] == "dead")
    assert dead["url"].startswith("http://***@127.0.0.1:") and not dead["ok"]
    assert "127.0.0.1" not in (dead["error"] or "")
    assert "s3cret" not in requests.get(setup.url + "/qtrap/v1/energy", timeout=10).text


def test_upstream_timeout_504(setup: Setup) -> None:
    t0 = time.monotonic()
    err = _assert_openai_error(_post(setup, {"model": "slow-headers", "messages": _msgs()}), 504)
    assert err["code"] == "upstream_timeout"
    assert time.monotonic() - t0 < 4.5  # the 1 s read timeout fired, not the backend's 5 s answer


@pytest.mark.parametrize("code", [503, 429])
def test_upstream_status_passed_through_with_body(setup: Setup, code: int) -> None:
    r = _post(setup, {"model": f"status:{code}", "messages": _msgs()})
    assert r.status_code == code
    assert r.json() == {"error": {"message": f"backend says {code}", "code": code}}
    assert r.headers["x-qtrap-backend"] == f"fake-status:{code}"


def _sse_events(r: requests.Response) -> list[bytes]:
    return [e for e in r.content.split(b"\n\n") if e]


@pytest.mark.parametrize("mode", ["stream-die", "stream-cut-event", "stream-stall"])
def test_backend_failing_mid_stream_ends_stream_with_error_and_done(setup: Setup, mode: str) -> None:
    r = _post(setup, {"model": mode, "messages": _msgs(), "stream": True})
    assert r.status_code == 200
    events = _sse_events(r)
    assert events[0].startswith(b"data: {") and b" t1" in events[0]
    assert events[-1] == b"data: [DONE]"
    err = orjson.loads(events[-2][6:])["error"]
    assert err["type"] == "upstream_error" and err["message"]
    rid = r.headers["x-qtrap-request-id"]
    rec = requests.get(f"{setup.url}/qtrap/v1/requests/{rid}", timeout=5).json()
    assert rec["status"] == ("upstream_timeout" if mode == "stream-stall" else "stream_broken")


def test_openai_sdk_raises_on_mid_stream_failure(setup: Setup) -> None:
    client = openai.OpenAI(base_url=setup.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIError, match="mid-stream"):
        for _ in client.chat.completions.create(
            model="stream-die",
            messages=_msgs(),  # type: ignore[arg-type]
            stream=True,
        ):
            pass


def test_client_disconnect_cancels_upstream(setup: Setup) -> None:
    """Closing the client connection makes the backend stop generating (its running count falls)."""
    body = orjson.dumps({"model": "sim", "messages": _msgs(), "stream": True, "max_tokens": 5000})
    for stream in (True, False):
        if not stream:
            body = body.replace(b'"stream":true', b'"stream":false')
        sock = socket.create_connection(("127.0.0.1", int(setup.url.rsplit(":", 1)[1])))
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        deadline = time.monotonic() + 10
        while running_requests(setup.sim_port) < 1:
            assert time.monotonic() < deadline, "request never reached the backend"
            time.sleep(0.02)
        if stream:
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.close()
        # 5000 tokens at 10 ms a step would run for 50 s: the count must fall long before that
        deadline = time.monotonic() + 5
        while running_requests(setup.sim_port) > 0:
            assert time.monotonic() < deadline, f"backend still generating after disconnect (stream={stream})"
            time.sleep(0.02)
    metrics = requests.get(setup.url + "/metrics", timeout=5).text
    assert 'status="client_disconnected"' in metrics


def test_health_503_when_a_pool_has_no_healthy_backend(setup: Setup) -> None:
    r = requests.get(setup.url + "/health", timeout=10)
    body = r.json()
    assert r.status_code == 503 and body["status"] == "down" and body["pools"]["dead"] is False
    dead = next(b for b in body["backends"] if b["name"] == "dead")
    assert dead["ok"] is False and dead["error"]
    assert body["pools"]["sim"] is True
    metrics = requests.get(setup.url + "/metrics", timeout=5).text
    assert (
        'qtrap_backend_up{backend="dead"} 0.0' in metrics and 'qtrap_backend_up{backend="sim"} 1.0' in metrics
    )


def test_unknown_route_and_wrong_method_get_openai_errors(setup: Setup) -> None:
    r = requests.get(setup.url + "/v1/nothing", timeout=5)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = requests.get(setup.url + "/v1/chat/completions", timeout=5)
    assert r.status_code == 405 and r.json()["error"]["message"] and r.headers["allow"] == "POST"
    r = requests.post(setup.url + "/health", timeout=5)
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"GET", "HEAD"}
    r = requests.get(setup.url + "/qtrap/v1/requests/does-not-exist", timeout=5)
    assert r.status_code == 404 and "does-not-exist" in r.json()["error"]["message"]


def _disconnect_count(s: Setup) -> float:
    text = requests.get(s.url + "/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("qtrap_requests_total{") and 'status="client_disconnected"' in line
    )


def test_client_gone_while_sending_body(setup: Setup) -> None:
    before = _disconnect_count(setup)
    sock = socket.create_connection(("127.0.0.1", int(setup.url.rsplit(":", 1)[1])))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"model": "echo"'
    )
    time.sleep(0.2)
    sock.close()
    deadline = time.monotonic() + 5
    while _disconnect_count(setup) < before + 1:
        assert time.monotonic() < deadline, "the half-sent request was not accounted as a disconnect"
        time.sleep(0.05)
    assert _post(setup, {"model": "echo", "messages": _msgs()}).status_code == 200
