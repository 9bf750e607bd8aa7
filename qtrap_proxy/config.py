"""Typed configuration: one YAML file, overridable by ``QTRAP_...`` environment variables.

Nested keys use ``__`` in variable names: ``QTRAP_SERVER__PORT=9000`` overrides
``server.port``; list-valued keys take JSON (``QTRAP_BACKENDS='[...]'``).
Environment values win over the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from qtrap_proxy.errors import ConfigError
from qtrap_proxy.ledger_pg import check_url
from qtrap_proxy.redact import redact_url

BackendKind = Literal["vllm", "tgi", "openai"]

_DEFAULT_HEALTH_PATH: dict[str, str] = {"vllm": "/health", "tgi": "/health", "openai": "/v1/models"}
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")  # an HTTP header name (RFC 9110 token), lower case
# headers the proxy sets itself or that describe one hop: never taken from a client by name
_NOT_FORWARDABLE = frozenset(
    {
        "accept-encoding",
        "connection",
        "content-encoding",
        "content-length",
        "content-type",
        "cookie",
        "expect",
        "host",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "x-request-id",
        "traceparent",
        "tracestate",
    }
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0, description="requests with a larger body get 413")
    health_timeout_s: float = Field(2.0, gt=0, description="per-backend probe timeout of GET /health")
    shutdown_timeout_s: float = Field(
        10.0,
        gt=0,
        allow_inf_nan=False,
        description="on SIGTERM/SIGINT the process exits within this many seconds: in-flight requests get "
        "half of it to finish (then they are cut), the rest finalises energy and flushes the ledger",
    )
    max_connections: int = Field(
        4096,
        gt=0,
        description="open client connections (uvicorn's limit_concurrency): beyond it new requests get 503, "
        "and a connection opened while 128 more than this are open gets 503 and is closed at once; "
        "each relayed request also holds an upstream connection, so the file-descriptor limit is raised "
        "to 2 x this + 256 at start when the hard limit allows (a warning names the shortfall)",
    )
    backlog: int = Field(
        2048, gt=0, description="listen backlog: connections the kernel queues before accept"
    )
    max_inflight_requests: int = Field(
        1024,
        gt=0,
        description="requests in flight on the serving routes; beyond it they get 503 with Retry-After "
        "before their body is read (load shedding)",
    )
    shed_retry_after_s: int = Field(1, ge=0, description="Retry-After (seconds) of a shed request's 503")
    max_headers: int = Field(100, gt=0, description="header lines a request may carry; beyond it 431")
    max_header_bytes: int = Field(
        65536, gt=0, description="bytes of a request's header names and values together; beyond it 431"
    )
    header_timeout_s: float = Field(
        60.0,
        gt=0,
        allow_inf_nan=False,
        description="longest a request's head may take from the connection's start (or the first byte of "
        "a next request); then 408 and the connection is closed",
    )
    body_timeout_s: float = Field(
        60.0,
        gt=0,
        allow_inf_nan=False,
        description="longest silence while a request body is read; then 408 and the connection is closed",
    )
    health_cache_s: float = Field(
        1.0,
        ge=0,
        allow_inf_nan=False,
        description="GET /health answers from a probe at most this old (0: none)",
    )
    forward_headers: list[str] = Field(
        default_factory=list,
        description="client request headers forwarded upstream on the relay routes, by name (case-"
        "insensitive; default none). Not allowed: authorization (with auth off the client's is forwarded "
        "unless the backend has an api_key; with auth on never), x-qtrap-* and the headers the proxy sets "
        "itself or that describe one connection (host, content-*, x-request-id, traceparent, ...)",
    )

    @field_validator("forward_headers")
    @classmethod
    def _forwardable(cls, v: list[str]) -> list[str]:
        out: list[str] = []
        for raw in v:
            name = raw.strip().lower()
            if not _TOKEN.fullmatch(name):
                raise ValueError(f"{raw!r} is not an HTTP header name")
            if name == "authorization":
                raise ValueError(
                    "authorization is not forwarded by name: with auth off the client's goes upstream unless "
                    "the backend has an api_key; with auth on it is a qtrap key and never leaves the proxy"
                )
            if name.startswith("x-qtrap-") or name in _NOT_FORWARDABLE:
                raise ValueError(f"{name} is set by the proxy itself and cannot be forwarded")
            if name not in out:
                out.append(name)
        return out


class Timeouts(_Strict):
    connect_s: float = Field(5.0, gt=0, description="TCP connect to the backend")
    read_s: float = Field(
        600.0, gt=0, description="longest silence from the backend (first byte or between chunks)"
    )


class Device(_Strict):
    host: str = "localhost"
    index: int = Field(0, ge=0)


class BackendConfig(_Strict):
    name: str = Field(min_length=1)
    pool: str = Field(min_length=1)
    precision: str = Field(min_length=1)
    kind: BackendKind = "vllm"
    url: str
    model: str = Field(min_length=1, description="the model id the upstream serves")
    devices: list[Device] = Field(default_factory=list)
    api_key: SecretStr | None = None
    timeouts: Timeouts = Field(default_factory=Timeouts)
    health_path: str | None = None
    max_connections: int = Field(4096, gt=0)
    transport: Literal["aiohttp", "pyreqwest"] = Field(
        "aiohttp",
        description="the HTTP client of the upstream leg (qtrap_proxy/transport.py); pyreqwest is experimental "
        "and needs `pip install pyreqwest`",
    )
    token_counters: bool = Field(
        False,
        description="read the backend's own token counters (vllm or tgi /metrics) so that work other proxy "
        "replicas or clients sent to it is not attributed to this proxy's requests",
    )
    metrics_path: str = Field("/metrics", description="token_counters: the backend's Prometheus page")
    expose_address: bool = Field(
        False,
        description="name the backend's address in the 502/504 answers clients get (default: its name only)",
    )
    engine_facts: Literal["otlp", "headers", "none"] = Field(
        "none",
        description="where the engine's own per-request timing comes from: otlp (vLLM's llm_request spans, "
        "sent to the proxy's otlp_receiver; start vLLM with --otlp-traces-endpoint), headers (TGI's "
        "x-queue-time and x-inference-time on non-streaming answers), none (the proxy's own view)",
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")

    @field_validator("pool", "precision")
    @classmethod
    def _no_at(cls, v: str) -> str:
        if "@" in v:
            raise ValueError("must not contain '@' (clients use 'pool@precision' to pin a precision)")
        return v

    @model_validator(mode="after")
    def _counters(self) -> BackendConfig:
        if self.token_counters and self.kind == "openai":
            raise ValueError(
                "token_counters: needs kind vllm or tgi (a generic OpenAI server exports no token counters)"
            )
        if self.token_counters and not self.devices:
            raise ValueError("token_counters: the backend lists no devices to attribute on")
        if self.engine_facts == "headers" and self.kind != "tgi":
            raise ValueError("engine_facts: headers needs kind tgi (TGI's timing headers)")
        return self

    @property
    def display_url(self) -> str:
        """The URL without credentials, for /health, logs and reports."""
        return redact_url(self.url)

    @property
    def metrics_url(self) -> str:
        return self.url + (
            self.metrics_path if self.metrics_path.startswith("/") else "/" + self.metrics_path
        )

    @property
    def effective_health_path(self) -> str:
        return self.health_path or _DEFAULT_HEALTH_PATH[self.kind]


class CostConfig(_Strict):
    """``pools.<name>.cost``: the knobs of the cost routing policy (qtrap_proxy/cost.py; README, "Routing by
    cost")."""

    accuracy: dict[str, float] = Field(
        default_factory=dict,
        description="accuracy per precision (0 < a <= 1); a precision not listed takes the live scores of "
        "POST /qtrap/v1/chains/{id}/score once min_scored chains are scored, else 1.0",
    )
    min_accuracy: float | None = Field(
        None, gt=0, le=1, description="precisions whose accuracy is below this are not candidates"
    )
    max_accuracy_loss: float | None = Field(
        None,
        ge=0,
        le=1,
        description="precisions whose accuracy is more than this below the default precision's are not candidates",
    )
    min_scored: int = Field(
        20, ge=1, description="live accuracy: chains a precision needs scored before their accuracy is used"
    )
    ttft_p95_s: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="a backend whose recent p95 time to first token exceeds this is not a candidate",
    )
    itl_p95_s: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="a backend whose recent p95 inter-token latency exceeds this is not a candidate",
    )
    latency_window_s: float = Field(
        120.0, gt=0, allow_inf_nan=False, description="the latency budgets look at this many recent seconds"
    )
    max_inflight: int | None = Field(
        None, gt=0, description="a backend with this many requests in flight is not a candidate"
    )
    decay_s: float = Field(
        600.0,
        gt=0,
        allow_inf_nan=False,
        description="half-life of an observation's weight in the cost curves",
    )
    explore: float = Field(
        0.02, ge=0, le=0.5, description="share of decisions sent to a random candidate other than the best"
    )
    hysteresis: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="the current best is kept unless another candidate is cheaper by more than this fraction",
    )
    sticky_chains: bool = Field(True, description="a chain's hops stay on the precision its first hop got")
    sticky_max: int = Field(100_000, gt=0, description="chains remembered for sticky_chains (LRU)")
    sticky_max_ratio: float | None = Field(
        1.5,
        ge=1,
        allow_inf_nan=False,
        description="a sticky chain is routed afresh when its precision costs more than this times the "
        "cheapest candidate (null: chains never move)",
    )
    seed_report: str | None = Field(
        None, description="a loadgen report.json whose per-precision, per-concurrency J/token seed the model"
    )
    seed_n: float = Field(
        5.0, gt=0, allow_inf_nan=False, description="seconds of measurement one seeded level counts as"
    )
    probe_s: float = Field(
        5.0,
        ge=0,
        allow_inf_nan=False,
        description="the backends' health is probed this often while the proxy runs (0: only by GET /health)",
    )
    down_s: float = Field(
        10.0,
        ge=0,
        allow_inf_nan=False,
        description="a backend that could not be reached is not a candidate for this long (or until a probe "
        "says it is up)",
    )

    @field_validator("accuracy")
    @classmethod
    def _accuracies(cls, v: dict[str, float]) -> dict[str, float]:
        for precision, a in v.items():
            if not (isinstance(a, int | float) and 0 < a <= 1):
                raise ValueError(f"{precision}: must be a number in (0, 1], got {a!r}")
        return v


