"""One simulated backend: a served model on one simulated GPU, its engine and its metrics."""

from __future__ import annotations

import bisect
import itertools
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any, Literal

from opentelemetry.sdk.trace.export import SpanExporter
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from qtrap_common.asgi import run_until_disconnect
from qtrap_sim.engine import Engine, SimRequest
from qtrap_sim.gpu import SimGPU
from qtrap_sim.oracle import Oracle, default_hop_accuracy, load_problems
from qtrap_sim.perf import (
    CalibratedPerf,
    LinearPerf,
    PerfModel,
    ProfileError,
    kernel_of,
    load_profile,
    precision_labels,
)
from qtrap_sim.prefix_cache import PrefixCache
from qtrap_sim.textgen import ScriptedText, TextStream
from qtrap_sim.tracing import EngineClock, RequestTracer, SpanRequest

_KEEP_TRUTH = 100_000
_LAT = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKENS = (1, 8, 32, 128, 512, 2048, 8192, 32768)
# vLLM's bucket boundaries (vllm/v1/metrics/buckets.py)
# fmt: off
_VLLM_REQUEST_LATENCY = (0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 240, 480, 960, 1920,
                         7680)
_VLLM_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160,
              640, 2560)
_VLLM_ITL = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
_VLLM_ITERATION_TOKENS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# fmt: on


def _vllm_1_2_5(max_value: int) -> list[float]:
    """vLLM's ``build_1_2_5_buckets`` (per-request token counts): 1, 2, 5, 10, 20, 50, ... up to ``max_value``."""
    out: list[float] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return out
            out.append(m * scale)
        scale *= 10


class SimBackendConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    model: str = Field("qwen3-8b", description="model shape (and default served name)")
    served_model_name: str | None = None
    precision: str = "bf16"
    gpu: str = "h100"
    api: Literal["vllm", "tgi"] = "vllm"
    host: str = "127.0.0.1"
    port: int = Field(8101, ge=0, le=65535)
    max_num_seqs: int = Field(256, gt=0)
    max_model_len: int = Field(32768, gt=0)
    kernel: str | None = Field(None, description="calibrated kernel (default: from the precision label)")
    gpu_index: int = Field(0, ge=0, description="index of the simulated GPU in its DCGM metrics")
    step_ms: float | None = Field(
        None,
        ge=0,
        description="use the simple linear model with this fixed step time instead of the calibrated one",
    )
    per_seq_us: float = Field(20.0, ge=0, description="linear model: extra step time per row")
    oracle_data: list[str] = Field(
        default_factory=list, description="GSM8K .jsonl / MathQA .json files to answer"
    )
    think_tokens: int = Field(
        0, ge=0, description="oracle answers: mean words of <think> filler written before the answer"
    )
    prefix_caching: bool = Field(
        True, description="reuse cached prompt blocks as vLLM's automatic prefix caching does (its default)"
    )
    hop_accuracy: float | None = Field(
        None, ge=0, le=1, description="per-hop accuracy (default: by model, kernel)"
    )
    otlp_traces_endpoint: str | None = Field(
        None,
        description="vLLM's API: export each finished request's llm_request span (as vLLM's "
        "--otlp-traces-endpoint) over OTLP/HTTP to this full URL, e.g. http://127.0.0.1:4318/v1/traces",
    )
    otlp_batch_delay_ms: float = Field(
        100.0,
        gt=0,
        description="the span batch processor's schedule delay (vLLM runs the SDK's default, 5000 ms, "
        "unless OTEL_BSP_SCHEDULE_DELAY says otherwise)",
    )
    counter_update_ms: tuple[float, float] = Field(
        (85.0, 115.0),
        description="the GPU energy counter refreshes every [lo, hi] ms, uniformly drawn (an H100's NVML "
        "counter: 85-115 ms); shorter to study how attribution depends on the meter's granularity",
    )
    enable_prompt_tokens_details: bool = Field(
        False,
        description="vLLM's --enable-prompt-tokens-details: usage carries prompt_tokens_details.cached_tokens "
        "(the prompt's leading tokens found in the prefix cache, not prefilled again)",
    )
    clock_skew_s: float = Field(
        0.0,
        allow_inf_nan=False,
        description="the engine's wall clock in its spans is the true time plus this (the ground truth "
        "reports true time)",
    )

    @field_validator("counter_update_ms")
    @classmethod
    def _update_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not (1.0 <= lo <= hi <= 10_000.0):
            raise ValueError(f"must be [lo, hi] with 1 <= lo <= hi <= 10000 ms, got {list(v)}")
        return v

    @field_validator("otlp_traces_endpoint")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL (OTLP/HTTP, the full path: .../v1/traces)")
        return v

    @model_validator(mode="after")
    def _known_profile(self) -> SimBackendConfig:
        if self.otlp_traces_endpoint is not None and self.api != "vllm":
            raise ValueError("otlp_traces_endpoint: vLLM's API only (TGI reports its timing in headers)")
        if self.step_ms is None:
            self.perf_model()  # raises ProfileError (a ValueError) naming what is available
        for path in self.oracle_data:
            load_problems(path)  # raises OracleDataError (a ValueError) for unreadable or malformed files
        return self

    @property
    def kernel_name(self) -> str | None:
        return self.kernel or kernel_of(self.gpu, self.precision)

    def perf_model(self) -> PerfModel:
        if self.step_ms is not None:
            return LinearPerf(self.step_ms / 1e3, self.per_seq_us / 1e6)
        kernel = self.kernel_name
        if kernel is None:
            raise ProfileError(
                f"precision {self.precision!r} maps to no calibrated kernel on {self.gpu!r}; use one of "
                f"{', '.join(precision_labels(self.gpu))} or set kernel"
            )
        return CalibratedPerf(self.gpu, self.model, kernel)

    @property
    def served_name(self) -> str:
        return self.served_model_name or self.model

    @property
    def display_name(self) -> str:
        return self.name or f"{self.model}-{self.precision}"


