"""The admin API's client (qtrap_client) against a real proxy process with auth on, in front of a simulated
vLLM backend metered through its DCGM counter: records, final figures, chains, the records query, usage
and the errors, async and sync."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest
import requests
from aiohttp import web

from qtrap_client import (
    BadRequest,
    FinalTimeout,
    Forbidden,
    NotFound,
    ProtocolError,
    ProxyUnreachable,
    QtrapClient,
    QtrapSyncClient,
    Unauthorized,
)
from qtrap_proxy.energy import reasons
from qtrap_proxy.keystore import KeyStore
from tests.helpers import backend, free_port, proxy, sim, wait_meter

ADMIN = "qa-" + "c" * 40
INTENSITY, PUE, PRICE = 400.0, 1.25, 0.3  # gCO2e/kWh, facility/IT, EUR/kWh


@dataclass
class Stack:
    url: str
    alice: str  # a client key's secret
    alice_id: str
    bob: str
    bob_id: str

    def chat(self, secret: str, model: str = "qwen3-8b", max_tokens: int = 5, **headers: str) -> str:
        with openai.OpenAI(base_url=self.url + "/v1", api_key=secret, max_retries=0) as c:
            raw = c.chat.completions.with_raw_response.create(
                model=model,
                messages=[{"role": "user", "content": "one two three"}],
                max_tokens=max_tokens,
                extra_headers=headers,
            )
        raw.parse()
        return str(raw.headers["x-qtrap-request-id"])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("client")
    port = free_port()
    store = KeyStore(str(tmp / "keys.sqlite"))
    (alice, alice_secret), (bob, bob_secret) = store.create("alice"), store.create("bob")
    with sim(port, "--model", "qwen3-8b", "--step-ms", "2", "--precision", "bf16"):
        cfg: dict[str, Any] = {
            "backends": [backend("sim-bf16", port, "bf16", devices=[{"host": "qtrap-sim", "index": 0}])],
            "meter": {"kind": "dcgm", "urls": [f"http://127.0.0.1:{port}/dcgm/metrics"], "settle_s": 0.3},
            "auth": {
                "enabled": True,
                "keys_path": str(tmp / "keys.sqlite"),
                "admin_key_sha256": hashlib.sha256(ADMIN.encode()).hexdigest(),
                "refresh_s": 0.5,
            },
            "carbon": {"intensity_g_per_kwh": INTENSITY, "pue": PUE},
            "pricing": {"price_per_kwh": PRICE, "currency": "EUR"},
        }
        with proxy(tmp, cfg):
            url = f"http://127.0.0.1:{cfg['server']['port']}"
            wait_meter(url, headers={"Authorization": f"Bearer {ADMIN}"})
            yield Stack(url, alice_secret, alice.id, bob_secret, bob.id)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_wait_final_returns_the_settled_record_and_times_out_with_the_provisional_one(stack: Stack) -> None:
    async def go() -> tuple[Any, Any, Any]:
        async with QtrapClient(stack.url, api_key=ADMIN) as q:
            with (
                openai.OpenAI(base_url=stack.url + "/v1", api_key=stack.alice, max_retries=0) as c,
                c.chat.completions.with_streaming_response.create(
                    model="qwen3-8b",
                    messages=[{"role": "user", "content": "count"}],
                    max_tokens=400,
                    stream=True,
                ) as resp,
            ):
                rid = resp.headers["x-qtrap-request-id"]
                lines = resp.iter_lines()
                next(lines)  # in flight
                with pytest.raises(FinalTimeout) as timeout:
                    await q.wait_final(rid, timeout_s=0.0)  # one read: in flight, provisional
                assert sum(1 for _ in lines) > 100
            final = await q.wait_final(rid, timeout_s=30)
            again = await q.request(rid)
            return timeout.value, final, again

    timeout, final, again = run(go())
    assert isinstance(timeout, TimeoutError) and timeout.record is not None
    assert timeout.record["final"] is False and timeout.record["status"] == "in_flight"
    assert final["id"] == timeout.record["id"] and final["final"] is True and final["provisional"] is False
    assert final["status"] == "ok" and final["energy_j"] > 0 and final["key_id"] == stack.alice_id
    assert final["completion_tokens"] == 400
    assert again == final  # a final record does not change
    # carbon and cost: from the final energy only, GPU energy x PUE x intensity (price)
    assert timeout.record["co2e_g"] is None and timeout.record["co2e_null_reason"] == reasons.NOT_FINAL_YET
    kwh = final["energy_j"] / 3.6e6 * PUE
    assert final["co2e_g"] == pytest.approx(kwh * INTENSITY, rel=1e-12) and final["co2e_null_reason"] is None
    assert final["cost"] == pytest.approx(kwh * PRICE, rel=1e-12) and final["cost_currency"] == "EUR"
    assert (final["carbon_intensity_g_per_kwh"], final["pue"]) == (INTENSITY, PUE)


def test_a_chain_is_read_across_pages_and_waited_for(stack: Stack) -> None:
    chain = f"chain-{uuid.uuid4()}"
    ids = [stack.chat(stack.alice, **{"x-qtrap-chain-id": chain, "x-qtrap-hop": str(h)}) for h in (1, 2, 3)]

    async def go() -> tuple[Any, Any, Any]:
        async with QtrapClient(stack.url, api_key=stack.alice) as q:
            done = await q.wait_chain_final(chain, timeout_s=30)
            paged = await q.chain(chain, page_size=2)
            first = await q.chain_page(chain, 0, 2)
            return done, paged, first

    done, paged, first = run(go())
    assert [r["id"] for r in done["records"]] == ids and done["final"] is True
    assert done["energy_j"] == pytest.approx(sum(r["energy_j"] for r in done["records"]))
    assert first["next_offset"] == 2 and len(first["records"]) == 2  # the proxy pages it
    assert [r["id"] for r in paged["records"]] == ids and [h["index"] for h in paged["hops"]] == [1, 2, 3]
    assert "next_offset" not in paged and paged["energy_j"] == done["energy_j"]


def test_a_time_range_pages_and_sums_as_the_records_say(stack: Stack) -> None:
    since = time.time()
    ids = {stack.chat(stack.bob) for _ in range(5)}

    async def go() -> tuple[list[Any], Any, Any]:
        async with QtrapClient(stack.url, api_key=ADMIN) as q:
            for rid in ids:
                await q.wait_final(rid, timeout_s=30)
            recs = [r async for r in q.iter_requests(since=since, key=stack.bob_id, final=True, page_size=2)]
            first = await q.requests(since=since, key=stack.bob_id, limit=2)
            usage = await q.usage(group_by=["key", "precision"], since=since, key=stack.bob_id)
            return recs, first, usage

    recs, first, usage = run(go())
    assert {r["id"] for r in recs} == ids and len(recs) == 5
    assert [r["start_unix_s"] for r in recs] == sorted(r["start_unix_s"] for r in recs)  # oldest first
    assert first["has_more"] is True and first["next_cursor"] and len(first["data"]) == 2
    [group] = usage["groups"]
    assert group["key"] == stack.bob_id and group["precision"] == "bf16" and group["requests"] == 5
    assert group["energy_j"] == pytest.approx(sum(r["energy_j"] for r in recs))
    assert usage["total"]["completion_tokens"] == sum(r["completion_tokens"] for r in recs)
    assert group["co2e_g"] == pytest.approx(sum(r["co2e_g"] for r in recs))
    assert group["cost"] == pytest.approx(sum(r["cost"] for r in recs)) and group["cost_currency"] == "EUR"
    assert group["co2e_unknown_requests"] == group["cost_unknown_requests"] == 0


def test_metrics_total_the_final_records_co2e_and_cost(stack: Stack) -> None:
    rid = stack.chat(stack.alice)

    async def go() -> tuple[Any, Any]:
        async with QtrapClient(stack.url, api_key=ADMIN) as q:
            await q.wait_final(rid, timeout_s=30)
            for _ in range(300):  # every request the other tests sent is final too
                usage = await q.usage()
                if not usage["not_final_requests"]:
                    break
                await asyncio.sleep(0.05)
            return usage, await q.energy()

    usage, energy = run(go())
    text = requests.get(stack.url + "/metrics", timeout=10).text
    co2e = sum(float(v) for _, v in _samples(text, "qtrap_co2e_grams_total"))
    cost = _samples(text, "qtrap_energy_cost_total")
    assert usage["total"]["co2e_g"] > 0 and co2e == pytest.approx(usage["total"]["co2e_g"], rel=1e-9)
    assert {labels.split('currency="')[1].split('"')[0] for labels, _ in cost} == {"EUR"}
    assert sum(float(v) for _, v in cost) == pytest.approx(usage["total"]["cost"], rel=1e-9)
    assert energy["carbon"]["source"] == "constant" and energy["carbon"]["intensity_g_per_kwh"] == INTENSITY


def _samples(text: str, name: str) -> list[tuple[str, str]]:
    out = []
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line.rsplit(" ", 1)
            out.append((labels, value))
    return out


def test_errors_are_the_clients_own_and_keys_see_their_own(stack: Stack) -> None:
    async def go() -> None:
        async with QtrapClient(stack.url, api_key=ADMIN) as q:
            with pytest.raises(NotFound) as nf:
                await q.request("no-such-request")
            assert nf.value.status == 404 and nf.value.type == "not_found_error"
            with pytest.raises(NotFound):
                await q.wait_final("no-such-request", timeout_s=5)  # at once, not after 5 s
            with pytest.raises(BadRequest) as bad:
                await q.requests(since=2_000_000_000, until=1_000_000_000)
            assert bad.value.param == "since"
        async with QtrapClient(stack.url) as anonymous:
            with pytest.raises(Unauthorized):
                await anonymous.usage()
        async with QtrapClient(stack.url, api_key=stack.alice) as alice:
            with pytest.raises(Forbidden):
                await alice.energy()  # an admin route
            with pytest.raises(Forbidden) as other:
                await alice.usage(key=stack.bob_id)
            assert other.value.param == "key"
            page = await alice.requests(limit=1000)
            assert page["data"] and {r["key_id"] for r in page["data"]} == {stack.alice_id}
        async with QtrapClient(f"http://127.0.0.1:{free_port()}", timeout_s=2) as nobody:
            with pytest.raises(ProxyUnreachable):
                await nobody.models()

    t = time.monotonic()
    run(go())
    assert time.monotonic() - t < 5


def test_an_answer_of_another_shape_is_a_protocol_error() -> None:
    async def go() -> None:
        async def record(_: web.Request) -> web.Response:
            return web.json_response({"id": 1})

        async def usage(_: web.Request) -> web.Response:
            return web.Response(text="not json")

        app = web.Application()
        app.router.add_get("/qtrap/v1/requests/{id}", record)
        app.router.add_get("/qtrap/v1/usage", usage)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            async with QtrapClient(f"http://127.0.0.1:{port}") as q:
                with pytest.raises(ProtocolError, match="not the admin API's shape"):
                    await q.request("r1")
                with pytest.raises(ProtocolError, match="without a JSON body"):
                    await q.usage()
        finally:
            await runner.cleanup()

    run(go())


def test_the_sync_client_answers_as_the_async_one(stack: Stack) -> None:
    rid = stack.chat(stack.alice)
    with QtrapSyncClient(stack.url, api_key=ADMIN) as q:
        rec = q.wait_final(rid, timeout_s=30)
        assert rec["final"] is True and q.request(rid) == rec
        assert rid in {r["id"] for r in q.iter_requests(since=rec["start_unix_s"], page_size=1)}
        assert q.usage(since=rec["start_unix_s"])["total"]["requests"] >= 1
        assert "qwen3-8b@bf16" in q.models()
