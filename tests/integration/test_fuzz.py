"""Property-based fuzzing of every route and method in GET /openapi.json (issue 13, item 8).

A real proxy process (uvicorn's default parser, httptools) in front of two healthy simulated
backends (vLLM and TGI APIs, each metered through its DCGM endpoint). Hypothesis builds requests
from the served document: each operation's method (sometimes a wrong one), path values and queries
in and out of their bounds, ``x-qtrap-*`` and content-type headers with odd, huge, unicode and
control bytes, and bodies that are valid, of wrong types, malformed, deep, huge or not UTF-8,
streamed and not, sent with a length or chunked. Each answer must hold:

* no 5xx: with healthy backends none is legitimate (the proxy's 502/503/504 are for unreachable,
  overloaded or silent backends; a backend's own 5xx would be passed through, and the simulator
  makes none for any input, so one here fails too);
* every 4xx in its route's error shape: OpenAI's on the OpenAI, admin and other routes, TGI's on
  TGI's (the guard's 431 is OpenAI's everywhere); only a request head that uvicorn's HTTP parser
  itself refuses (control bytes in a header) may get its plain-text 400;
* a 200 ``text/event-stream`` ends with its terminator: ``data: [DONE]`` on OpenAI routes, on TGI's
  a last event with ``generated_text`` or an ``error_type``;
* a 200 JSON answer of an admin or listing route matches its schema in the document.

Afterwards the proxy is healthy and every request it gave an id has a sound final record in a
ledger that passes ``PRAGMA integrity_check``. Bounded: derandomized (fixed examples), a fixed
number of examples per operation (EXAMPLES), about 25 s in all on a 2-core machine.
"""

from __future__ import annotations

import http.client
import json
import socket
import sqlite3
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from tests.helpers import backend, free_port, proxy, sim

MAX_BODY = 65_536  # server.max_body_bytes here: huge bodies stay cheap
MAX_HEADER_BYTES = 16_384
EXAMPLES = {"body": 250, "other": 60}  # per operation: those with a request body, the rest
QTRAP_HEADERS = (
    b"x-qtrap-chain-id",
    b"x-qtrap-hop",
    b"x-qtrap-hop-split",
    b"x-qtrap-precision",
    b"x-qtrap-model",
)
CHAIN = "fuzz-chain"
OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}
# bytes uvicorn's parser (httptools) refuses in a header value: it answers a plain-text 400 itself
_PARSER_REFUSES = frozenset({*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F})


@dataclass
class Target:
    url: str
    port: int
    ledger: Path
    spec: dict[str, Any]
    known: tuple[str, ...] = ()  # request ids that exist from the start (drawn from: fixed, not growing)
    request_ids: set[str] = field(default_factory=set)
    answers: int = 0
    seen: Counter[tuple[str, str, int, bool]] = field(
        default_factory=Counter
    )  # (path, method, status, stream)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    vport, tport = free_port(), free_port()
    common = ("--model", "qwen3-8b", "--step-ms", "1")
    with sim(vport, *common), sim(tport, *common, "--api", "tgi", "--precision", "int8", "--gpu-index", "1"):
        cfg: dict[str, Any] = {
            "server": {"max_body_bytes": MAX_BODY, "max_header_bytes": MAX_HEADER_BYTES},
            "backends": [
                backend("sim-vllm", vport, devices=[{"host": "qtrap-sim", "index": 0}]),
                backend(
                    "sim-tgi",
                    tport,
                    "int8",
                    pool="tgi-pool",
                    kind="tgi",
                    devices=[{"host": "qtrap-sim", "index": 1}],
                ),
            ],
            "meter": {
                "kind": "dcgm",
                "urls": [f"http://127.0.0.1:{p}/dcgm/metrics" for p in (vport, tport)],
                "settle_s": 0.2,
            },
            "ledger": {"path": str(tmp / "ledger.sqlite"), "batch_s": 0.02},
        }
        with proxy(tmp, cfg):
            port = cfg["server"]["port"]
            url = f"http://127.0.0.1:{port}"
            spec = requests.get(url + "/openapi.json", timeout=10).json()
            t = Target(url, port, Path(cfg["ledger"]["path"]), spec)
            for hop in (1, 2):  # a chain and request ids that exist, for the admin routes to find
                r = requests.post(
                    url + "/v1/chat/completions",
                    json={
                        "model": "qwen3-8b",
                        "max_tokens": 2,
                        "messages": [{"role": "user", "content": "hi"}],
                    },
                    headers={"x-qtrap-chain-id": CHAIN, "x-qtrap-hop": str(hop)},
                    timeout=30,
                )
                assert r.status_code == 200, r.text
                t.request_ids.add(r.headers["x-qtrap-request-id"])
            t.known = tuple(sorted(t.request_ids))
            yield t