class SimBackend:
    def __init__(
        self,
        cfg: SimBackendConfig,
        span_exporter: SpanExporter | None = None,
        clock: EngineClock | None = None,
    ) -> None:
        """``span_exporter``: where vLLM's spans go instead of ``cfg.otlp_traces_endpoint`` (tests);
        ``clock``: the engine's wall clock (default: anchored now, skewed by ``cfg.clock_skew_s``)."""
        self.cfg = cfg
        self.clock = clock if clock is not None else EngineClock(cfg.clock_skew_s)
        self.tracer: RequestTracer | None = None
        if cfg.api == "vllm" and (span_exporter is not None or cfg.otlp_traces_endpoint is not None):
            if span_exporter is not None:
                self.tracer = RequestTracer(
                    span_exporter,
                    self.clock,
                    instance=cfg.display_name,
                    batch_delay_ms=cfg.otlp_batch_delay_ms,
                )
            else:
                assert cfg.otlp_traces_endpoint is not None
                self.tracer = RequestTracer.otlp_http(
                    cfg.otlp_traces_endpoint,
                    self.clock,
                    instance=cfg.display_name,
                    batch_delay_ms=cfg.otlp_batch_delay_ms,
                )
        self.perf = cfg.perf_model()
        try:
            gpu_name = f"{load_profile(cfg.gpu).get('gpu_name', cfg.gpu)} (simulated)"
        except ProfileError:
            gpu_name = f"{cfg.gpu} (simulated)"
        self.prefix_cache = PrefixCache() if cfg.prefix_caching else None
        lo, hi = cfg.counter_update_ms
        self.gpu = SimGPU(cfg.gpu_index, gpu_name, self.perf.idle_power_w, update_s=(lo / 1000, hi / 1000))
        self.engine = Engine(
            self.perf, max_num_seqs=cfg.max_num_seqs, max_model_len=cfg.max_model_len, gpu=self.gpu
        )
        self.truth: OrderedDict[str, SimRequest] = OrderedDict()
        acc = (
            cfg.hop_accuracy
            if cfg.hop_accuracy is not None
            else default_hop_accuracy(cfg.model, cfg.kernel_name)
        )
        # always on: synthetic problems need no data files
        self.oracle = Oracle.from_files(cfg.oracle_data, acc)
        self.oracle_outcome: dict[str, dict[str, Any]] = {}
        self.registry = CollectorRegistry()
        self.started_unix_s = int(time.time())
        self.finished: dict[str, int] = {}
        self.m_prefix_queries: Any = None  # vLLM's API only
        self.m_prefix_hits: Any = None
        if cfg.api == "vllm":
            self._vllm_metrics()
        else:
            self._tgi_metrics()

    # -- metrics -------------------------------------------------------------
    def _vllm_metrics(self) -> None:
        """vLLM's metric families, names, types, labels and bucket boundaries (vllm/v1/metrics/loggers.py)."""
        r, name = self.registry, self.cfg.served_name
        labels = ("model_name", "engine")

        def hist(metric: str, doc: str, buckets: Iterable[float]) -> Histogram:
            return Histogram(metric, doc, labels, buckets=tuple(buckets), registry=r).labels(name, "0")

        self.m_prompt = Counter("vllm:prompt_tokens", "Prefill tokens processed", labels, registry=r).labels(
            name, "0"
        )
        self.m_gen = Counter(
            "vllm:generation_tokens", "Generation tokens processed", labels, registry=r
        ).labels(name, "0")
        # prefix caching (qtrap_sim/prefix_cache.py), counted in prompt tokens as vLLM counts them
        self.m_prefix_queries = Counter(
            "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.", labels,
            registry=r,
        ).labels(name, "0")  # fmt: skip
        self.m_prefix_hits = Counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            labels,
            registry=r,
        ).labels(name, "0")
        # the simulator never preempts (a request keeps its slot from admission to its end): always 0
        Counter(
            "vllm:num_preemptions", "Cumulative number of preemption from the engine.", labels, registry=r
        ).labels(name, "0")
        self.m_success = Counter(
            "vllm:request_success", "Finished requests", (*labels, "finished_reason"), registry=r
        )
        self.m_ttft = hist("vllm:time_to_first_token_seconds", "Time to first token", _VLLM_TTFT)
        self.m_e2e = hist(
            "vllm:e2e_request_latency_seconds", "End-to-end request latency", _VLLM_REQUEST_LATENCY
        )
        self.m_queue = hist(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            _VLLM_REQUEST_LATENCY,
        )
        self.m_prefill = hist(
            "vllm:request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            _VLLM_REQUEST_LATENCY,
        )
        self.m_decode = hist(
            "vllm:request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            _VLLM_REQUEST_LATENCY,
        )
        self.m_inference = hist(
            "vllm:request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            _VLLM_REQUEST_LATENCY,
        )
        self.m_tpot = hist(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            _VLLM_ITL,
        )
        per_request = _vllm_1_2_5(self.cfg.max_model_len)
        self.m_req_prompt = hist(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", per_request
        )
        self.m_req_gen = hist(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", per_request
        )
        self.m_iter_tokens = hist(
            "vllm:iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            _VLLM_ITERATION_TOKENS,
        )
        # every decoding request of a step has the same inter-token latency: one weighted observe per step
        self.m_itl = _StepHistogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            _VLLM_ITL,
            dict(zip(labels, (name, "0"), strict=True)),
        )
        r.register(self.m_itl)
        r.register(_EngineGauges(self, "vllm"))
        # as vLLM's iteration stats: prompt tokens when a prefill completes, generated tokens every step
        self.engine.on_step = self._count_step

    def _count_step(self, prefilled: int, generated: int, decoded: int, itl_s: float) -> None:
        if prefilled:
            self.m_prompt.inc(prefilled)
        if generated:
            self.m_gen.inc(generated)
        self.m_iter_tokens.observe(prefilled + generated)
        if decoded:
            self.m_itl.observe(itl_s, decoded)

    def _observe_finished(self, req: SimRequest, end: float) -> None:
        """A finished request's histograms, as vLLM's FinishedRequestStats.

        queued = admitted - arrival; prefill = first token - admitted; decode = last token - first token;
        inference = last token - admitted (prefill + decode); time per output token = decode / (tokens - 1).
        A request that produced no token has 0 for all of them (vLLM clamps them so); one never admitted
        waited until it ended.
        """
        admitted = req.admitted_at if req.admitted_at is not None else end
        self.m_queue.observe(admitted - req.arrival)
        first, last = req.first_token_at, req.last_token_at
        prefill = decode = inference = 0.0
        if first is not None and last is not None:
            prefill, decode, inference = first - admitted, last - first, last - admitted
        self.m_prefill.observe(prefill)
        self.m_decode.observe(decode)
        self.m_inference.observe(inference)
        self.m_tpot.observe(decode / (req.generated - 1) if req.generated > 1 else 0.0)
        self.m_req_prompt.observe(req.prompt_tokens)
        self.m_req_gen.observe(req.generated)

    def _tgi_metrics(self) -> None:
        r = self.registry
        # as TGI: histograms of each request's input length (at arrival) and generated tokens (at its end)
        self.m_input_len = Histogram(
            "tgi_request_input_length", "Input tokens per request", buckets=_TOKENS, registry=r
        )
        self.m_gen_tokens = Histogram(
            "tgi_request_generated_tokens", "Generated tokens per request", buckets=_TOKENS, registry=r
        )
        self.m_success = Counter(
            "tgi_request_success", "Requests that finished", ("finished_reason",), registry=r
        )
        self.m_ttft = Histogram(
            "tgi_request_queue_duration", "Time queued before the first token", buckets=_LAT, registry=r
        )
        self.m_e2e = Histogram("tgi_request_duration", "Request duration", buckets=_LAT, registry=r)
        self.m_queue = self.m_ttft
        r.register(_EngineGauges(self, "tgi"))

    @asynccontextmanager
    async def lifespan(self, _app: object) -> AsyncIterator[None]:
        """Starlette lifespan: the engine runs while the server does."""
        self.engine.start()
        self.gpu.start()
        try:
            yield
        finally:
            await self.engine.stop()
            await self.gpu.stop()
            if self.tracer is not None:
                await self.tracer.shutdown()  # flushes the spans still queued, bounded

    def common_routes(self) -> list[Route]:
        """``/health``, ``/metrics`` (with the GPU's DCGM fields) and the ground-truth routes, for both APIs."""

        async def health(_: Request) -> Response:
            return Response(b"", status_code=200)

        async def metrics(_: Request) -> Response:
            body = generate_latest(self.registry) + self.gpu.dcgm_text().encode()
            return Response(body, media_type=CONTENT_TYPE_LATEST)

        async def dcgm(_: Request) -> Response:
            return Response(self.gpu.dcgm_text().encode(), media_type=CONTENT_TYPE_LATEST)

        async def truth(request: Request) -> Response:
            rid = request.path_params["request_id"]
            req = self.truth.get(rid)
            if req is None:
                return JSONResponse({"error": f"no request {rid!r}"}, status_code=404)
            return JSONResponse(self.truth_record(req))

        async def energy(_: Request) -> Response:
            total = self.gpu.energy_j()
            busy = self.engine.stats.request_energy_j
            return JSONResponse(
                {
                    "gpu": self.gpu.index,
                    "model": self.cfg.model,
                    "precision": self.cfg.precision,
                    "perf_model": type(self.perf).__name__,
                    "energy_j": total,
                    "requests_j": busy,
                    "idle_j": total - busy,
                    "counter_mj": self.gpu.counter_mj,
                    "steps": self.engine.stats.steps,
                    "slip_s_max": self.engine.stats.slip_s_max,
                    "slip_s_mean": self.engine.stats.slip_s_total / max(1, self.engine.stats.steps),
                    "busy_s": self.engine.stats.busy_s,
                }
            )

        return [
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/dcgm/metrics", dcgm, methods=["GET"]),
            Route("/sim/v1/requests/{request_id}", truth, methods=["GET"]),
            Route("/sim/v1/energy", energy, methods=["GET"]),
        ]

    def truth_record(self, req: SimRequest) -> dict[str, Any]:
        """What a request really cost, and the engine's timestamps in true unix seconds (without the
        configured clock skew, which ``clock_skew_s`` states: the engine's spans are that much ahead)."""
        c = self.clock
        return {
            "id": req.id,
            "energy_j": req.true_energy_j,
            "prompt_tokens": req.prompt_tokens,
            "completion_tokens": req.generated,
            "steps": req.steps,
            "finish_reason": req.finish_reason,
            "finished": req.done,
            "oracle": self.oracle_outcome.get(req.id),
            "arrival_unix_s": c.true_unix_s(req.arrival),
            "admitted_unix_s": c.true_unix_s(req.admitted_at),
            "first_token_unix_s": c.true_unix_s(req.first_token_at),
            "last_token_unix_s": c.true_unix_s(req.last_token_at),
            "finished_unix_s": c.true_unix_s(req.finished_at),
            "clock_skew_s": c.skew_s,
        }

    @staticmethod
    async def collect(gen: AsyncGenerator[tuple[str, int]], receive: Any) -> str | None:
        """The whole answer of a non-streaming request, or None if its client went away first."""
        parts: list[str] = []

        async def run() -> None:
            async for t, _ in gen:
                parts.append(t)

        if await run_until_disconnect(run(), receive):
            await gen.aclose()
            return None
        return "".join(parts)

    # -- generation ------------------------------------------------------------
    def new_request(
        self,
        request_id: str | None,
        prompt: str,
        prompt_tokens: int,
        max_tokens: int,
        seed: int | None,
        temperature: float,
        ignore_eos: bool = False,
    ) -> tuple[SimRequest, TextStream | ScriptedText]:
        """A request and the text it will write: the oracle's reply if it knows the problem, else filler.
        ``ignore_eos`` (vLLM's sampling parameter): the answer runs on to ``max_tokens`` with filler after
        the oracle's reply ends."""
        req = SimRequest(request_id or uuid.uuid4().hex, prompt_tokens, max_tokens)
        if self.prefix_cache is not None:
            before = self.prefix_cache.stats.hits
            req.cached_tokens = min(self.prefix_cache.admit(prompt.split()), max(0, prompt_tokens - 1))
            if self.m_prefix_queries is not None and self.m_prefix_hits is not None:
                self.m_prefix_queries.inc(prompt_tokens)
                self.m_prefix_hits.inc(min(req.cached_tokens, self.prefix_cache.stats.hits - before))
        text: TextStream | ScriptedText = TextStream(prompt, seed, temperature)
        reply = self.oracle.respond(prompt, seed, temperature)
        if reply is not None:
            answer = reply.text
            if self.cfg.think_tokens > 0:
                # a reasoning model thinks before it answers: filler words in a <think> block
                rng = random.Random(f"{seed}:{prompt}")
                n = max(1, round(self.cfg.think_tokens * rng.uniform(0.5, 1.5)))
                answer = f"<think>{TextStream(prompt, seed, temperature).next_words(n)} </think>\n{answer}"
            text = ScriptedText(answer, then=TextStream(prompt, seed, temperature) if ignore_eos else None)
            if len(text) <= max_tokens and not ignore_eos:
                req.max_tokens, req.stop_at_end = len(text), True
            self.oracle_outcome[req.id] = reply.outcome
        self.truth[req.id] = req
        if len(self.truth) > _KEEP_TRUTH:
            old, _ = self.truth.popitem(last=False)
            self.oracle_outcome.pop(old, None)
        return req, text

    async def generate(
        self,
        req: SimRequest,
        text: TextStream | ScriptedText,
        stop: Iterable[str],
        span: SpanRequest | None = None,
    ) -> AsyncGenerator[tuple[str, int]]:
        """Yield (text, tokens) as the engine produces tokens; abort the request if the consumer stops.

        ``span``: with tracing on (vLLM's API), the request's ``llm_request`` span is recorded as soon as
        this front end sees it finish, as vLLM's output processor does; an aborted request gets none.
        """
        stops = [s for s in stop if s]
        tail = ""
        sent = 0
        tracer = self.tracer if span is not None else None
        first_seen: float | None = None  # the front end's first token (vLLM's first_token_latency)
        traced = False

        def trace_finished() -> None:
            nonlocal traced
            if tracer is None or span is None or traced or req.finish_reason in (None, "abort"):
                return
            traced = True
            tracer.record(req, span, first_seen, time.monotonic())

        self.engine.submit(req)
        if self.cfg.api == "tgi":
            self.m_input_len.observe(req.prompt_tokens)
        try:
            while not req.done or sent < req.generated:
                await req.wait_progress()
                if first_seen is None and req.generated > 0:
                    first_seen = time.monotonic()
                if req.done:
                    trace_finished()
                n = req.generated - sent
                if n <= 0:
                    continue
                delta = text.next_words(n)
                sent += n
                if stops:
                    window = tail + delta
                    cut = min((i for i in (window.find(s) for s in stops) if i >= 0), default=-1)
                    if cut >= 0:
                        delta = window[:cut][len(tail) :] if cut >= len(tail) else ""
                        self.engine.finish(req, "stop")
                        trace_finished()
                        if delta:
                            yield delta, n
                        break
                    tail = window[-64:]
                yield delta, n
        finally:
            trace_finished()  # finished in the engine while its consumer was away: vLLM traced it then
            if not req.done:
                self.engine.finish(req, "abort")
            if self.cfg.api == "tgi":
                self.m_gen_tokens.observe(req.generated)
            reason = req.finish_reason or "abort"
            self.m_success.labels(*self._success_labels(reason)).inc()
            end = req.finished_at or time.monotonic()
            self.m_e2e.observe(end - req.arrival)
            if req.first_token_at is not None:
                self.m_ttft.observe(req.first_token_at - req.arrival)
            if self.cfg.api == "vllm":
                self._observe_finished(req, end)
            self.finished[reason] = self.finished.get(reason, 0) + 1

    def _success_labels(self, reason: str) -> tuple[str, ...]:
        if self.cfg.api == "vllm":
            return (self.cfg.served_name, "0", reason)
        return (reason,)