class PoolConfig(_Strict):
    default_precision: str | None = None
    routing: Literal["round_robin", "cost"] = Field(
        "round_robin",
        description="round_robin: the default precision (or the pinned one), replicas in turn; cost: an unpinned "
        "request goes to the precision and replica of lowest expected energy per correct answer",
    )
    cost: CostConfig = Field(default_factory=CostConfig)


class MeterConfig(_Strict):
    kind: Literal["nvml", "dcgm", "null"] = "null"
    urls: list[str] = Field(default_factory=list, description="dcgm: exporter metrics URLs, one per node")
    interval_s: float = Field(0.02, gt=0, description="sampling cadence")
    counters_interval_s: float = Field(
        0.1, gt=0, description="polling cadence of the backends' token counters (backends[].token_counters)"
    )
    settle_s: float = Field(
        10.0,
        ge=0,
        description="longest an interval waits for in-flight requests' token facts before it is split",
    )
    policy: Literal["full", "active"] = "full"
    prefill_weight: float = Field(
        0.1, ge=0, description="work of one prompt token relative to one decode token"
    )
    idle_power_w: float | None = Field(
        None, ge=0, description="active policy: idle power (default: estimated)"
    )
    work_model: Literal["rows", "shared"] = Field(
        "shared",
        description="how an interval's energy is shared by the requests in it: rows (by work: decode tokens, "
        "prompt tokens x prefill_weight) or shared (learnt per device: a part shared, at each moment, by "
        "whatever runs then, and parts per prompt row, per decoded token by batch and per KV read, with the "
        "busy time reads and prompt rows add; docs/design.md)",
    )
    compare_views: bool = Field(
        False,
        description="also attribute each interval by the proxy's own view alone, so that records of requests "
        "with engine facts show both figures (energy_proxy_view_j); for evaluating engine facts",
    )
    hop_split_regex: str = Field(r"\n", description="x-qtrap-hop-split: regex splits hops where this matches")

    @model_validator(mode="after")
    def _urls(self) -> MeterConfig:
        if self.kind == "dcgm" and not self.urls:
            raise ValueError("meter.urls: the dcgm meter needs at least one exporter URL")
        try:
            re.compile(self.hop_split_regex)
        except re.error as e:
            raise ValueError(f"meter.hop_split_regex: not a regular expression: {e}") from e
        return self