# -- requests ------------------------------------------------------------------------------------------------
@dataclass
class Req:
    method: str
    target: str
    headers: list[tuple[bytes, bytes]]
    body: bytes | None
    chunked: bool = False

    @property
    def parser_may_refuse(self) -> bool:
        return any(b in _PARSER_REFUSES for _, v in self.headers for b in v)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # Hypothesis prints a failing example with it
        p.text(repr(self))

    def __repr__(self) -> str:  # what a failing example prints
        body = self.body if self.body is None or len(self.body) < 300 else self.body[:300] + b"..."
        return (
            f"Req({self.method} {self.target} headers={self.headers!r} chunked={self.chunked} body={body!r})"
        )


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def send(t: Target, req: Req) -> Answer:
    head = [f"{req.method} {req.target} HTTP/1.1".encode(), b"host: 127.0.0.1", b"connection: close"]
    head += [name + b": " + value for name, value in req.headers]
    payload = b""
    if req.body is not None:
        if req.chunked:
            head.append(b"transfer-encoding: chunked")
            half = len(req.body) // 2
            parts = [p for p in (req.body[:half], req.body[half:]) if p]
            payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
        else:
            head.append(b"content-length: %d" % len(req.body))
            payload = req.body
    with socket.create_connection(("127.0.0.1", t.port), timeout=30) as sock:
        try:
            sock.sendall(b"\r\n".join(head) + b"\r\n\r\n" + payload)
        except OSError:  # answered (413) and closed before the whole body was sent: read the answer
            pass
        resp = http.client.HTTPResponse(sock, method=req.method)
        resp.begin()
        body = resp.read()
    t.answers += 1
    return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)


T = TypeVar("T")


def mostly(usual: st.SearchStrategy[T], odd: st.SearchStrategy[Any], odds: int = 4) -> st.SearchStrategy[Any]:
    """``usual``, and one time in ``odds`` ``odd``: most requests are ordinary in all but a few ways, so
    they get past the first check and reach the later ones (and the backend)."""
    # Hypothesis favours a range's ends: the odd share sits in its middle
    return st.integers(0, 99).flatmap(lambda i: odd if 40 <= i < 40 + 100 // odds else usual)


utf8 = st.characters(exclude_categories=["Cs"])  # no lone surrogates: not UTF-8 is a body case of its own
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(utf8, max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(utf8, max_size=8), inner, max_size=3),
    max_leaves=8,
)
odd_text = st.one_of(
    st.text(utf8, max_size=40),
    st.text(st.characters(min_codepoint=0, max_codepoint=0x7F), max_size=300),
    st.integers(250, 300).map(lambda n: "x" * n),
)


def _no_crlf(b: bytes) -> bytes:
    return b.replace(b"\r", b"").replace(b"\n", b"")