class _StepHistogram(Collector):
    """A histogram that takes a value with a count: one observe for a step's many equal samples."""

    def __init__(self, name: str, doc: str, buckets: Iterable[float], labels: dict[str, str]) -> None:
        self.name, self.doc, self.labels = name, doc, labels
        self.bounds = [float(b) for b in buckets]
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf's
        self.sum = 0.0

    def observe(self, value: float, count: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += count  # a bucket holds values <= its bound
        self.sum += value * count

    def collect(self) -> Iterable[HistogramMetricFamily]:
        h = HistogramMetricFamily(self.name, self.doc, labels=list(self.labels))
        cumulative = itertools.accumulate(self.counts)
        les = [*map(floatToGoString, self.bounds), "+Inf"]
        h.add_metric(list(self.labels.values()), list(zip(les, cumulative, strict=True)), self.sum)
        yield h


class _EngineGauges(Collector):
    """Gauges read from the engine at scrape time."""

    def __init__(self, backend: SimBackend, api: str) -> None:
        self.b = backend
        self.api = api

    def collect(self) -> Iterable[GaugeMetricFamily]:
        eng = self.b.engine
        capacity = eng.max_model_len * eng.max_num_seqs
        kv = min(1.0, eng.kv_tokens / capacity) if capacity else 0.0
        if self.api == "vllm":
            labels = ["model_name", "engine"]
            values = [self.b.cfg.served_name, "0"]
            for name, doc, v in (
                ("vllm:num_requests_running", "Requests in model execution batches", len(eng.running)),
                ("vllm:num_requests_waiting", "Requests waiting to be processed", len(eng.waiting)),
                ("vllm:kv_cache_usage_perc", "KV-cache usage (1 means 100 percent)", kv),
            ):
                g = GaugeMetricFamily(name, doc, labels=labels)
                g.add_metric(values, v)
                yield g
        else:
            yield GaugeMetricFamily("tgi_queue_size", "Requests waiting", value=len(eng.waiting))
            yield GaugeMetricFamily(
                "tgi_batch_current_size", "Requests in the running batch", value=len(eng.running)
            )
