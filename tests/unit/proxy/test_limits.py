"""Wire limits: every x-qtrap-* header and client id is checked before it reaches a record."""

from __future__ import annotations

import pytest

from qtrap_proxy.errors import BadRequest
from qtrap_proxy.limits import (
    MAX_HOP,
    MAX_REWRITE_DEPTH,
    ClientHeaders,
    check_hops,
    check_id,
    check_model,
    dump_json_object,
    parse_json_object,
    parse_qtrap_headers,
)

HEADERS = (b"x-qtrap-chain-id", b"x-qtrap-hop", b"x-qtrap-hop-split", b"x-qtrap-precision", b"x-qtrap-model")


def test_good_headers_are_parsed() -> None:
    got = parse_qtrap_headers(
        [
            (b"content-type", b"application/json"),
            (b"x-qtrap-chain-id", b"run-1/chain 7"),
            (b"x-qtrap-hop", b" 12 "),
            (b"x-qtrap-hop-split", b"lines"),
            (b"x-qtrap-precision", b"int4"),
            (b"x-qtrap-model", b"qwen3-8b@int4"),
            (b"x-qtrap-hop", b"99"),  # the first of a repeated header counts
            (b"authorization", b"Bearer \xff"),  # not ours: left alone
        ]
    )
    assert got == ClientHeaders("run-1/chain 7", 12, "lines", "int4", "qwen3-8b@int4")
    assert parse_qtrap_headers([(b"x-qtrap-hop", str(MAX_HOP).encode())]).hop == MAX_HOP
    assert parse_qtrap_headers([]) == ClientHeaders()


@pytest.mark.parametrize("name", [*HEADERS, b"x-qtrap-anything"])
@pytest.mark.parametrize("value", [b"caf\xc3\xa9", b"\xff\xfe", b"a\x01b", b"a\x7f", b"a\tb", b"\x00"])
def test_odd_bytes_in_any_qtrap_header_are_a_clear_400(name: bytes, value: bytes) -> None:
    with pytest.raises(BadRequest, match="printable ASCII") as e:
        parse_qtrap_headers([(name, value)])
    assert e.value.param == name.decode() and e.value.status == 400
    assert "\\x" not in e.value.message and value.decode("latin-1") not in e.value.message


@pytest.mark.parametrize(
    "hop",
    [b"0", b"-1", b"10001", str(10**30).encode(), b"1" * 300, b"\xb2", b"1.5", b"1e3", b"", b"+3", b"0x10"],
)
def test_hop_must_be_an_integer_from_1_to_max(hop: bytes) -> None:
    with pytest.raises(BadRequest) as e:
        parse_qtrap_headers([(b"x-qtrap-hop", hop)])
    assert e.value.param == "x-qtrap-hop" and len(e.value.message) < 200


def test_chain_id_limits() -> None:
    assert parse_qtrap_headers([(b"x-qtrap-chain-id", b"c" * 256)]).chain_id == "c" * 256
    for bad in (b"c" * 257, b"", b"   "):
        with pytest.raises(BadRequest) as e:
            parse_qtrap_headers([(b"x-qtrap-chain-id", bad)])
        assert e.value.param == "x-qtrap-chain-id"
    assert check_id("abc", "chain id") == "abc"
    for bad_id in ("", "x" * 257, "a\nb", "caf\u00e9", "bad\ud800"):
        with pytest.raises(BadRequest):
            check_id(bad_id, "chain id")


def test_hops_model_and_json_bodies() -> None:
    assert check_hops(3, "hops") == 3
    for bad in (0, -1, MAX_HOP + 1, 10**30, True, 2.0, "3", None):
        with pytest.raises(BadRequest):
            check_hops(bad, "hops")
    assert check_model("qwen3-8b@int4", "model") == "qwen3-8b@int4"
    for bad_model in ("", None, 3, "m" * 257, "a\x00b", "a\nb"):
        with pytest.raises(BadRequest) as e:
            check_model(bad_model, "model")
        assert e.value.param == "model"
    assert parse_json_object(b'{"a": [1]}') == {"a": [1]}
    for body in (b"[" * 100_000, b'{"a": "\xff"}', b'{"a": "\\ud800"}', b"[1]", b"", b"1e999"):
        with pytest.raises(BadRequest):
            parse_json_object(body)


def test_a_body_readable_but_too_deep_to_write_back_is_a_bad_request() -> None:
    """The fuzz test's find: orjson reads 1024 levels but writes 254, and the OpenAI routes write the body
    back (a 500 without a record)."""
    ok = parse_json_object(b'{"m": ' + b"[" * (MAX_REWRITE_DEPTH - 1) + b"]" * (MAX_REWRITE_DEPTH - 1) + b"}")
    assert dump_json_object(ok).startswith(b'{"m":[[')
    deep = parse_json_object(b'{"m": ' + b"[" * MAX_REWRITE_DEPTH + b"]" * MAX_REWRITE_DEPTH + b"}")
    with pytest.raises(BadRequest, match=f"deeper than {MAX_REWRITE_DEPTH} levels"):
        dump_json_object(deep)


def test_trace_context_continues_a_valid_traceparent_and_drops_anything_else() -> None:
    from qtrap_proxy.limits import trace_context

    tid = "4bf92f3577b34da6a3ce929d0e0e4736"
    assert trace_context(f"00-{tid}-00f067aa0ba902b7-01", "congo=t61rcWkgMzE") == (tid, "congo=t61rcWkgMzE")
    assert trace_context(f"01-{tid}-00f067aa0ba902b7-00-future", None) == (
        tid,
        None,
    )  # later versions may grow
    for bad in (
        f"00-{tid}-00f067aa0ba902b7-01-extra",  # version 00 has exactly four fields
        f"ff-{tid}-00f067aa0ba902b7-01",
        f"00-{'0' * 32}-00f067aa0ba902b7-01",
        f"00-{tid}-{'0' * 16}-01",
        f"00-{tid.upper()}-00f067aa0ba902b7-01",
        "00-xyz",
        "",
    ):
        assert trace_context(bad, "a=b") == (None, None), bad
    assert trace_context(f"00-{tid}-00f067aa0ba902b7-01", "x" * 513) == (tid, None)
    assert trace_context(f"00-{tid}-00f067aa0ba902b7-01", "a=\x01") == (tid, None)


def test_the_traceparent_sent_upstream_names_the_request_as_the_parent() -> None:
    from qtrap_proxy.timeline import Timeline, new_request_id

    tl = Timeline(new_request_id(), "chat")
    assert (
        tl.traceparent == f"00-{tl.request_id}-{tl.request_id[:16]}-01" and tl.span_id == tl.request_id[:16]
    )
    tl.trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    assert tl.traceparent == f"00-4bf92f3577b34da6a3ce929d0e0e4736-{tl.span_id}-01"