odd_header_values = st.one_of(
    st.sampled_from([b"", b" ", b"0", b"10001", b"-1", b"REGEX", b"words", b"fp3", b"\xb2", b"1" * 40]),
    st.binary(max_size=300).map(_no_crlf),
    odd_text.map(lambda s: _no_crlf(s.encode("utf-8", "surrogatepass"))),
    st.integers(250, 300).map(lambda n: b"c" * n),
)
usual_header_values: dict[bytes, st.SearchStrategy[bytes]] = {
    b"x-qtrap-chain-id": st.sampled_from([CHAIN.encode(), b"fuzz-other", b"c" * 256]),
    b"x-qtrap-hop": st.integers(1, 10_000).map(lambda n: str(n).encode()),
    b"x-qtrap-hop-split": st.sampled_from([b"lines", b"regex", b" Lines "]),
    b"x-qtrap-precision": st.sampled_from([b"bf16", b"int8"]),
    b"x-qtrap-model": st.sampled_from([b"tgi-pool", b"tgi-pool@int8", b"qwen3-8b"]),
}
content_types = st.sampled_from(
    [
        b"application/json",
        b"application/json; charset=utf-8",
        b"text/plain",
        b"",
        b"\xff\xfe",
        b"multipart/form-data",
    ]
)
extra_headers = mostly(
    st.lists(
        st.tuples(st.from_regex(rb"\Ax-[a-z0-9-]{1,20}\Z"), mostly(st.just(b"v"), odd_header_values)),
        max_size=2,
    ),
    st.integers(95, 110).map(lambda n: [(b"x-h%d" % i, b"v") for i in range(n)]),  # around server.max_headers
    odds=12,
)


@st.composite
def headers_for(draw: st.DrawFn, relay: bool) -> list[tuple[bytes, bytes]]:
    out: list[tuple[bytes, bytes]] = []
    if draw(st.integers(0, 3)):
        out.append((b"content-type", draw(mostly(st.just(b"application/json"), content_types))))
    names = draw(st.lists(st.sampled_from(QTRAP_HEADERS), max_size=3, unique=True)) if relay else []
    out += [(n, draw(mostly(usual_header_values[n], odd_header_values, odds=5))) for n in names]
    out += draw(extra_headers)
    if draw(st.integers(0, 20)) == 10:
        out.append((b"x-big", b"a" * draw(st.integers(MAX_HEADER_BYTES - 200, MAX_HEADER_BYTES + 200))))
    return out


models = mostly(
    st.sampled_from(["qwen3-8b", "qwen3-8b@bf16"]),
    st.sampled_from(["Qwen/unknown", "qwen3-8b@int4", "tgi-pool", "nope", "qwen3-8b@", "@"])
    | odd_text
    | json_values,
    odds=8,
)
small_tokens = st.integers(1, 6)
messages = mostly(
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system"]), "content": st.text(utf8, max_size=30)}
        ),
        min_size=1,
        max_size=3,
    ),
    json_values,
    odds=8,
)
stream_options = mostly(
    st.fixed_dictionaries(
        {}, optional={"include_usage": st.booleans(), "continuous_usage_stats": st.booleans()}
    ),
    json_values,
)
PASSTHROUGH = [
    "temperature",
    "top_p",
    "seed",
    "user",
    "logprobs",
    "n",
    "stop",
    "presence_penalty",
    "x_custom",
]


