from __future__ import annotations

import orjson

from qtrap_proxy.errors import UpstreamBroken
from qtrap_proxy.openai_route import OpenAIStreamFilter
from qtrap_proxy.sse import SSESplitter
from qtrap_proxy.tgi_route import TGIStreamFilter
from qtrap_proxy.timeline import Timeline


def _chunk(content: str | None, usage: tuple[int, int] | None, choices: bool = True) -> bytes:
    d: dict[str, object] = {"id": "x", "object": "chat.completion.chunk", "choices": []}
    if choices:
        d["choices"] = [{"index": 0, "delta": {"content": content}, "finish_reason": None}]
    if usage is not None:
        d["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)}
    return b"data: " + orjson.dumps(d)


def _events(out: bytes) -> list[bytes]:
    s = SSESplitter()
    ev = s.feed(out)
    assert s.pending == b""
    return ev


def test_vllm_continuous_usage_stripped_when_not_asked() -> None:
    tl = Timeline("r", "chat")
    f = OpenAIStreamFilter(tl, continuous=True, keep_usage_chunk=False, strip_usage=True)
    out = f.process(
        [_chunk("a", (7, 1)), _chunk("b c", (7, 3)), _chunk(None, (7, 3), choices=False), b"data: [DONE]"],
        now=1.0,
    )
    ev = _events(out)
    assert len(ev) == 3 and ev[-1] == b"data: [DONE]"
    for e in ev[:2]:
        assert "usage" not in orjson.loads(e[6:])
    assert tl.chunk_tokens == [1, 2] and tl.tokens_exact
    assert (tl.prompt_tokens, tl.completion_tokens) == (7, 3)


def test_usage_chunk_kept_when_asked_and_bytes_unchanged() -> None:
    tl = Timeline("r", "chat")
    f = OpenAIStreamFilter(tl, continuous=True, keep_usage_chunk=True, strip_usage=False)
    events = [_chunk("a", (7, 1)), _chunk(None, (7, 1), choices=False), b"data: [DONE]"]
    assert f.process(events, 1.0) == b"\n\n".join(events) + b"\n\n"


def test_estimated_tokens_without_continuous_usage() -> None:
    # e.g. transformers serve: usage only on the last content chunk
    tl = Timeline("r", "chat")
    f = OpenAIStreamFilter(tl, continuous=False, keep_usage_chunk=False, strip_usage=True)
    out = f.process([_chunk("a", None), _chunk("", None), _chunk("bcd", (3, 5))], 2.0)
    ev = _events(out)
    assert len(ev) == 3 and "usage" not in orjson.loads(ev[2][6:])
    assert tl.chunk_tokens == [1, 1] and not tl.tokens_exact
    assert tl.completion_tokens == 5


def test_upstream_error_event_passes_and_is_noted() -> None:
    tl = Timeline("r", "chat")
    f = OpenAIStreamFilter(tl, continuous=True, keep_usage_chunk=False, strip_usage=True)
    ev = b'data: {"error": {"message": "boom", "code": 500}}'
    assert f.process([ev], 1.0) == ev + b"\n\n"
    assert f.upstream_error is not None and "boom" in f.upstream_error


def test_error_event_ends_openai_stream() -> None:
    f = OpenAIStreamFilter(Timeline("r", "chat"), continuous=True, keep_usage_chunk=False, strip_usage=True)
    ev = _events(f.error_event(UpstreamBroken("gone", backend="b")))
    assert orjson.loads(ev[0][6:])["error"]["message"] == "gone"
    assert ev[1] == b"data: [DONE]"


def test_tgi_filter_counts_one_token_per_event() -> None:
    tl = Timeline("r", "tgi_generate_stream")
    f = TGIStreamFilter(tl)
    events = [
        b'data:{"index":1,"token":{"id":1,"text":" a","special":false}}',
        b'data:{"index":2,"token":{"id":2,"text":" b","special":false},"generated_text":" a b"}',
    ]
    assert f.process(events, 1.0) == b"\n\n".join(events) + b"\n\n"
    assert tl.chunk_tokens == [2]
    f.process([b'data:{"error":"oops","error_type":"generation"}'], 2.0)
    assert f.upstream_error is not None


def test_usage_span_removes_member_anywhere() -> None:
    from qtrap_proxy.openai_route import usage_span

    for obj in (
        {
            "id": "x",
            "choices": [{"delta": {"content": "a"}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2},
        },
        {
            "usage": {"prompt_tokens": 1, "prompt_tokens_details": {"cached_tokens": 0}},
            "id": "x",
            "choices": [],
        },
        {"id": "x", "usage": {"completion_tokens": 2, "d": {"e": {}}}, "choices": [{"text": '"usage":{'}]},
    ):
        payload = orjson.dumps(obj)
        span = usage_span(payload)
        assert span is not None
        assert orjson.loads(payload[span[2] : span[3]]) == obj["usage"]
        assert orjson.loads(payload[: span[0]] + payload[span[1] :]) == {
            k: v for k, v in obj.items() if k != "usage"
        }
    assert usage_span(b'{"choices":[{"delta":{"content":"\\"usage\\":{"}}]}') is None


def test_continuous_mode_falls_back_when_backend_ignores_it() -> None:
    tl = Timeline("r", "chat")
    f = OpenAIStreamFilter(tl, continuous=True, keep_usage_chunk=False, strip_usage=True)
    f.process([_chunk("a", None), _chunk("b", None), _chunk(None, (4, 2), choices=False)], 1.0)
    assert tl.chunk_tokens == [1, 1] and not tl.tokens_exact and tl.completion_tokens == 2


def _energy(rid: str = "r", joules: float | None = 2.5) -> dict[str, object]:
    from qtrap_proxy.proxy import AnswerEnergy
    from qtrap_proxy.usage import usage_members

    tl = Timeline(rid, "chat")
    tl.backend, tl.precision = "b", "int4"
    return usage_members(tl, AnswerEnergy(joules, None if joules else "why", joules is not None))


def test_usage_chunk_gets_energy_in_usage_only() -> None:
    tl = Timeline("r", "chat")
    f = OpenAIStreamFilter(
        tl, continuous=True, keep_usage_chunk=True, strip_usage=False, usage_extra=lambda: _energy()
    )
    content = _chunk("a", (7, 1))
    ev = _events(f.process([content, _chunk(None, (7, 1), choices=False), b"data: [DONE]"], 1.0))
    assert ev[0] == content and ev[2] == b"data: [DONE]"  # other chunks byte for byte
    obj = orjson.loads(ev[1][6:])
    assert "qtrap" not in obj and obj["choices"] == []
    assert obj["usage"] == {
        "prompt_tokens": 7,
        "completion_tokens": 1,
        "total_tokens": 8,
        "energy_j": 2.5,
        "qtrap": {
            "provisional": True,
            "request_id": "r",
            "record_url": "/qtrap/v1/requests/r",
            "backend": "b",
            "precision": "int4",
        },
    }


def test_slow_path_usage_chunk_gets_energy_too() -> None:
    # not vLLM (no continuous usage): the chunk goes through the parsing path
    tl = Timeline("r", "chat")
    f = OpenAIStreamFilter(
        tl,
        continuous=False,
        keep_usage_chunk=True,
        strip_usage=False,
        usage_extra=lambda: _energy(joules=None),
    )
    ev = _events(f.process([_chunk(None, (3, 4), choices=False)], 1.0))
    usage = orjson.loads(ev[0][6:])["usage"]
    assert usage["energy_j"] is None and usage["qtrap"]["energy_unknown_reason"] == "why"
    assert usage["qtrap"]["provisional"] is False and usage["completion_tokens"] == 4


def test_add_to_usage_compact_keeps_other_bytes() -> None:
    from qtrap_proxy.usage import add_to_usage

    body = b'{"id":"x","choices":[{"text":"\\"usage\\":{no"}],"usage":{"prompt_tokens":1,"d":{"a":1}},"z":1}'
    out = add_to_usage(body, {"energy_j": 1.5})
    assert out == (
        b'{"id":"x","choices":[{"text":"\\"usage\\":{no"}],'
        b'"usage":{"prompt_tokens":1,"d":{"a":1},"energy_j":1.5},"z":1}'
    )


def test_add_to_usage_other_layouts_and_none() -> None:
    from qtrap_proxy.usage import add_to_usage

    pretty = b'{\n  "id": "x",\n  "usage" : {\n    "prompt_tokens": 2,\n    "energy_j": 9\n  },\n  "z": 1\n}'
    out = add_to_usage(pretty, {"energy_j": None})
    # the indented layout kept outside the usage object; a member already there is replaced
    assert out == b'{\n  "id": "x",\n  "usage" : {"prompt_tokens":2,"energy_j":null},\n  "z": 1\n}'
    # a usage object that cannot be cut out alone (a brace inside a string): the whole document
    odd = b'{"usage" :{"note": "}{", "prompt_tokens": 1}}'
    assert orjson.loads(add_to_usage(odd, {"energy_j": 2.0}) or b"") == {
        "usage": {"note": "}{", "prompt_tokens": 1, "energy_j": 2.0}
    }
    assert add_to_usage(b'{"id":"x","usage":null}', {"energy_j": 1.0}) is None
    assert add_to_usage(b'{"id":"x"}', {"energy_j": 1.0}) is None
    assert add_to_usage(b"not json", {"energy_j": 1.0}) is None


def _resp_event(kind: str, **data: object) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **data})


