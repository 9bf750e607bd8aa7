"""The records query, usage sums and the client's X-Request-Id end to end (issue 17): a real proxy process in
front of two simulated vLLM backends metered through their DCGM counters, driven with the openai SDK."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from tests.helpers import backend, free_port, proxy, sim, wait_meter


@dataclass
class Stack:
    url: str
    sims: dict[str, str]  # precision -> the simulator's URL
    ledger: Path

    def get(self, path: str, **params: Any) -> requests.Response:
        return requests.get(self.url + path, params=params, timeout=10)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("records")
    p16, p4 = free_port(), free_port()
    common = ["--model", "qwen3-8b", "--step-ms", "2"]
    with (
        sim(p16, *common, "--precision", "bf16", "--gpu-index", "0"),
        sim(p4, *common, "--precision", "int4", "--gpu-index", "1"),
    ):
        cfg: dict[str, Any] = {
            "backends": [
                backend("sim-bf16", p16, "bf16", devices=[{"host": "qtrap-sim", "index": 0}]),
                backend("sim-int4", p4, "int4", devices=[{"host": "qtrap-sim", "index": 1}]),
            ],
            "pools": {"qwen3-8b": {"default_precision": "bf16"}},
            "meter": {
                "kind": "dcgm",
                "urls": [f"http://127.0.0.1:{p}/dcgm/metrics" for p in (p16, p4)],
                "settle_s": 0.3,
            },
        }
        with proxy(tmp, cfg):
            port = cfg["server"]["port"]
            url = f"http://127.0.0.1:{port}"
            wait_meter(url)
            yield Stack(
                url,
                {"bf16": f"http://127.0.0.1:{p16}", "int4": f"http://127.0.0.1:{p4}"},
                Path(cfg["ledger"]["path"]),
            )


def _chat(s: Stack, model: str = "qwen3-8b", **headers: str) -> tuple[str, dict[str, str]]:
    with s.client() as client:
        raw = client.chat.completions.with_raw_response.create(
            model=model,
            messages=[{"role": "user", "content": "one two three"}],
            max_tokens=5,
            extra_headers=headers,
        )
    raw.parse()
    return raw.headers["x-qtrap-request-id"], dict(raw.headers)


def _until(s: Stack, what: str, cond: Any, **params: Any) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    while True:
        page: dict[str, Any] = s.get("/qtrap/v1/requests", **params).json()
        if cond(page):
            return page
        assert time.monotonic() < deadline, f"{what}: {page}"
        time.sleep(0.05)


def test_a_client_request_id_is_recorded_echoed_and_found_while_the_backend_gets_the_proxys_id(
    stack: Stack,
) -> None:
    mine = f"client-{uuid.uuid4()}"
    rid, headers = _chat(stack, **{"X-Request-Id": mine})
    assert headers["x-request-id"] == mine and headers["x-qtrap-request-id"] == rid
    # the backend saw the proxy's id, not the client's (its ground truth is keyed by X-Request-Id)
    assert requests.get(f"{stack.sims['bf16']}/sim/v1/requests/{rid}", timeout=5).status_code == 200
    assert requests.get(f"{stack.sims['bf16']}/sim/v1/requests/{mine}", timeout=5).status_code == 404

    page = _until(stack, "never final", lambda p: p["data"] and p["data"][0]["final"], client_request_id=mine)
    assert [r["id"] for r in page["data"]] == [rid] and not page["has_more"] and page["next_cursor"] is None
    rec = page["data"][0]
    assert rec["client_request_id"] == mine and rec["status"] == "ok" and rec["energy_j"] > 0
    assert stack.get(f"/qtrap/v1/requests/{rid}").json() == rec  # the same record shape as by id

    # no X-Request-Id: the answer's x-request-id is the proxy's id; an invalid one is ignored, not refused
    rid2, headers2 = _chat(stack)
    assert headers2["x-request-id"] == rid2
    rid3, headers3 = _chat(stack, **{"X-Request-Id": "x" * 129})
    assert headers3["x-request-id"] == rid3
    assert stack.get(f"/qtrap/v1/requests/{rid3}").json()["client_request_id"] is None
    assert stack.get("/qtrap/v1/requests", client_request_id="x" * 129).status_code == 400


def test_a_request_in_flight_is_listed_not_final_then_final(stack: Stack) -> None:
    mine = f"stream-{uuid.uuid4()}"
    with (
        stack.client() as client,
        client.chat.completions.with_streaming_response.create(
            model="qwen3-8b@int4",
            messages=[{"role": "user", "content": "count"}],
            max_tokens=400,
            stream=True,
            extra_headers={"X-Request-Id": mine, "x-qtrap-chain-id": "records-chain"},
        ) as resp,
    ):
        rid = resp.headers["x-qtrap-request-id"]
        assert resp.headers["x-request-id"] == mine
        chunks = resp.iter_lines()
        next(chunks)  # the stream has started: the request is in flight
        page = stack.get("/qtrap/v1/requests", client_request_id=mine, final="false").json()
        assert [(r["id"], r["final"], r["status"]) for r in page["data"]] == [(rid, False, "in_flight")]
        assert stack.get("/qtrap/v1/requests", client_request_id=mine, final="true").json()["data"] == []
        assert sum(1 for _ in chunks) > 100
    page = _until(
        stack,
        "never final",
        lambda p: bool(p["data"]),
        client_request_id=mine,
        final="true",
        precision="int4",
    )
    assert page["data"][0]["id"] == rid and page["data"][0]["chain_id"] == "records-chain"
    assert stack.get("/qtrap/v1/requests", client_request_id=mine, final="false").json()["data"] == []


def test_pages_by_cursor_cover_every_record_once_newest_first_and_oldest_first(stack: Stack) -> None:
    since = time.time()
    tag = f"page-{uuid.uuid4()}"
    ids = [_chat(stack, **{"x-qtrap-chain-id": tag})[0] for _ in range(7)]
    _until(stack, "not final", lambda p: len(p["data"]) == 7, chain_id=tag, final="true")
    for order in ("desc", "asc"):
        seen: list[str] = []
        params: dict[str, Any] = {"chain_id": tag, "since": since, "limit": 3, "order": order}
        while True:
            page = stack.get("/qtrap/v1/requests", **params).json()
            seen += [r["id"] for r in page["data"]]
            if page["next_cursor"] is None:
                break
            if len(seen) == 3:  # requests that start while paging come later (asc) or not at all (desc)
                _chat(stack, **{"x-qtrap-chain-id": tag + "-other"})
            params["cursor"] = page["next_cursor"]
        assert seen == (ids[::-1] if order == "desc" else ids), order
    # a cursor with other filters is refused, in OpenAI's error shape
    first = stack.get("/qtrap/v1/requests", chain_id=tag, limit=3).json()
    bad = stack.get("/qtrap/v1/requests", chain_id=tag, limit=3, order="asc", cursor=first["next_cursor"])
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "cursor"


def test_usage_sums_by_precision_and_status_with_unknown_energy_null(stack: Stack) -> None:
    since = time.time()
    tag = f"usage-{uuid.uuid4()}"
    for model in ("qwen3-8b@bf16", "qwen3-8b@int4", "qwen3-8b@int4"):
        _chat(stack, model, **{"x-qtrap-chain-id": tag})
    with stack.client() as client, pytest.raises(openai.NotFoundError):  # rejected: its energy is unknown
        client.chat.completions.create(
            model="qwen3-8b@fp8",
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"x-qtrap-chain-id": tag},
        )
    _until(stack, "not final", lambda p: len(p["data"]) == 4, chain_id=tag, final="true")
    rep = stack.get("/qtrap/v1/usage", group_by="precision,status", chain_id=tag, since=since).json()
    groups = {(g["precision"], g["status"]): g for g in rep["groups"]}
    assert set(groups) == {("bf16", "ok"), ("int4", "ok"), (None, "not_found")}
    assert groups[("int4", "ok")]["requests"] == 2 and groups[("int4", "ok")]["completion_tokens"] == 10
    assert groups[("bf16", "ok")]["energy_j"] > 0 and groups[("bf16", "ok")]["energy_unknown_requests"] == 0
    rejected = groups[(None, "not_found")]
    assert (
        rejected["requests"] == 1
        and rejected["energy_j"] is None
        and rejected["energy_unknown_requests"] == 1
    )
    total = rep["total"]
    assert total["requests"] == 4 and total["energy_unknown_requests"] == 1
    assert total["energy_j"] == pytest.approx(sum(g["energy_j"] or 0 for g in rep["groups"]))
    assert rep["not_final_requests"] == 0 and rep["truncated"] is False
    bad = stack.get("/qtrap/v1/usage", group_by="chain")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "group_by"


def test_bad_parameters_are_400s_in_openais_shape(stack: Stack) -> None:
    for params, param in (
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"since": "last week"}, "since"),
        ({"status": "great"}, "status"),
        ({"final": "maybe"}, "final"),
        ({"order": "random"}, "order"),
        ({"cursor": "abc"}, "cursor"),
        ({"key": "bob"}, "key"),
        ({"precison": "int4"}, "precison"),
    ):
        r = stack.get("/qtrap/v1/requests", **params)
        assert r.status_code == 400, params
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == param, (params, err)
