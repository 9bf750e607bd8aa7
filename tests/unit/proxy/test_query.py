"""The records query's and usage's parameters: every one checked and bounded, the cursor opaque and bound
to its query."""

from __future__ import annotations

import base64
import datetime as dt

import orjson
import pytest

from qtrap_proxy.errors import BadRequest
from qtrap_proxy.limits import check_client_request_id
from qtrap_proxy.query import (
    DEFAULT_LIST,
    MAX_LIST,
    RecordFilter,
    RecordQuery,
    parse_record_query,
    parse_usage_query,
)


def _bad(params: list[tuple[str, str]], param: str, *, usage: bool = False) -> str:
    with pytest.raises(BadRequest) as e:
        (parse_usage_query if usage else parse_record_query)(params)
    assert e.value.status == 400 and e.value.param == param, e.value.message
    return e.value.message


def test_defaults_newest_first_a_hundred_a_page_every_record() -> None:
    q = parse_record_query([])
    assert (q.order, q.limit, q.final, q.after) == ("desc", DEFAULT_LIST, None, None)
    assert q.filter == RecordFilter()


def test_every_filter_is_parsed() -> None:
    q = parse_record_query(
        [
            ("since", "2026-12-01T00:00:00Z"),
            ("until", "1796169600.5"),
            ("pool", "qwen3-8b"),
            ("precision", "int4"),
            ("backend", "sim-int4"),
            ("chain_id", "c-1"),
            ("key", "key_0123456789ab"),
            ("status", "ok"),
            ("client_request_id", "req-42"),
            ("final", "false"),
            ("limit", "1000"),
            ("order", "asc"),
        ]
    )
    f = q.filter
    assert f.since_unix_s == dt.datetime(2026, 12, 1, tzinfo=dt.UTC).timestamp()
    assert f.until_unix_s == 1796169600.5
    assert (f.pool, f.precision, f.backend, f.chain_id, f.key_id, f.status, f.client_request_id) == (
        "qwen3-8b", "int4", "sim-int4", "c-1", "key_0123456789ab", "ok", "req-42",
    )  # fmt: skip
    assert (q.final, q.limit, q.order) == (False, MAX_LIST, "asc")
    assert parse_record_query([("final", "true")]).final is True
    # RFC 3339 with an offset, and a date
    since = parse_record_query([("since", "2026-12-01T01:00:00+01:00")]).filter.since_unix_s
    assert since == f.since_unix_s
    assert parse_record_query([("since", "2026-12-01")]).filter.since_unix_s == since
    assert parse_record_query([("since", "2026-12-01t00:00:00z")]).filter.since_unix_s == since  # RFC 3339


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("since", "yesterday"),
        ("since", "-1"),
        ("since", "nan"),
        ("until", "1e300"),
        ("until", "9" * 300),
        ("pool", ""),
        ("pool", "a\x00b"),
        ("pool", "p" * 257),
        ("precision", "\n"),
        ("backend", "b\x7f"),
        ("chain_id", ""),
        ("chain_id", "c" * 257),
        ("chain_id", "caf\u00e9"),
        ("key", "key_0123"),
        ("key", "' OR 1=1 --"),
        ("status", "OK"),
        ("status", "done"),
        ("client_request_id", ""),
        ("client_request_id", "r" * 129),
        ("client_request_id", "r\u00e9q"),
        ("client_request_id", "a\tb"),
        ("final", "yes"),
        ("final", "1"),
        ("limit", "0"),
        ("limit", "1001"),
        ("limit", "-1"),
        ("limit", "ten"),
        ("limit", "1" * 20),
        ("limit", "\u0661"),  # an Arabic-Indic digit: isdigit() but not ASCII
        ("order", "newest"),
        ("cursor", ""),
        ("cursor", "not a cursor"),
        ("cursor", "x" * 513),
    ],
)
def test_a_bad_value_is_a_400_naming_its_parameter(name: str, value: str) -> None:
    message = _bad([(name, value)], name)
    assert len(message) < 400  # the value is quoted short, never echoed whole