@st.composite
def openai_body(draw: st.DrawFn, chat: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": draw(models)}
    if chat:
        body["messages"] = draw(messages)
    else:
        body["prompt"] = draw(
            mostly(
                st.text(utf8, max_size=30) | st.lists(st.integers(0, 100), min_size=1, max_size=4),
                json_values,
            )
        )
    stream = draw(mostly(st.sampled_from([True, False, None]), json_values, odds=6))
    if stream is not None:
        body["stream"] = stream
    if draw(st.booleans()):
        body["stream_options"] = draw(stream_options)
    # a bounded answer: the backend generates what is asked for (the simulator's default is 256 tokens)
    body["max_tokens"] = draw(mostly(small_tokens, st.sampled_from([0, -1, "3", None, 1.5]), odds=8))
    for name in draw(st.lists(st.sampled_from(PASSTHROUGH), max_size=2, unique=True)):
        body[name] = draw(json_values)
    if draw(st.integers(0, 15)) == 7:
        body.pop(
            draw(st.sampled_from(["model", "messages" if chat else "prompt"]))
        )  # a required field missing
    return body


@st.composite
def responses_body(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": draw(models),
        "input": draw(mostly(st.text(utf8, min_size=1, max_size=30) | messages, json_values)),
        "max_output_tokens": draw(mostly(small_tokens, st.sampled_from([0, -1, "3", None, 1.5]), odds=8)),
    }
    stream = draw(mostly(st.sampled_from([True, False, None]), json_values, odds=6))
    if stream is not None:
        body["stream"] = stream
    if draw(st.integers(0, 15)) == 7:
        body.pop(draw(st.sampled_from(["model", "input"])))  # a required field missing
    return body


@st.composite
def tgi_body(draw: st.DrawFn) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": draw(mostly(st.text(utf8, min_size=1, max_size=30), json_values))}
    params = st.fixed_dictionaries(
        {"max_new_tokens": mostly(small_tokens, st.sampled_from([0, "2", None]))},
        optional={
            "details": st.booleans(),
            "do_sample": st.booleans(),
            "temperature": json_values,
            "stop": json_values,
        },
    )
    if draw(st.integers(0, 5)):
        body["parameters"] = draw(mostly(params, json_values, odds=8))
    stream = draw(mostly(st.sampled_from([True, False, None]), json_values, odds=6))
    if stream is not None:
        body["stream"] = stream
    return body


score_body = st.fixed_dictionaries(
    {"correct": mostly(st.booleans(), json_values)},
    optional={
        "hops": st.integers(-2, 3) | st.integers(9_998, 10_002) | st.integers() | json_values,
        "extra": json_values,
    },
)


def encode(obj: Any, how: int) -> bytes:
    if how == 0:
        return json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return json.dumps(obj).encode()


@st.composite
def raw_bodies(draw: st.DrawFn, valid: st.SearchStrategy[Any]) -> bytes:
    """A body: mostly a JSON document of the route's shape, else one broken in some way."""
    kind = draw(st.integers(0, 99))
    doc = encode(draw(valid), draw(st.integers(0, 1)))
    if not 40 <= kind < 70:
        return doc
    if kind < 45:  # cut short
        return doc[: draw(st.integers(0, max(0, len(doc) - 1)))]
    if kind < 50:  # nested around orjson's depth limit
        depth = draw(st.integers(1_020, 1_030))
        return b'{"model": "qwen3-8b", "messages": ' + b"[" * depth + b"]" * depth + b"}"
    if kind < 55:  # around server.max_body_bytes
        pad = draw(st.integers(MAX_BODY - 200, MAX_BODY + 200)) - len(doc) - 12
        return doc[:-1] + b', "pad": "' + b"x" * max(0, pad) + b'"}' if doc.endswith(b"}") else doc
    if kind < 60:  # not UTF-8, or not JSON at all
        return draw(st.binary(max_size=200)) + draw(
            st.sampled_from([b"", b"\xff", b"\xc3\x28", b"\xed\xa0\x80"])
        )
    return encode(draw(json_values), 1)  # any JSON value (an array, a number, null, ...)


ids = mostly(
    st.sampled_from([CHAIN, "unknown", "a" * 256]),
    st.sampled_from(["a" * 257, "..", "%", " "])
    | st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=300)
    | st.text(utf8, min_size=1, max_size=20),
    odds=3,
)


