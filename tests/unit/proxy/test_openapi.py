"""GET /openapi.json: a valid OpenAPI 3.1 document of every route the app registers, whose bounds are the
ones the proxy enforces (limits.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate
from starlette.applications import Starlette
from starlette.routing import Route

from qtrap_proxy.app import create_app
from qtrap_proxy.config import ServerConfig, load_config
from qtrap_proxy.errors import BadRequest
from qtrap_proxy.limits import (
    MAX_HEADER_CHARS,
    MAX_HOP,
    MAX_ID_CHARS,
    check_hops,
    check_id,
    check_model,
    parse_page,
    parse_qtrap_headers,
)
from qtrap_proxy.openapi import OPERATIONS, build_openapi
from qtrap_proxy.proxy import Proxy
from qtrap_proxy.query import MAX_LIST, parse_record_query, parse_usage_query
from tests.helpers import ONE_BACKEND

SPEC = build_openapi()
FAST = settings(max_examples=300, derandomize=True, database=None, deadline=None)


def test_the_document_is_valid_openapi_3_1() -> None:
    validate(SPEC)
    assert SPEC["openapi"].startswith("3.1")
    # the configured limits are the running server's
    spec = build_openapi(ServerConfig(max_body_bytes=1234, max_inflight_requests=7))
    validate(spec)
    post = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "1234 bytes" in post["413"]["description"] and "(7)" in post["503"]["description"]


def _registered(app: Any) -> set[tuple[str, str]]:
    """Every (path, method) the app's Starlette router serves (HEAD: Starlette's, beside each GET)."""
    while not isinstance(app, Starlette):
        app = app.app  # Guard -> _FastPath -> Starlette
    out = set()
    for route in app.routes:
        assert isinstance(route, Route), route
        path = re.sub(r":\w+}", "}", route.path)  # a converter ({model_id:path}) is not OpenAPI's
        out |= {(path, m.lower()) for m in route.methods or () if m != "HEAD"}
    return out


def test_every_registered_route_and_method_is_documented_and_nothing_else(tmp_path: Path) -> None:
    cfg = load_config(data={"backends": ONE_BACKEND, "ledger": {"path": str(tmp_path / "l.sqlite")}})
    registered = _registered(create_app(Proxy(cfg)))
    documented = {(path, method) for path, ops in SPEC["paths"].items() for method in ops}
    assert registered == documented
    assert {(op.path, op.method) for op in OPERATIONS} == documented
    assert len({op.operation_id for op in OPERATIONS}) == len(OPERATIONS)


def test_relay_routes_document_headers_streams_and_error_shapes() -> None:
    chat = SPEC["paths"]["/v1/chat/completions"]["post"]
    names = {_resolve(p)["name"] for p in chat["parameters"]}
    assert names == {
        "x-qtrap-precision",
        "x-qtrap-chain-id",
        "x-qtrap-hop",
        "x-qtrap-hop-split",
        "x-request-id",
    }
    ok = chat["responses"]["200"]
    assert set(ok["content"]) == {"application/json", "text/event-stream"}
    assert "[DONE]" in ok["content"]["text/event-stream"]["schema"]["description"]
    assert {
        "x-qtrap-request-id",
        "x-qtrap-backend",
        "x-qtrap-precision",
        "x-qtrap-energy-j-provisional",
        "x-request-id",
    } <= set(ok["headers"])
    for code in ("400", "404", "413", "431", "502", "503", "504"):
        assert chat["responses"][code]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/OpenAIError"
        }, code
    gen = SPEC["paths"]["/generate"]["post"]["responses"]
    assert gen["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/TGIError")
    body = SPEC["components"]["schemas"]["ChatCompletionRequest"]
    assert body["additionalProperties"] is True and body["required"] == ["model", "messages"]


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref is None:
        return node
    out: Any = SPEC
    for part in ref.removeprefix("#/").split("/"):
        out = out[part]
    return dict(out)


def _validator(schema: dict[str, Any]) -> Draft202012Validator:
    """A validator for a schema of the document (its `$ref`s resolved against the document)."""
    return Draft202012Validator({**schema, "components": SPEC["components"]})


def _param_schema(name: str) -> Draft202012Validator:
    return _validator(SPEC["components"]["parameters"][name]["schema"])


def _accepts(check: Any, *args: Any) -> bool:
    try:
        check(*args)
    except BadRequest:
        return False
    return True


def _header_ok(name: bytes, value: str) -> bool:
    return _accepts(parse_qtrap_headers, [(name, value.encode("latin-1"))])


# the proxy's checks and the document's schemas agree, value by value
ascii_text = st.text(st.characters(min_codepoint=0, max_codepoint=0x7F), max_size=MAX_ID_CHARS + 8)
near = st.one_of(ascii_text, st.integers(MAX_ID_CHARS - 2, MAX_ID_CHARS + 2).map(lambda n: "c" * n))


@FAST
@given(near)
def test_path_ids_agree_with_check_id(value: str) -> None:
    assert _param_schema("ChainId").is_valid(value) == _accepts(check_id, value, "chain id")
    assert _param_schema("RequestId").is_valid(value) == _accepts(check_id, value, "request id")


@FAST
@given(st.one_of(near, st.text(st.characters(min_codepoint=0, max_codepoint=0xFF), max_size=40)))
def test_qtrap_header_values_agree_with_parse_qtrap_headers(value: str) -> None:
    for component, name in (
        ("XQtrapChainId", b"x-qtrap-chain-id"),
        ("XQtrapModel", b"x-qtrap-model"),
        ("XQtrapPrecision", b"x-qtrap-precision"),
    ):
        valid = _param_schema(component).is_valid(value)
        ok = _header_ok(name, value) and (
            name != b"x-qtrap-model" or _accepts(check_model, value.strip(), "m")
        )
        assert valid == ok, (name, value)


@FAST
@given(st.one_of(st.integers(-3, 3), st.integers(MAX_HOP - 3, MAX_HOP + 3), st.integers()))
def test_hops_agree_with_the_header_and_the_score_body(n: int) -> None:
    assert _param_schema("XQtrapHop").is_valid(n) == _header_ok(b"x-qtrap-hop", str(n))
    score = _validator(SPEC["components"]["schemas"]["ScoreRequest"])
    assert score.is_valid({"correct": True, "hops": n}) == _accepts(check_hops, n, "hops")


@FAST
@given(
    st.one_of(st.integers(-2, 2), st.integers(998, 1003), st.integers()), st.sampled_from(["Offset", "Limit"])
)
def test_page_parameters_agree_with_parse_page(n: int, which: str) -> None:
    args = (str(n), None) if which == "Offset" else (None, str(n))
    if len(str(n)) > 12:  # parse_page refuses more than 12 digits (the document: no bound on offset)
        return
    assert _param_schema(which).is_valid(n) == _accepts(parse_page, *args)


@FAST
@given(st.text(max_size=MAX_HEADER_CHARS + 4))
def test_model_names_the_document_refuses_the_proxy_refuses(value: str) -> None:
    schema = _validator(SPEC["components"]["schemas"]["ChatCompletionRequest"]["properties"]["model"])
    if not schema.is_valid(value):
        assert not _accepts(check_model, value, "model")
    if value.isascii():
        assert schema.is_valid(value) == _accepts(check_model, value, "model")


@pytest.mark.parametrize("name", ["ChatCompletionRequest", "CompletionRequest", "TGIRequest", "ScoreRequest"])
def test_unknown_fields_are_allowed_in_bodies(name: str) -> None:
    assert SPEC["components"]["schemas"][name].get("additionalProperties") is True


def _query_ok(name: str, value: str) -> bool:
    return _accepts(parse_record_query, [(name, value)])


@FAST
@given(
    st.one_of(near, st.text(st.characters(min_codepoint=0, max_codepoint=0xFF), max_size=40)),
    st.sampled_from(
        [
            ("ChainIdFilter", "chain_id"),
            ("ClientRequestIdFilter", "client_request_id"),
            ("KeyFilter", "key"),
            ("StatusFilter", "status"),
            ("Final", "final"),
            ("Order", "order"),
        ]
    ),
)
def test_records_query_filters_agree_with_parse_record_query(value: str, which: tuple[str, str]) -> None:
    component, name = which
    ok = _query_ok(name, value)
    if name == "client_request_id" and value != value.strip(" \t"):
        return  # the proxy strips spaces around it (as it does for the header); the document does not say
    assert _param_schema(component).is_valid(value) == ok, (name, value)


@FAST
@given(st.one_of(st.integers(-2, 2), st.integers(MAX_LIST - 2, MAX_LIST + 2), st.integers()))
def test_list_limit_agrees_with_parse_record_query(n: int) -> None:
    if len(str(n)) > 12:
        return
    assert _param_schema("ListLimit").is_valid(n) == _query_ok("limit", str(n))


@pytest.mark.parametrize("component", ["Pool", "Precision", "Backend"])
@FAST
@given(value=st.text(max_size=MAX_HEADER_CHARS + 4))
def test_name_filters_agree_with_parse_record_query(component: str, value: str) -> None:
    name = component.lower()
    if value.isascii():
        assert _param_schema(component).is_valid(value) == _query_ok(name, value), value
    elif not _param_schema(component).is_valid(value):
        assert not _query_ok(name, value)


def test_every_query_parameter_of_the_records_query_and_usage_is_documented() -> None:
    from qtrap_proxy.query import LIST_PARAMS, USAGE_PARAMS

    for path, params in (("/qtrap/v1/requests", LIST_PARAMS), ("/qtrap/v1/usage", USAGE_PARAMS)):
        op = SPEC["paths"][path]["get"]
        names = {_resolve(p)["name"] for p in op["parameters"]}
        assert names == set(params), path
    assert _accepts(parse_usage_query, [("group_by", "pool,precision,backend,key,status")])
