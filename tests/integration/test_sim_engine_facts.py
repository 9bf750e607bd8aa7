"""qtrap-sim as a process with --otlp-traces-endpoint and --clock-skew-s: its spans reach an OTLP/HTTP
receiver on loopback, skewed against the ground truth's true timestamps, and the ones still batched when
it is stopped (SIGTERM) are flushed on the way out."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.helpers import backend, free_port, proxy, sim

SKEW_S = -2.5
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"


class Receiver:
    """A tiny OTLP/HTTP trace receiver in a thread of its own."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.lock = threading.Lock()
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _traces(self, request: web.Request) -> web.Response:
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(await request.read())
        with self.lock:
            self.spans += [s for rs in msg.resource_spans for ss in rs.scope_spans for s in ss.spans]
        return web.Response(body=b"", content_type="application/x-protobuf")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> Receiver:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *_: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


def test_spans_reach_the_receiver_skewed_and_are_flushed_at_exit(receiver: Receiver) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    endpoint = f"http://127.0.0.1:{receiver.port}/v1/traces"
    truth = {}
    # a batch delay far longer than the test: the spans go out only when the server stops
    with sim(port, "--step-ms", "2", "--otlp-traces-endpoint", endpoint, "--otlp-batch-delay-ms", "600000",
             "--clock-skew-s", str(SKEW_S)):  # fmt: skip
        for i, stream in enumerate((False, True)):
            rid = f"facts-{i}"
            r = requests.post(
                url + "/v1/chat/completions",
                headers={"x-request-id": rid, "traceparent": f"00-{TRACE_ID}-{i + 1:016x}-01"},
                json={"model": "qwen3-8b", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5,
                      "stream": stream},
                timeout=30,
            )  # fmt: skip
            assert r.status_code == 200
            truth[f"chatcmpl-{rid}"] = requests.get(f"{url}/sim/v1/requests/{rid}", timeout=5).json()
        with receiver.lock:
            assert receiver.spans == []
    with receiver.lock:
        spans = {s.name + ":" + _attr(s, "gen_ai.request.id"): s for s in receiver.spans}
    assert sorted(spans) == ["llm_request:chatcmpl-facts-0", "llm_request:chatcmpl-facts-1"]
    for i, (rid, t) in enumerate(sorted(truth.items())):
        span = spans["llm_request:" + rid]
        assert span.trace_id.hex() == TRACE_ID and span.parent_span_id.hex() == f"{i + 1:016x}"
        assert span.start_time_unix_nano / 1e9 - t["arrival_unix_s"] == pytest.approx(SKEW_S, abs=1e-6)
        assert t["clock_skew_s"] == SKEW_S
        attrs = {kv.key: kv.value for kv in span.attributes}
        assert attrs["gen_ai.usage.completion_tokens"].int_value == t["completion_tokens"] == 5
        assert attrs["gen_ai.usage.prompt_tokens"].int_value == t["prompt_tokens"]
        queue = attrs["gen_ai.latency.time_in_queue"].double_value
        inference = attrs["gen_ai.latency.time_in_model_inference"].double_value
        assert queue == pytest.approx(t["admitted_unix_s"] - t["arrival_unix_s"], abs=1e-6)
        assert inference == pytest.approx(t["last_token_unix_s"] - t["admitted_unix_s"], abs=1e-6)


def _attr(span: Span, key: str) -> str:
    return str(next(kv.value.string_value for kv in span.attributes if kv.key == key))


def test_prefix_cache_hits_reach_the_record(tmp_path: Path) -> None:
    """A simulated vLLM with --enable-prompt-tokens-details behind the proxy: the same long prompt twice,
    streamed and not; the second request's record says how much of it the prefix cache held (its whole
    16-token blocks)."""
    port, pport = free_port(), free_port()
    prompt = "the same long prompt " * 50
    config = {"server": {"port": pport}, "backends": [backend("b", port)]}
    with sim(port, "--step-ms", "2", "--enable-prompt-tokens-details"), proxy(tmp_path, config):
        url = f"http://127.0.0.1:{pport}"
        records = []
        for i, stream in enumerate((False, True)):
            body: dict[str, Any] = {"model": "qwen3-8b", "prompt": prompt, "max_tokens": 4, "stream": stream}
            r = requests.post(
                url + "/v1/completions", json=body, headers={"X-Request-Id": f"pc-{i}"}, timeout=30
            )
            assert r.status_code == 200, r.text
            rid = r.headers["x-qtrap-request-id"]
            records.append(requests.get(f"{url}/qtrap/v1/requests/{rid}", timeout=5).json())
        first, second = records
        assert first["cached_tokens"] == 0
        assert second["prompt_tokens"] == first["prompt_tokens"] >= 200
        n = second["prompt_tokens"]
        assert second["cached_tokens"] == min(16 * (n // 16), n - 1)  # whole 16-token blocks, as vLLM