# usual values of the records query's and usage's parameters (in bounds and out)
QUERY_VALUES = {
    "since": ["0", "1700000000", "2026-12-01T00:00:00Z", "2026-12-01", "-1", "soon"],
    "until": ["4102444800", "2100-01-01T00:00:00+01:00", "1", "nan"],
    "pool": ["qwen3-8b", "tgi-pool", "none"],
    "precision": ["bf16", "int8", ""],
    "backend": ["sim-vllm", "sim-tgi"],
    "chain_id": [CHAIN, "unknown", "a" * 257],
    "key": ["key_0123456789ab", "key_x"],
    "status": ["ok", "in_flight", "bad_request", "OK"],
    "client_request_id": ["req-1", "r" * 129],
    "final": ["true", "false", "1"],
    "limit": ["1", "2", "1000", "1001", "0", "-5"],
    "order": ["asc", "desc", "up"],
    "cursor": ["", "eyJ0IjogMX0", "WzEsImRlc2MiLDEuMCwiYSIsIngiXQ"],
    "group_by": ["pool", "precision,status", "pool,precision,backend,key,status", "chain", "pool,pool", ""],
}


def _resolve(spec: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref is None:
        return node
    out: Any = spec
    for part in ref.removeprefix("#/").split("/"):
        out = out[part]
    return dict(out)


def fill_path(path: str, value: str) -> str:
    quoted = urllib.parse.quote(value, safe="")
    return path.replace("{request_id}", quoted).replace("{chain_id}", quoted).replace("{model_id}", quoted)


@st.composite
def requests_for(draw: st.DrawFn, t: Target, path: str, method: str) -> Req:
    family = _family(path)
    path_value = draw(ids | st.sampled_from(t.known))
    target = fill_path(path, path_value)
    if path.endswith("/chains/{chain_id}") and draw(st.booleans()):
        query = {
            k: draw(st.integers(-2, 1_002).map(str) | odd_text)
            for k in draw(st.lists(st.sampled_from(["offset", "limit"]), max_size=2, unique=True))
        }
        target += "?" + urllib.parse.urlencode(query)
    if path in ("/qtrap/v1/requests", "/qtrap/v1/usage") and draw(st.integers(0, 3)) > 0:
        documented = [
            _resolve(t.spec, p)["name"] for p in t.spec["paths"][path][method].get("parameters", [])
        ]
        names = draw(st.lists(st.sampled_from([*documented, "bogus"]), max_size=5))  # repeats too
        pairs = [(k, draw(mostly(st.sampled_from(QUERY_VALUES.get(k, ["x"])), odd_text))) for k in names]
        target += "?" + urllib.parse.urlencode(pairs)
    wrong = draw(st.integers(0, 9)) == 5
    verb = (
        draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]))
        if wrong
        else method.upper()
    )
    if path == "/v1/chat/completions":
        valid: st.SearchStrategy[Any] = openai_body(chat=True)
    elif path == "/v1/completions":
        valid = openai_body(chat=False)
    elif path == "/v1/responses":
        valid = responses_body()
    elif family == "tgi":
        valid = tgi_body()
    elif path.endswith("/score"):
        valid = score_body
    else:
        valid = json_values
    body = (
        draw(raw_bodies(valid)) if verb in ("POST", "PUT", "PATCH") or draw(st.integers(0, 9)) == 5 else None
    )
    return Req(
        verb,
        target,
        draw(headers_for(family in ("openai", "tgi", "responses"))),
        body,
        draw(st.integers(0, 4)) == 2,
    )


# -- checks --------------------------------------------------------------------------------------------------
def _family(path: str) -> str:
    if path in ("/v1/chat/completions", "/v1/completions"):
        return "openai"
    if path in ("/generate", "/generate_stream", "/"):
        return "tgi"
    if path == "/v1/responses":
        return "responses"
    return "other"


def _schema_of(t: Target, path: str, method: str) -> Draft202012Validator | None:
    content = t.spec["paths"][path][method]["responses"]["200"].get("content", {})
    schema = content.get("application/json", {}).get("schema")
    if schema is None or "$ref" not in schema:
        return None
    return Draft202012Validator({**schema, "components": t.spec["components"]})