def test_responses_stream_counts_deltas_and_puts_energy_in_the_completed_usage() -> None:
    from qtrap_proxy.responses_route import ResponsesStreamFilter

    tl = Timeline("r", "responses")
    f = ResponsesStreamFilter(tl, lambda: _energy())
    usage = {"input_tokens": 4, "output_tokens": 2, "total_tokens": 6}
    events = [
        _resp_event("response.created", response={"id": "x", "usage": None}),
        _resp_event("response.output_text.delta", delta=" a"),
        _resp_event("response.output_text.delta", delta=" b"),
        _resp_event("response.completed", response={"id": "x", "usage": usage}),
    ]
    ev = _events(f.process(events, 1.0))
    assert ev[:3] == events[:3]  # relayed byte for byte
    assert ev[3].startswith(b"event: response.completed\ndata: ")
    done = orjson.loads(ev[3].split(b"data: ", 1)[1])
    assert done["response"]["usage"] == {**usage, **_energy()}
    assert tl.chunk_tokens == [1, 1] and not tl.tokens_exact
    assert (tl.prompt_tokens, tl.completion_tokens) == (4, 2)


def test_responses_stream_error_event() -> None:
    from qtrap_proxy.responses_route import ResponsesStreamFilter

    f = ResponsesStreamFilter(Timeline("r", "responses"), lambda: _energy())
    ev = _events(f.error_event(UpstreamBroken("gone", backend="b")))
    assert len(ev) == 1 and ev[0].startswith(b"event: error\ndata: ")
    body = orjson.loads(ev[0].split(b"data: ", 1)[1])
    assert body["type"] == "error" and body["message"] == "gone"
    upstream = _resp_event("error", code="x", message="boom")
    assert f.process([upstream], 1.0) == upstream + b"\n\n" and f.upstream_error is not None