class OtlpReceiverConfig(_Strict):
    """The OTLP/HTTP trace receiver (engine facts from vLLM's ``llm_request`` spans): off by default."""

    enabled: bool = Field(False, description="listen for OTLP/HTTP traces at POST /v1/traces")
    host: str = Field("127.0.0.1", description="address to listen on (the engines' side, not the clients')")
    port: int = Field(4318, ge=0, le=65535, description="port (4318 is OTLP/HTTP's; 0 picks a free one)")
    max_body_bytes: int = Field(
        8 * 1024 * 1024,
        gt=0,
        le=256 * 1024 * 1024,
        description="largest export request accepted (413 beyond)",
    )
    wait_s: float = Field(
        6.0,
        ge=0,
        le=600,
        allow_inf_nan=False,
        description="how long an interval waits for an ended request's span before it is split without it "
        "(at most meter.settle_s; OpenTelemetry's batch exporter sends every 5 s by default, so set "
        "OTEL_BSP_SCHEDULE_DELAY lower on the engine for faster final figures)",
    )


class LedgerConfig(_Strict):
    path: str = Field("qtrap-ledger.sqlite", description="the SQLite ledger's file (unless url is set)")
    url: str | None = Field(
        None,
        description="a PostgreSQL ledger, postgresql://user@host:port/database, that several proxy replicas "
        "write (the fleet ledger); instead of path. Its password: in the URL, or better in password_env",
    )
    password_env: str = Field(
        "QTRAP_LEDGER_PASSWORD",
        description="environment variable holding the PostgreSQL password when the URL has none "
        "(libpq's PGPASSWORD and ~/.pgpass work too)",
    )
    retention_days: float | None = Field(30.0, gt=0, description="records older than this are deleted")
    batch_s: float = Field(0.05, gt=0, description="longest wait before a batch of records is committed")

    @field_validator("url")
    @classmethod
    def _pg_url(cls, v: str | None) -> str | None:
        return None if v is None else check_url(v)

    @field_validator("password_env")
    @classmethod
    def _password_env(cls, v: str) -> str:
        if not _ENV_NAME.fullmatch(v):
            raise ValueError("must be an environment variable name ([A-Za-z_][A-Za-z0-9_]*)")
        return v


