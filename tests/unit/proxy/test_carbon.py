"""Carbon and cost (carbon.py): intensity series from files and answers, the intensity at a request's
time, CO2e and cost from the final energy and the PUE, unknown figures null with the reason; the ledger's
columns (added to older ledgers) and the usage sums over them."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from qtrap_proxy.carbon import J_PER_KWH, Carbon, parse_series
from qtrap_proxy.config import CarbonConfig, PricingConfig, load_config
from qtrap_proxy.energy import reasons
from qtrap_proxy.errors import ConfigError
from qtrap_proxy.ledger import Ledger
from qtrap_proxy.query import RecordFilter
from tests.helpers import ONE_BACKEND
from tests.unit.proxy.test_records_query import _Durable, _rec, _store, _write


def test_series_parse_from_csv_with_a_header_and_json_of_either_shape() -> None:
    csv = "timestamp,g_per_kwh\n2026-12-01T01:00:00Z,300\n1796083200,250.5\n# a comment\n"
    assert parse_series(csv) == [(1796083200.0, 250.5), (1796083200.0 + 3600, 300.0)]
    js = '[{"timestamp": "2026-12-01T02:00:00+01:00", "g_per_kwh": 10}, [5, 20]]'
    assert parse_series(js) == [(5.0, 20.0), (1796086800.0, 10.0)]
    em = '{"carbonIntensity": 123, "datetime": "2026-12-01T00:00:00.000Z"}'  # Electricity Maps' answer
    assert parse_series(em) == [(1796083200.0, 123.0)]
    assert parse_series("42", now=7.0) == [(7.0, 42.0)]  # a bare number: the time it was read
    assert parse_series('{"g_per_kwh": 9}', now=8.0) == [(8.0, 9.0)]
    for bad, where in [("t,g\n1,2\n3,-1\n", "line 3"), ('[{"g_per_kwh": 1}]', "point 0"), ("", "empty")]:
        with pytest.raises(ValueError, match=where):
            parse_series(bad)


def test_the_intensity_at_a_time_is_the_last_point_before_it_if_not_too_old(tmp_path: Path) -> None:
    f = tmp_path / "grid.csv"
    f.write_text("100,400\n200,100\n")
    c = Carbon(CarbonConfig(file=str(f), max_age_s=50), PricingConfig())
    assert c.intensity_at(99.0) == (None, reasons.CARBON_BEFORE_SERIES)
    assert c.intensity_at(100.0) == (400.0, None)
    assert c.intensity_at(149.0) == (400.0, None)
    g, why = c.intensity_at(151.0)  # 51 s after the point: stale, not carried on for ever
    assert g is None and why is not None and "51 s old" in why
    assert c.intensity_at(200.5) == (100.0, None)
    assert Carbon(CarbonConfig(), PricingConfig()).intensity_at(1.0) == (None, reasons.CARBON_OFF)
    f.write_text("not,a,series\n1,x\n")
    with pytest.raises(ConfigError, match=r"carbon\.file"):
        Carbon(CarbonConfig(file=str(f)), PricingConfig())


def test_footprint_is_kwh_times_pue_times_intensity_and_price_and_unknown_is_null_with_a_reason() -> None:
    c = Carbon(
        CarbonConfig(intensity_g_per_kwh=400, pue=1.2), PricingConfig(price_per_kwh=0.3, currency="EUR")
    )
    fp = c.footprint(36_000.0, None, 0.0)  # 0.01 kWh of GPU energy, 0.012 kWh with the PUE
    assert fp.co2e_g == pytest.approx(0.012 * 400) and fp.cost == pytest.approx(0.012 * 0.3)
    assert (fp.co2e_null_reason, fp.cost_null_reason, fp.cost_currency, fp.pue) == (None, None, "EUR", 1.2)
    unknown = c.footprint(None, "meter down for h:0: x", 0.0)
    assert unknown.co2e_g is None and unknown.cost is None
    assert unknown.co2e_null_reason == unknown.cost_null_reason == "energy unknown: meter down for h:0: x"
    off = Carbon(CarbonConfig(), PricingConfig()).footprint(J_PER_KWH, None, 0.0)
    assert off.co2e_g is None and off.co2e_null_reason == reasons.CARBON_OFF
    assert off.cost is None and off.cost_null_reason == reasons.PRICING_OFF and off.cost_currency is None
    zero = Carbon(CarbonConfig(intensity_g_per_kwh=0), PricingConfig(price_per_kwh=0)).footprint(
        5.0, None, 0.0
    )
    assert zero.co2e_g == 0.0 and zero.cost == 0.0  # a real zero stays a number


def test_config_takes_one_intensity_source_and_a_sane_pue_and_currency() -> None:
    base: dict[str, Any] = {"backends": ONE_BACKEND}
    assert load_config(data=base).carbon.pue == 1.0 and load_config(data=base).pricing.price_per_kwh is None
    for carbon, msg in [
        ({"intensity_g_per_kwh": 1, "url": "http://x/"}, "give one of"),
        ({"pue": 0.9}, r"carbon\.pue"),
        ({"intensity_g_per_kwh": -1}, r"carbon\.intensity_g_per_kwh"),
        ({"url": "ftp://x"}, r"carbon\.url"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            load_config(data={**base, "carbon": carbon})
    with pytest.raises(ConfigError, match=r"pricing\.currency"):
        load_config(data={**base, "pricing": {"price_per_kwh": 1, "currency": "euro"}})


@pytest.fixture
def grid() -> Iterator[tuple[str, list[Any]]]:
    """A carbon intensity service on loopback answering each poll with the next of ``answers``."""
    answers: list[Any] = [
        web.json_response({"g_per_kwh": 250}),
        web.Response(status=503),
        web.json_response(175),
    ]
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    async def handle(_: web.Request) -> web.StreamResponse:
        return answers.pop(0) if answers else web.json_response(175)

    async def serve() -> None:
        app = web.Application()
        app.router.add_get("/intensity", handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        holder["runner"] = runner
        holder["port"] = runner.addresses[0][1]
        ready.set()

    t = threading.Thread(target=lambda: (loop.run_until_complete(serve()), loop.run_forever()), daemon=True)
    t.start()
    ready.wait(10)
    yield f"http://127.0.0.1:{holder['port']}/intensity", answers
    asyncio.run_coroutine_threadsafe(holder["runner"].cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    t.join(10)
    loop.close()


def test_a_polled_url_keeps_each_value_with_its_time_and_a_failure_keeps_the_last(
    grid: tuple[str, list[Any]],
) -> None:
    url, _ = grid
    c = Carbon(CarbonConfig(url=url, max_age_s=3600), PricingConfig())
    assert c.intensity_at(1e10)[1] == reasons.CARBON_NOT_FETCHED

    async def polls() -> list[tuple[float | None, str | None]]:
        seen = []
        async with aiohttp.ClientSession() as s:
            for _ in range(3):
                await c.poll_once(s)
                seen.append(c.intensity_at(c._times[-1] + 1))
        return seen

    seen = asyncio.run(polls())
    assert seen == [(250.0, None), (250.0, None), (175.0, None)]  # the 503 left the last value in place
    assert c.polls == 3 and c.poll_errors == 1 and c.last_error is None
    state = c.state()
    assert state["source"] == "url" and state["points"] == 2 and state["latest_point_age_s"] < 60
    assert c.intensity_at(c._times[0]) == (250.0, None)  # a request before the second value: the first


_BEFORE_CARBON = """
CREATE TABLE requests (id TEXT PRIMARY KEY, chain_id TEXT, hop INTEGER, start_unix_s REAL NOT NULL,
                       record TEXT NOT NULL, key_id TEXT, client_request_id TEXT);