def test_unknown_and_repeated_parameters_and_a_reversed_window_are_refused() -> None:
    assert "precison" in _bad([("precison", "int4")], "precison")
    assert "more than once" in _bad([("pool", "a"), ("pool", "b")], "pool")
    assert "after until" in _bad([("since", "200"), ("until", "100")], "since")
    assert parse_record_query([("since", "100"), ("until", "100")]).filter.until_unix_s == 100.0
    _bad([("limit", "5")], "limit", usage=True)  # the usage sums take no page parameters
    _bad([("group_by", "pool")], "group_by")  # and the records query no group_by


def test_group_by_is_a_subset_named_once() -> None:
    assert parse_usage_query([]) == (RecordFilter(), ())
    assert parse_usage_query([("group_by", "pool, precision,key")])[1] == ("pool", "precision", "key")
    assert parse_usage_query([("group_by", "status,backend")])[1] == ("status", "backend")
    _bad([("group_by", "chain")], "group_by", usage=True)
    _bad([("group_by", "pool,pool")], "group_by", usage=True)
    _bad([("group_by", "pool,,precision")], "group_by", usage=True)
    f, _ = parse_usage_query([("pool", "p"), ("since", "10")])
    assert (f.pool, f.since_unix_s) == ("p", 10.0)


def _rec(start: float, rid: str) -> dict[str, object]:
    return {"id": rid, "start_unix_s": start}


def test_the_cursor_round_trips_and_is_bound_to_its_filters_and_order() -> None:
    params = [("pool", "p"), ("limit", "2"), ("order", "asc")]
    q = parse_record_query(params)
    cursor = q.cursor(_rec(1764633600.123456, "abc"))
    again = parse_record_query([*params, ("cursor", cursor)])
    assert again.after == (1764633600.123456, "abc") and again.filter == q.filter
    assert again.past_cursor(_rec(1764633600.123456, "abd")) and not again.past_cursor(
        _rec(1764633600.1, "z")
    )
    # another filter, order or final: refused, not a wrong page
    for other in (
        [("pool", "q"), ("order", "asc")],
        [("pool", "p")],
        [("pool", "p"), ("order", "asc"), ("final", "true")],
    ):
        assert "other filters" in _bad([*other, ("cursor", cursor)], "cursor")
    # the page size may change between pages
    assert (
        parse_record_query([("pool", "p"), ("order", "asc"), ("limit", "7"), ("cursor", cursor)]).limit == 7
    )


@pytest.mark.parametrize(
    "payload",
    [
        [2, "desc", 1.0, "abc", RecordQuery().digest()],  # another version
        [1, "desc", "1.0", "abc", RecordQuery().digest()],  # a time that is not a number
        [1, "desc", 1.0, "", RecordQuery().digest()],  # an empty id
        [1, "desc", 1.0, "a\x00", RecordQuery().digest()],  # an id no record has
        [1, "desc", 1.0, 5, RecordQuery().digest()],
        {"t": 1.0},
    ],
)
def test_a_forged_cursor_is_a_400(payload: object) -> None:
    text = base64.urlsafe_b64encode(orjson.dumps(payload)).decode().rstrip("=")
    _bad([("cursor", text)], "cursor")


def test_a_filter_matches_records_as_the_ledger_selects_them() -> None:
    f = RecordFilter(since_unix_s=10, until_unix_s=20, pool="p", key_id="key_0123456789ab")
    rec = {"id": "a", "start_unix_s": 10.0, "pool": "p", "key_id": "key_0123456789ab", "precision": "x"}
    assert f.matches(rec)
    assert not f.matches({**rec, "start_unix_s": 20.0})  # until is exclusive
    assert not f.matches({**rec, "start_unix_s": 9.99})
    assert not f.matches({**rec, "pool": "q"})
    assert not f.matches({**rec, "key_id": None})
    assert f.restricted_to("key_ba9876543210").key_id == "key_ba9876543210"
    assert f.restricted_to("key_ba9876543210").pool == "p"


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        ("req-1", "req-1"),
        ("  spaced  ", "spaced"),
        ("r" * 128, "r" * 128),
        ("r" * 129, None),
        ("", None),
        ("   ", None),
        ("caf\u00e9", None),
        ("a\x01b", None),
        ('{"json": [1, 2]}', '{"json": [1, 2]}'),
    ],
)
def test_a_client_request_id_is_kept_only_when_printable_ascii_and_bounded(
    value: str, kept: str | None
) -> None:
    assert check_client_request_id(value) == kept