class OtelExportConfig(_Strict):
    """``otel_export``: one OpenTelemetry span per request, sent over OTLP/HTTP (otel.py); off by default."""

    enabled: bool = Field(False, description="export one span per request when its energy is final")
    endpoint: str = Field(
        "http://127.0.0.1:4318/v1/traces",
        description="the collector's OTLP/HTTP traces URL, path included (protobuf is sent)",
    )
    headers: dict[str, SecretStr] = Field(
        default_factory=dict, description="headers sent with each export (e.g. an API key); never logged"
    )
    service_name: str = Field("qtrap-proxy", min_length=1, description="the resource's service.name")
    timeout_s: float = Field(10.0, gt=0, le=300, allow_inf_nan=False, description="one export's limit")
    batch_delay_ms: int = Field(
        1000, ge=1, le=60_000, description="longest a finished span waits in the batch before it is sent"
    )
    max_queue: int = Field(
        8192, ge=1, description="spans held for export; beyond, new ones are dropped (the SDK counts them)"
    )

    @field_validator("endpoint")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v


class CarbonConfig(_Strict):
    """``carbon``: the grid's carbon intensity and the PUE, for each record's ``co2e_g`` (carbon.py). At
    most one source of the intensity; none: ``co2e_g`` is null with the reason, never 0."""

    intensity_g_per_kwh: float | None = Field(
        None, ge=0, allow_inf_nan=False, description="a constant grid carbon intensity, gCO2e per kWh"
    )
    file: str | None = Field(
        None,
        description="a time series of the intensity: CSV (`timestamp,g_per_kwh` rows, a header line allowed) "
        "or JSON (a list of {timestamp, g_per_kwh}); timestamps Unix seconds or RFC 3339; read at start",
    )
    url: str | None = Field(
        None,
        description="polled every poll_s: a JSON answer, a number, {g_per_kwh[, timestamp]}, or a list of "
        "points as in `file`; each value is kept with the time it was read (or its own timestamp)",
    )
    poll_s: float = Field(300.0, ge=1, allow_inf_nan=False, description="url: seconds between polls")
    timeout_s: float = Field(10.0, gt=0, allow_inf_nan=False, description="url: one poll's limit")
    max_age_s: float = Field(
        7200.0,
        gt=0,
        allow_inf_nan=False,
        description="file, url: a point older than this at the request's time is not used (the intensity "
        "is unknown then, with the reason)",
    )
    pue: float = Field(
        1.0,
        ge=1,
        le=10,
        allow_inf_nan=False,
        description="power usage effectiveness: the facility's energy over the IT equipment's; the GPU "
        "energy is multiplied by it before the intensity and the price (1.0: the GPU's energy alone)",
    )

    @model_validator(mode="after")
    def _one_source(self) -> CarbonConfig:
        given = [k for k in ("intensity_g_per_kwh", "file", "url") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"carbon: give one of intensity_g_per_kwh, file, url (got {', '.join(given)})")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError("carbon.url: must start with http:// or https://")
        return self

    @property
    def configured(self) -> bool:
        return any(getattr(self, k) is not None for k in ("intensity_g_per_kwh", "file", "url"))