INSERT INTO requests VALUES ('old', NULL, NULL, 1.0,
  '{"id": "old", "start_unix_s": 1.0, "pool": "p", "precision": "bf16", "status": "ok", "energy_j": 2.0,
    "prompt_tokens": 1, "completion_tokens": 1}', NULL, NULL);
"""


def test_the_ledger_stores_co2e_and_cost_and_usage_sums_them_with_unknowns_counted(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(_BEFORE_CARBON)
    conn.close()
    led = Ledger(str(path), batch_s=0.005)  # an older ledger: its row gains NULL co2e and cost
    try:
        durable = _Durable()
        led.start(durable)
        fp = {"cost_currency": "EUR", "pue": 1.0}
        _write(
            led,
            durable,
            [
                _rec("a", 2.0, co2e_g=1.5, cost=0.25, **fp),
                _rec("b", 3.0, co2e_g=0.5, cost=0.75, **fp),
                _rec("c", 4.0, energy_j=None, co2e_g=None, cost=None, **fp),
            ],
        )
        conn = sqlite3.connect(path)
        cols = dict(conn.execute("SELECT id, co2e_g FROM requests").fetchall())
        conn.close()
        assert cols == {"old": None, "a": 1.5, "b": 0.5, "c": None}
        total = asyncio.run(_store(led).usage(RecordFilter(), ()))["total"]
        assert (total["co2e_g"], total["cost"], total["cost_currency"]) == (2.0, 1.0, "EUR")
        assert total["co2e_unknown_requests"] == 2 and total["cost_unknown_requests"] == 2
        assert total["co2e_null_reason"] is None and total["cost_null_reason"] is None
        only_old = asyncio.run(_store(led).usage(RecordFilter(until_unix_s=1.5), ()))["total"]
        assert only_old["requests"] == 1 and only_old["energy_j"] == 2.0
        assert only_old["co2e_g"] is None and only_old["co2e_null_reason"] == reasons.CO2E_NONE_KNOWN
        _write(led, durable, [_rec("d", 5.0, co2e_g=1.0, cost=1.0, cost_currency="USD")])
        mixed = asyncio.run(_store(led).usage(RecordFilter(), ()))["total"]
        assert mixed["cost"] is None and mixed["cost_null_reason"] == reasons.COST_CURRENCIES
        assert mixed["co2e_g"] == 3.0
    finally:
        led.close()