def _is_openai_error(body: bytes) -> bool:
    try:
        err = orjson.loads(body)["error"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return False
    return (
        isinstance(err, dict)
        and set(err) == OPENAI_ERROR_KEYS
        and isinstance(err["message"], str)
        and bool(err["message"])
    )


def _is_tgi_error(body: bytes) -> bool:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return (
        isinstance(obj, dict) and isinstance(obj.get("error"), str) and isinstance(obj.get("error_type"), str)
    )


def _tgi_stream_ended(body: bytes) -> bool:
    events = [e for e in body.replace(b"\r\n", b"\n").split(b"\n\n") if e.strip()]
    if not events or not events[-1].startswith(b"data:"):
        return False
    last = orjson.loads(events[-1][5:])
    return bool(last.get("generated_text") is not None or last.get("error_type"))


def check(t: Target, path: str, method: str, req: Req, a: Answer) -> None:
    # a relay route answers POSTs; another method there gets Starlette's 405 (OpenAI's shape)
    family = _family(path) if req.method == "POST" else "other"
    where = f"{a.status} {a.headers.get('content-type')} {a.body[:500]!r}\nfor {req!r}"
    assert a.status < 500, "a 5xx from the proxy in front of healthy backends: " + where
    t.seen[
        (path, req.method, a.status, a.headers.get("content-type", "").startswith("text/event-stream"))
    ] += 1
    rid = a.headers.get("x-qtrap-request-id")
    if rid is not None:
        t.request_ids.add(rid)
    if req.method == "HEAD":
        return
    if a.status >= 400:
        if req.parser_may_refuse and a.status == 400 and not a.body.startswith(b"{"):
            return  # uvicorn's parser refused the head before any route saw it
        if family == "tgi" and a.status != 431:
            assert _is_tgi_error(a.body), "not TGI's error shape: " + where
        elif family == "openai" and a.headers.get("x-qtrap-backend") == "sim-tgi":
            pass  # a TGI backend's own answer to an OpenAI path (model `tgi-pool`), passed through
        else:
            assert _is_openai_error(a.body), "not OpenAI's error shape: " + where
        return
    ctype = a.headers.get("content-type", "")
    if ctype.startswith("text/event-stream"):
        if family == "openai":
            assert a.body.endswith(b"data: [DONE]\n\n"), "a stream without `data: [DONE]`: " + where
        elif family == "responses":
            last = a.body.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
            assert last.startswith((b"event: response.completed\n", b"event: error\n")), (
                "a Responses stream without its last event: " + where
            )
        else:
            assert _tgi_stream_ended(a.body), "a TGI stream without its last event: " + where
    elif ctype.startswith("application/json"):
        obj = orjson.loads(a.body)
        validator = _schema_of(t, path, method) if req.method.lower() == method else None
        if validator is not None:
            errors = [e.message for e in validator.iter_errors(obj)]
            assert not errors, f"answer does not match the document: {errors[:3]}\n" + where


def operations(spec: dict[str, Any]) -> list[tuple[str, str]]:
    return [(path, method) for path, ops in spec["paths"].items() for method in ops]


# The operations are the served document's; the list here only names the test cases, and
# test_every_documented_operation_is_fuzzed fails when the two part.
OPERATIONS = [
    ("/v1/chat/completions", "post"),
    ("/v1/completions", "post"),
    ("/v1/embeddings", "post"),
    ("/v1/responses", "post"),
    ("/tokenize", "post"),
    ("/detokenize", "post"),
    ("/v1/models", "get"),
    ("/v1/models/{model_id}", "get"),
    ("/generate", "post"),
    ("/generate_stream", "post"),
    ("/", "post"),
    ("/health", "get"),
    ("/health/live", "get"),
    ("/health/ready", "get"),
    ("/metrics", "get"),
    ("/openapi.json", "get"),
    ("/qtrap/v1/requests", "get"),
    ("/qtrap/v1/requests/{request_id}", "get"),
    ("/qtrap/v1/usage", "get"),
    ("/qtrap/v1/chains/{chain_id}", "get"),
    ("/qtrap/v1/chains/{chain_id}/score", "post"),
    ("/qtrap/v1/energy", "get"),
    ("/qtrap/v1/backends", "get"),
    ("/qtrap/v1/routing", "get"),
    ("/qtrap/v1/keys", "get"),
    ("/qtrap/v1/keys/{key_id}/usage", "get"),
]


def test_every_documented_operation_is_fuzzed(target: Target) -> None:
    assert sorted(operations(target.spec)) == sorted(OPERATIONS)


@pytest.mark.parametrize(("path", "method"), OPERATIONS, ids=[f"{m} {p}" for p, m in OPERATIONS])
def test_fuzz_operation(target: Target, path: str, method: str) -> None:
    examples = EXAMPLES["body" if "requestBody" in target.spec["paths"][path][method] else "other"]

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(st.data())
    def run(data: st.DataObject) -> None:
        req = data.draw(requests_for(target, path, method))
        check(target, path, method, req, send(target, req))

    run()
    health = requests.get(target.url + "/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text


def test_unknown_paths_get_openai_404(target: Target) -> None:
    for path in (
        "/v2/chat/completions",
        "/qtrap/v1/request",
        "/qtrap/v1/usage/x",
        "/qtrap/v1/chains/a/b/c",
        "/%ff",
        "/generate/x",
    ):
        a = send(target, Req("GET", path, [], None))
        assert a.status == 404 and _is_openai_error(a.body), (path, a.status, a.body)


def test_after_the_fuzz_every_record_is_final_and_the_ledger_sound(target: Target) -> None:
    assert target.answers > 0 and target.request_ids
    for (path, method, status, stream), n in sorted(target.seen.items()):
        print(f"{n:5d}  {method} {path} -> {status}{' (stream)' if stream else ''}")
    # not vacuous: ordinary requests got through to the backends, streamed and not
    for path in ("/v1/chat/completions", "/v1/completions", "/generate", "/generate_stream", "/"):
        for stream in (False, True) if path != "/generate" else (False,):
            if path == "/generate_stream":
                stream = True
            assert target.seen[(path, "POST", 200, stream)] >= 3, (path, stream, target.seen)
    deadline = time.monotonic() + 30
    pending = set(target.request_ids)
    while pending:
        for rid in sorted(pending):
            rec = requests.get(f"{target.url}/qtrap/v1/requests/{urllib.parse.quote(rid)}", timeout=10).json()
            if rec.get("final"):
                pending.discard(rid)
        assert time.monotonic() < deadline, f"{len(pending)} records not final: {sorted(pending)[:5]}"
        time.sleep(0.1)
    conn = sqlite3.connect(f"file:{target.ledger}?mode=ro", uri=True, timeout=10)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = conn.execute("SELECT id, chain_id, hop, record FROM requests").fetchall()
    finally:
        conn.close()
    stored = {row[0] for row in rows}
    assert target.request_ids <= stored
    for rid, chain_id, hop, text in rows:
        rec = json.loads(text)
        assert rec["id"] == rid and rec["chain_id"] == chain_id and rec["hop"] == hop, rec
        assert rec["final"] is True and "ledger_error" not in rec, rec
        assert hop is None or 1 <= hop <= 10_000, rec
        if rec["energy_j"] is None:
            assert rec["energy_null_reason"], rec  # unknown energy says why
        elif rec["completion_tokens"]:
            assert rec["energy_j"] > 0, rec  # never 0 for work that was done
    health = requests.get(target.url + "/health", timeout=10).json()
    assert health["status"] == "ok" and health["ledger"]["status"] == "ok"
    assert health["ledger"]["write_errors"] == {"commit": 0, "record": 0, "writer": 0, "dropped": 0}