class PricingConfig(_Strict):
    """``pricing``: the price of electricity, for each record's ``cost`` (``pools.<name>.cost`` is the
    cost routing policy's knobs, hence another name)."""

    price_per_kwh: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="price of one kWh (null: cost stays null, with the reason)",
    )
    currency: str = Field(
        "USD",
        pattern=r"^[A-Z]{3}$",
        description="ISO 4217 code of price_per_kwh (a label of the cost metric)",
    )


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
KEYS_FILE = "qtrap-keys.sqlite"  # auth.keys_path's default, in the ledger's directory


class AuthConfig(_Strict):
    """Client keys on the serving routes, an admin key on ``/qtrap/v1/*`` (docs/security.md)."""

    enabled: bool = Field(
        False, description="require an API key on every route but /health (and /metrics unless protected)"
    )
    keys_path: str | None = Field(
        None,
        description="SQLite file of the client keys (hashed), separate from the ledger so that the ledger "
        f"can be shared without them (default: {KEYS_FILE} in the ledger's directory)",
    )
    admin_key_env: str = Field(
        "QTRAP_ADMIN_KEY",
        description="environment variable that holds the admin key (at least 32 characters)",
    )
    admin_key_sha256: str | None = Field(
        None, description="the admin key's SHA-256 (hex), instead of or as well as the variable"
    )
    protect_metrics: bool = Field(False, description="GET /metrics needs the admin key too")
    key_metrics: bool = Field(
        False,
        description="export qtrap_key_requests_total and qtrap_key_energy_joules_total labelled by key name "
        "(one series per key: keys are few, created by the operator)",
    )
    refresh_s: float = Field(
        5.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="longest a key created or revoked with `qtrap-proxy keys` takes to be seen by a running proxy",
    )

    @field_validator("admin_key_env")
    @classmethod
    def _env_name(cls, v: str) -> str:
        if not _ENV_NAME.fullmatch(v):
            raise ValueError("must be an environment variable name ([A-Za-z_][A-Za-z0-9_]*)")
        return v

    @field_validator("admin_key_sha256")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is not None and not _SHA256_HEX.fullmatch(v):
            raise ValueError("must be 64 hexadecimal digits (e.g. `qtrap-proxy keys admin` prints one)")
        return None if v is None else v.lower()


class ProxyConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QTRAP_", env_nested_delimiter="__", extra="forbid")

    server: ServerConfig = Field(default_factory=ServerConfig)
    backends: list[BackendConfig] = Field(min_length=1)
    pools: dict[str, PoolConfig] = Field(default_factory=dict)
    meter: MeterConfig = Field(default_factory=MeterConfig)
    ledger: LedgerConfig = Field(default_factory=LedgerConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    otlp_receiver: OtlpReceiverConfig = Field(default_factory=OtlpReceiverConfig)
    carbon: CarbonConfig = Field(default_factory=CarbonConfig)
    otel_export: OtelExportConfig = Field(default_factory=OtelExportConfig)
    pricing: PricingConfig = Field(default_factory=PricingConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (env_settings, init_settings)

    @model_validator(mode="after")
    def _consistent(self) -> ProxyConfig:
        seen: set[str] = set()
        for i, b in enumerate(self.backends):
            if b.name in seen:
                raise ValueError(f"backends[{i}].name: duplicate backend name {b.name!r}")
            seen.add(b.name)
        precisions: dict[str, set[str]] = {}
        for b in self.backends:
            precisions.setdefault(b.pool, set()).add(b.precision)
        for pool, pc in self.pools.items():
            if pool not in precisions:
                raise ValueError(f"pools.{pool}: no backend serves this pool")
            if pc.default_precision is not None and pc.default_precision not in precisions[pool]:
                raise ValueError(
                    f"pools.{pool}.default_precision: {pc.default_precision!r} is not served "
                    f"(pool has {sorted(precisions[pool])})"
                )
            if "cost" in pc.model_fields_set and pc.routing != "cost":
                raise ValueError(f"pools.{pool}.cost: only used with routing: cost (this pool: {pc.routing})")
            for precision in pc.cost.accuracy:
                if precision not in precisions[pool]:
                    raise ValueError(
                        f"pools.{pool}.cost.accuracy.{precision}: precision not served by the pool "
                        f"(pool has {sorted(precisions[pool])})"
                    )
        for i, b in enumerate(self.backends):
            if b.engine_facts == "otlp" and not self.otlp_receiver.enabled:
                raise ValueError(
                    f"backends[{i}].engine_facts: otlp needs otlp_receiver.enabled: true (the spans' destination)"
                )
        if Path(self.keys_path).resolve() == Path(self.ledger.path).resolve():
            raise ValueError(
                "auth.keys_path: must not be the ledger's file (the ledger is shared without keys)"
            )
        return self

    @property
    def keys_path(self) -> str:
        """The key store's file: ``auth.keys_path``, else ``qtrap-keys.sqlite`` beside the ledger."""
        if self.auth.keys_path is not None:
            return self.auth.keys_path
        return str(Path(self.ledger.path).parent / KEYS_FILE)

    def default_precision(self, pool: str) -> str:
        """The pool's configured default, else the precision of its first listed backend."""
        pc = self.pools.get(pool)
        if pc is not None and pc.default_precision is not None:
            return pc.default_precision
        return next(b.precision for b in self.backends if b.pool == pool)


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def load_config(path: str | Path | None = None, data: dict[str, Any] | None = None) -> ProxyConfig:
    """Read and validate a config file (or an already-parsed mapping).

    Raises :class:`ConfigError` whose message names the offending key, e.g.
    ``backends[1].kind: Input should be 'vllm', 'tgi' or 'openai'``.
    """
    where = str(path) if path is not None else "config"
    if data is None:
        if path is None:
            raise ConfigError("no configuration given")
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read config file {where}: {e.strerror or e}") from e
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{where}: the top level must be a mapping")
        data = loaded
    try:
        return ProxyConfig(**data)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            loc = _format_loc(tuple(err["loc"]))
            msg = err["msg"].removeprefix("Value error, ")
            msgs.append(msg if loc == "(top level)" and ":" in msg else f"{loc}: {msg}")
        raise ConfigError(f"{where}: " + "; ".join(msgs)) from e
