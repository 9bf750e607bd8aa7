"""The proxy's own HTTP interface as an OpenAPI 3.1 document, served at ``GET /openapi.json``.

Built, not written out: the bodies and answers are pydantic models (documentation
only; the routes validate by hand, in ``limits.py`` and the route modules, against
the same constants), the ``x-qtrap-*`` header names and bounds come from
``limits.py`` and the response header names from ``proxy.py``/``relay.py``, and the
server's configured limits (``server.max_body_bytes``, ...) from the running
config. ``OPERATIONS`` lists every route and method the app registers;
``tests/unit/proxy/test_openapi.py`` keeps the two equal, so a new route cannot go
undocumented. Starlette also answers ``HEAD`` on every ``GET`` route (headers
only); the document lists the ``GET``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue
from pydantic.json_schema import models_json_schema

from qtrap_common import wire
from qtrap_proxy import __version__
from qtrap_proxy.config import ServerConfig
from qtrap_proxy.limits import (
    DEFAULT_PAGE,
    H_CHAIN_ID,
    H_HOP,
    H_HOP_SPLIT,
    H_MODEL,
    H_PRECISION,
    JSON_MAX_DEPTH,
    MAX_ADMIN_BODY_BYTES,
    MAX_CLIENT_REQUEST_ID_CHARS,
    MAX_HEADER_CHARS,
    MAX_HOP,
    MAX_ID_CHARS,
    MAX_MODEL_CHARS,
    MAX_PAGE,
    MAX_REWRITE_DEPTH,
)
from qtrap_proxy.proxy import H_BACKEND, H_CLIENT_REQUEST_ID, H_REQUEST_ID, H_ROUTE
from qtrap_proxy.proxy import H_PRECISION as H_RESP_PRECISION
from qtrap_proxy.query import (
    DEFAULT_LIST,
    GROUP_BY,
    MAX_CURSOR_CHARS,
    MAX_LIST,
    MAX_USAGE_GROUPS,
    ORDERS,
)
from qtrap_proxy.relay import H_ENERGY

OPENAPI_VERSION = "3.1.0"
# Character rules as "matches nowhere" (`not` + an unanchored pattern): the same in ECMA-262 and in Python's
# re, where `$` also matches before a final newline.
NOT_PRINTABLE_ASCII: dict[str, JsonValue] = {
    "pattern": "[^\\x20-\\x7E]"
}  # every x-qtrap-* value (limits.parse_qtrap_headers)
VISIBLE = "[\\x21-\\x7E]"  # values the proxy strips must keep one visible character
CONTROLS: dict[str, JsonValue] = {
    "pattern": "[\\x00-\\x1F\\x7F-\\x9F]"
}  # `model`: printable (str.isprintable) has none
SSE = "text/event-stream"
JSON = "application/json"


# -- request bodies (fields the proxy reads; everything else passes through unchanged) ----------------------
class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Open):
    """OpenAI's ``stream_options``. The proxy always asks the backend for usage and removes again
    what the client did not ask for."""

    include_usage: bool | None = Field(
        None,
        description="a last chunk with `usage`, which carries the energy (`energy_j`, `qtrap`; see "
        "EnergyUsage); a stream that does not ask gets no usage chunk",
    )
    continuous_usage_stats: bool | None = Field(None, description="vLLM: `usage` on every chunk")


_MODEL = Field(
    min_length=1,
    max_length=MAX_MODEL_CHARS,
    json_schema_extra={"not": CONTROLS},
    description="a pool, `pool@precision`, or an upstream model id of one pool; printable characters",
)
_STREAM = Field(False, description="answer as server-sent events ending with `data: [DONE]`")


class ChatCompletionRequest(_Open):
    """OpenAI's chat completion request; fields not listed pass through to the backend unchanged."""

    model: str = _MODEL
    messages: list[Any] = Field(min_length=1, description="the conversation (relayed as sent)")
    stream: bool | None = _STREAM
    stream_options: StreamOptions | None = None


class CompletionRequest(_Open):
    """OpenAI's (legacy) completion request; fields not listed pass through to the backend unchanged."""

    model: str = _MODEL
    prompt: str | list[Any] = Field(description="a string or an array (strings or token ids)")
    stream: bool | None = _STREAM
    stream_options: StreamOptions | None = None


class EmbeddingRequest(_Open):
    """OpenAI's embeddings request; fields not listed pass through to the backend unchanged."""

    model: str = _MODEL
    input: str | list[Any] = Field(
        description="a string, or a non-empty array of strings or of token arrays (relayed as sent)"
    )


class ResponsesRequest(_Open):
    """OpenAI's Responses API request; fields not listed pass through to the backend unchanged."""

    model: str = _MODEL
    input: str | list[Any] = Field(
        description="a string or a non-empty array of input items (relayed as sent)"
    )
    stream: bool | None = Field(
        False, description="answer as server-sent events (`event: response.*`), the last `response.completed`"
    )


class TokenizeRequest(_Open):
    """vLLM's `/tokenize` (`prompt` or `messages`) and `/detokenize` (`tokens`) request, passed through."""

    model: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_MODEL_CHARS,
        description="a pool, `pool@precision` or an upstream id; optional when the proxy serves one pool",
    )


class TGIRequest(_Open):
    """TGI's generate request, relayed unchanged."""

    inputs: str = Field(min_length=1)
    parameters: dict[str, Any] | None = Field(None, description="TGI's generation parameters (relayed)")
    stream: bool | None = Field(None, description="`POST /` only: true streams as `/generate_stream` does")


class ScoreRequest(_Open):
    """A client's verdict on a chain's final answer."""

    correct: bool
    hops: int | None = Field(
        None, ge=1, le=MAX_HOP, description="the chain's hop count (default: its records)"
    )


# -- answers -------------------------------------------------------------------------------------------------
class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | int | None


class OpenAIError(BaseModel):
    """OpenAI's error shape: every error the proxy makes on the OpenAI and admin routes."""

    error: OpenAIErrorDetail


class TGIError(BaseModel):
    """TGI's error shape (TGI's `text-generation` client parses it): errors on the TGI routes."""

    error: str
    error_type: str


class ModelEntry(_Open):
    id: str = Field(description="a pool, or `pool@precision`")
    object: Literal["model"]
    created: int
    owned_by: str
    root: str = Field(
        description="the upstream model id (the weights; a tokenizer is found by it): for a pool its default "
        "precision's, for `pool@precision` that precision's"
    )
    parent: str | None = Field(description="the pool of a `pool@precision` entry, else null")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelEntry]


class BackendHealth(_Open):
    name: str
    pool: str
    precision: str
    kind: str
    url: str = Field(description="credentials redacted")
    ok: bool
    http_status: int | None
    latency_s: float | None
    error: str | None


class LedgerHealth(_Open):
    status: Literal["ok", "degraded", "down"]
    reason: str | None
    pending: int
    written: int
    write_errors: dict[str, int]
    restarts: int


class ReadyReport(_Open):
    """200 (`ready`) when every pool has a backend whose probe passed and the ledger is writable (status
    `ok`); 503 (`not_ready`) otherwise, with `reasons`."""

    status: Literal["ready", "not_ready"]
    reasons: list[str]
    pools: dict[str, bool]
    ledger: Literal["ok", "degraded", "down"]


class HealthReport(_Open):
    """200 while every pool has a healthy backend (`ok`, or `degraded`: a backend or the ledger
    unwell), 503 (`down`) otherwise."""

    status: Literal["ok", "degraded", "down"]
    pools: dict[str, bool]
    backends: list[BackendHealth]
    ledger: LedgerHealth


class HopEnergy(_Open):
    index: int | None
    tokens: int | None
    energy_j: float | None


class EngineTiming(_Open):
    """When the engine says the request's phases ran (seconds from its start at the proxy)."""

    source: Literal["otlp", "headers"]
    queued_s: float | None
    prefill_start_s: float
    first_token_s: float | None
    last_token_s: float
    prompt_tokens: int | None
    completion_tokens: int | None
    clock_error_s: float


class RequestRecord(_Open):
    """A request's record (DESIGN.md). `energy_j` is provisional until `final`; energy never reads 0 when
    it is unknown: it is null and `energy_null_reason` says why."""

    id: str
    client_request_id: str | None = Field(
        None,
        description="the client's X-Request-Id when it sent a valid one (1 to "
        f"{MAX_CLIENT_REQUEST_ID_CHARS} printable ASCII characters), else null",
    )
    chain_id: str | None
    hop: int | None = Field(ge=1, le=MAX_HOP)
    pool: str | None
    backend: str | None
    precision: str | None
    status: str | None
    prompt_tokens: int | None
    cached_tokens: int | None = Field(
        None,
        description="prompt tokens the engine's prefix cache held (usage.prompt_tokens_details.cached_tokens, "
        "vLLM with --enable-prompt-tokens-details): not prefilled, so not counted as prefill work; null "
        "when the engine did not say",
    )
    completion_tokens: int | None
    ttft_s: float | None
    e2e_s: float | None
    energy_j: float | None
    idle_energy_j: float | None
    j_per_token: float | None
    error_bound_j: float | None
    energy_null_reason: str | None
    hops: list[HopEnergy]
    meter: str | None
    final: bool
    facts: Literal["engine", "proxy"] = Field(
        description="whose view placed the request's work in time: the engine's facts or the proxy's own"
    )
    facts_reason: str | None = Field(
        description="why the proxy's view was used where engine facts were expected"
    )
    engine_timing: EngineTiming | None
    energy_proxy_view_j: float | None = Field(
        description="meter.compare_views: the final energy under the proxy's own view (else null)"
    )
    co2e_g: float | None = Field(
        None,
        description="gCO2e of the final GPU energy: energy_j / 3.6e6 x pue x carbon_intensity_g_per_kwh (the "
        "intensity at the request's start); null with co2e_null_reason before the record is final and where "
        "the energy or the intensity is unknown; absent from records of older ledgers",
    )
    co2e_null_reason: str | None = None
    carbon_intensity_g_per_kwh: float | None = Field(None, description="the grid intensity used (gCO2e/kWh)")
    pue: float | None = Field(None, description="carbon.pue, applied to the GPU energy")
    cost: float | None = Field(
        None,
        description="energy_j / 3.6e6 x pue x pricing.price_per_kwh, in cost_currency; null with "
        "cost_null_reason as co2e_g",
    )
    cost_currency: str | None = Field(None, description="ISO 4217 code (pricing.currency)")
    cost_null_reason: str | None = None


class ChainPage(_Open):
    """A chain's records by hop; `records` and `hops` are paged, the totals are the whole chain's."""

    chain_id: str
    requests: int
    final: bool
    energy_j: float | None
    energy_null_reason: str | None
    hops: list[dict[str, Any]]
    records: list[RequestRecord]
    offset: int
    limit: int
    next_offset: int | None


class RecordList(_Open):
    """A page of the records query, in `order` on (start_unix_s, id); `next_cursor` (null on the last
    page) fetches the next one with the same filters."""

    object: Literal["list"]
    data: list[RequestRecord]
    order: Literal["desc", "asc"]
    limit: int = Field(ge=1, le=MAX_LIST)
    has_more: bool
    next_cursor: str | None = Field(max_length=MAX_CURSOR_CHARS)


class UsageSums(_Open):
    """Sums over final records. Energy sums cover the requests whose energy is known; the others are
    counted in `energy_unknown_requests`, never as 0 J (`energy_j` null, with a reason, when none is known)."""

    requests: int
    ok_requests: int
    prompt_tokens: int
    completion_tokens: int
    energy_j: float | None
    idle_energy_j: float | None
    idle_share: float | None
    j_per_token: float | None
    energy_unknown_requests: int
    energy_null_reason: str | None
    co2e_g: float | None = Field(
        None, description="gCO2e of the requests whose figure is known (the others: co2e_unknown_requests)"
    )
    co2e_unknown_requests: int = 0
    co2e_null_reason: str | None = None
    cost: float | None = Field(
        None,
        description="cost of the requests whose figure is known, in cost_currency (null when the costs are in "
        "more than one currency)",
    )
    cost_currency: str | None = None
    cost_unknown_requests: int = 0
    cost_null_reason: str | None = None


class UsageGroup(UsageSums):
    """One group's sums; it also carries the value of each `group_by` field (`pool`, `precision`,
    `backend`, `key`, `status`), null for records without one."""


class UsageReport(_Open):
    since_unix_s: float
    until_unix_s: float | None
    group_by: list[Literal["pool", "precision", "backend", "key", "status"]]
    groups: list[UsageGroup] = Field(max_length=MAX_USAGE_GROUPS)
    truncated: bool = Field(description=f"more than {MAX_USAGE_GROUPS} groups: the first are shown")
    total: UsageSums
    not_final_requests: int = Field(description="selected requests not final yet (not in the sums)")
    note: str


class ScoreResult(_Open):
    chain_id: str
    counted: bool = Field(description="false when the chain was scored before (counted once)")
    correct: bool
    hops: int
    pool: str | None
    precision: str | None


class UsageQtrap(BaseModel):
    """Where the figure stands as the answer is sent (docs/clients.md)."""

    provisional: bool = Field(
        description="true: the final figure settles later in the ledger (read `record_url`) and may differ; "
        "false: already known to stay null"
    )
    request_id: str
    record_url: str = Field(description="the record's path on the proxy (relative to its base URL)")
    backend: str | None
    precision: str | None
    energy_unknown_reason: str | None = Field(None, description="only when `energy_j` is null: why")


class EnergyUsage(_Open):
    """What the proxy adds to the `usage` object of a non-streaming OpenAI answer and of a stream's usage
    chunk (the other usage fields are the backend's, unchanged)."""

    energy_j: float | None = Field(
        description="provisional GPU energy attributed to the request, in joules; null when unknown, never 0"
    )
    qtrap: UsageQtrap


class OpenAIAnswer(_Open):
    """OpenAI's response object, relayed byte for byte but for `usage`, which gains the energy."""

    usage: EnergyUsage | None = None


class EnergyReport(_Open):
    """Per device: meter state, measured, metered, attributed, idle and foreign joules, conservation error;
    per counted backend: its token counters' state."""

    meter: str | None
    devices: list[dict[str, Any]]
    token_counters: list[dict[str, Any]]


_MODELS: tuple[type[BaseModel], ...] = (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ResponsesRequest,
    TokenizeRequest,
    ReadyReport,
    TGIRequest,
    ScoreRequest,
    OpenAIError,
    TGIError,
    ModelList,
    HealthReport,
    RequestRecord,
    RecordList,
    UsageReport,
    ChainPage,
    ScoreResult,
    EnergyReport,
    OpenAIAnswer,
)


# -- parameters and headers --------------------------------------------------------------------------------
def _ascii(max_length: int, min_length: int = 0, visible: bool = False) -> dict[str, Any]:
    """Printable ASCII of a bounded length (``visible``: at least one character other than a space)."""
    out = {"type": "string", "minLength": min_length, "maxLength": max_length, "not": NOT_PRINTABLE_ASCII}
    if visible:
        out["pattern"] = VISIBLE
    return out


def _header_param(name: bytes, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name.decode(),
        "in": "header",
        "required": False,
        "description": description,
        "schema": schema,
    }


_PARAMETERS: dict[str, dict[str, Any]] = {
    "XQtrapPrecision": _header_param(
        H_PRECISION, "pin a precision of the pool (as `model@precision` does)", _ascii(MAX_HEADER_CHARS)
    ),
    "XQtrapChainId": _header_param(
        H_CHAIN_ID,
        "the chain this request is a hop of",
        _ascii(min(MAX_HEADER_CHARS, MAX_ID_CHARS), min_length=1, visible=True),
    ),
    "XQtrapHop": _header_param(
        H_HOP, "the hop's index in its chain, 1-based", {"type": "integer", "minimum": 1, "maximum": MAX_HOP}
    ),
    "XQtrapHopSplit": _header_param(
        H_HOP_SPLIT,
        "streams only: split the answer into reasoning steps (hops), each with its energy (case-insensitive)",
        {"type": "string", "enum": ["lines", "regex"]},
    ),
    "XQtrapModel": _header_param(
        H_MODEL,
        "the pool (or `pool@precision`) of a TGI request; default: the only pool with TGI backends",
        _ascii(min(MAX_HEADER_CHARS, MAX_MODEL_CHARS), min_length=1, visible=True),
    ),
    "ModelId": {
        "name": "model_id",
        "in": "path",
        "required": True,
        "description": "an id of `GET /v1/models` (a pool or `pool@precision`)",
        "schema": {"type": "string", "minLength": 1},
    },
    "RequestId": {
        "name": "request_id",
        "in": "path",
        "required": True,
        "schema": _ascii(MAX_ID_CHARS, min_length=1),
    },
    "ChainId": {
        "name": "chain_id",
        "in": "path",
        "required": True,
        "schema": _ascii(MAX_ID_CHARS, min_length=1),
    },
    "KeyId": {
        "name": "key_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": "^key_[0-9a-f]{12}$"},
    },
    "Since": {
        "name": "since",
        "in": "query",
        "required": False,
        "description": "start of the window (records that started then or later): Unix seconds or ISO 8601 / "
        "RFC 3339 (UTC unless it says otherwise; default: all)",
        "schema": {"type": "string", "maxLength": MAX_HEADER_CHARS},
    },
    "Until": {
        "name": "until",
        "in": "query",
        "required": False,
        "description": "end of the window (exclusive): Unix seconds or ISO 8601 / RFC 3339 (default: now for "
        "a key's usage, no bound for the records query and usage sums); before `since`: 400",
        "schema": {"type": "string", "maxLength": MAX_HEADER_CHARS},
    },
    **{
        name: {
            "name": field,
            "in": "query",
            "required": False,
            "description": f"only records whose `{field}` is this",
            "schema": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_MODEL_CHARS,
                "not": CONTROLS,
            },
        }
        for name, field in (("Pool", "pool"), ("Precision", "precision"), ("Backend", "backend"))
    },
    "ChainIdFilter": {
        "name": "chain_id",
        "in": "query",
        "required": False,
        "description": "only the records of this chain (`x-qtrap-chain-id`)",
        "schema": _ascii(MAX_ID_CHARS, min_length=1),
    },
    "KeyFilter": {
        "name": "key",
        "in": "query",
        "required": False,
        "description": "only the records of this client key (auth on). A client key sees only its own records "
        "whatever it asks; naming another key is a 403",
        "schema": {"type": "string", "pattern": "^key_[0-9a-f]{12}$"},
    },
    "StatusFilter": {
        "name": "status",
        "in": "query",
        "required": False,
        "description": "only records of this status",
        "schema": {"type": "string", "enum": list(wire.STATUSES)},
    },
    "ClientRequestIdFilter": {
        "name": "client_request_id",
        "in": "query",
        "required": False,
        "description": "only the records whose client sent this X-Request-Id",
        "schema": _ascii(MAX_CLIENT_REQUEST_ID_CHARS, min_length=1, visible=True),
    },
    "Final": {
        "name": "final",
        "in": "query",
        "required": False,
        "description": "true: only final records (durable in the ledger); false: only records not final yet "
        "(in flight, waiting for their final energy figure, or being committed); default both",
        "schema": {"type": "string", "enum": ["true", "false"]},
    },
    "ListLimit": {
        "name": "limit",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIST, "default": DEFAULT_LIST},
    },
    "Order": {
        "name": "order",
        "in": "query",
        "required": False,
        "description": "desc: newest first (the default); asc: oldest first; by (start_unix_s, id)",
        "schema": {"type": "string", "enum": list(ORDERS), "default": "desc"},
    },
    "Cursor": {
        "name": "cursor",
        "in": "query",
        "required": False,
        "description": "the previous page's `next_cursor`, as given, with the same filters and order",
        "schema": {"type": "string", "minLength": 1, "maxLength": MAX_CURSOR_CHARS},
    },
    "GroupBy": {
        "name": "group_by",
        "in": "query",
        "required": False,
        "description": "comma-separated, each at most once: " + ", ".join(GROUP_BY) + " (default: no groups, "
        "the totals only)",
        "schema": {"type": "string", "maxLength": 64},
    },
    "XRequestId": {
        "name": "x-request-id",
        "in": "header",
        "required": False,
        "description": f"the client's own request id: kept in the record (`client_request_id`) and echoed in "
        f"the answer's `x-request-id` when it is 1 to {MAX_CLIENT_REQUEST_ID_CHARS} characters of printable "
        "ASCII (spaces around it stripped); any other value is ignored (not an error). The proxy sends its "
        "own request id upstream as X-Request-Id, as before",
        "schema": {"type": "string"},
    },
    "Offset": {
        "name": "offset",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 0, "default": 0},
    },
    "Limit": {
        "name": "limit",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": DEFAULT_PAGE},
    },
}

_HEADERS: dict[str, dict[str, Any]] = {
    "XQtrapRequestId": {
        "description": f"the request's id (its record: `/qtrap/v1/requests/{{id}}`); sent upstream as X-Request-Id ({H_REQUEST_ID.decode()})",
        "schema": {"type": "string"},
    },
    "XRequestId": {
        "description": "the client's X-Request-Id when it sent a valid one, else the request's id (as "
        "x-qtrap-request-id); a backend's own x-request-id is not relayed",
        "schema": {"type": "string"},
    },
    "XQtrapBackend": {"description": "the backend that served it", "schema": {"type": "string"}},
    "XQtrapPrecision": {"description": "the precision that served it", "schema": {"type": "string"}},
    "XQtrapRoute": {
        "description": "how the backend was chosen: `<policy>; precision=<p>; reason=<r>`, policy `cost` or "
        "`round_robin`, reason one of " + ", ".join(f"`{r}`" for r in wire.ROUTE_REASONS),
        "schema": {"type": "string"},
    },
    "XQtrapEnergyJProvisional": {
        "description": "non-streaming answers: the provisional energy in joules (the final figure is in the record)",
        "schema": {"type": "number"},
    },
    "RetryAfter": {"description": "seconds", "schema": {"type": "integer", "minimum": 0}},
    "Connection": {
        "description": "`close`: the connection is closed after this answer",
        "schema": {"type": "string"},
    },
}
_RESPONSE_HEADER_NAMES = {
    "XQtrapRequestId": H_REQUEST_ID,
    "XRequestId": H_CLIENT_REQUEST_ID,
    "XQtrapBackend": H_BACKEND,
    "XQtrapPrecision": H_RESP_PRECISION,
    "XQtrapRoute": H_ROUTE,
    "XQtrapEnergyJProvisional": H_ENERGY,
}


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


# -- operations ----------------------------------------------------------------------------------------------
Family = Literal["openai", "tgi", "passthrough", "admin", "plain"]


@dataclass(frozen=True)
class Operation:
    """One route and method: what it takes and what it answers."""

    path: str
    method: str
    summary: str
    tag: str
    family: Family
    body: str | None = None  # a component schema
    params: tuple[str, ...] = ()
    ok: Callable[[], dict[str, Any]] = field(default=lambda: {"description": "OK"})
    streams: bool = False
    not_found: str | None = None  # what a 404 means here

    @property
    def operation_id(self) -> str:
        name = self.path.strip("/").replace("/", "_").replace("{", "").replace("}", "") or "root"
        return f"{self.method}_{name}"


def _json_ok(
    schema: str, description: str = "OK", headers: tuple[str, ...] = ()
) -> Callable[[], dict[str, Any]]:
    def build() -> dict[str, Any]:
        out: dict[str, Any] = {
            "description": description,
            "content": {JSON: {"schema": _ref("schemas", schema)}},
        }
        if headers:
            out["headers"] = {_RESPONSE_HEADER_NAMES[h].decode(): _ref("headers", h) for h in headers}
        return out

    return build


def _relay_ok(stream_terminator: str, json_schema: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    def build() -> dict[str, Any]:
        return {
            "description": "the backend's answer, relayed byte for byte (usage the client did not ask for "
            "removed from streams; on the OpenAI routes the energy added to `usage`); a stream the backend breaks off ends with an error event"
            + stream_terminator,
            "headers": {
                _RESPONSE_HEADER_NAMES[h].decode(): _ref("headers", h)
                for h in (
                    "XQtrapRequestId",
                    "XRequestId",
                    "XQtrapBackend",
                    "XQtrapPrecision",
                    "XQtrapRoute",
                    "XQtrapEnergyJProvisional",
                )
            },
            "content": {
                JSON: {"schema": json_schema},
                SSE: {
                    "schema": {
                        "type": "string",
                        "description": "server-sent events, one `data:` line each" + stream_terminator,
                    }
                },
            },
        }

    return build


def _json_relay_ok(
    description: str, schema: str | None = None, record: bool = True
) -> Callable[[], dict[str, Any]]:
    """A relayed JSON answer (never streamed); ``record``: the request has a record (its id header)."""
    names = ("XQtrapRequestId",) if record else ()

    def build() -> dict[str, Any]:
        return {
            "description": description,
            "headers": {
                _RESPONSE_HEADER_NAMES[h].decode(): _ref("headers", h)
                for h in (*names, "XQtrapBackend", "XQtrapPrecision")
            },
            "content": {JSON: {"schema": _ref("schemas", schema) if schema else {"type": "object"}}},
        }

    return build


_OPENAI_OK = _relay_ok(", then `data: [DONE]`", _ref("schemas", "OpenAIAnswer"))
_TGI_OK = _relay_ok(
    " (`error_type: incomplete_generation`); the last event of a complete one carries `generated_text`",
    {"description": "TGI's response (`POST /`: an array of one)"},
)
_QTRAP_HEADERS = ("XQtrapPrecision", "XQtrapChainId", "XQtrapHop", "XQtrapHopSplit", "XRequestId")
_FILTERS = (
    "Since",
    "Until",
    "Pool",
    "Precision",
    "Backend",
    "ChainIdFilter",
    "KeyFilter",
    "StatusFilter",
    "ClientRequestIdFilter",
)

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "/v1/chat/completions", "post", "OpenAI chat completion (relayed)", "openai", "openai",
        body="ChatCompletionRequest", params=_QTRAP_HEADERS, ok=_OPENAI_OK, streams=True,
        not_found="unknown model or precision (`model_not_found`, `precision_not_found`)",
    ),
    Operation(
        "/v1/completions", "post", "OpenAI completion (relayed)", "openai", "openai",
        body="CompletionRequest", params=_QTRAP_HEADERS, ok=_OPENAI_OK, streams=True,
        not_found="unknown model or precision (`model_not_found`, `precision_not_found`)",
    ),
    Operation(
        "/v1/embeddings", "post", "OpenAI embeddings (relayed; a record with prompt tokens and energy)",
        "openai", "openai", body="EmbeddingRequest", params=("XQtrapPrecision", "XQtrapChainId", "XQtrapHop"),
        ok=_json_relay_ok("OpenAI's embeddings answer; `usage` gains the energy (EnergyUsage)", "OpenAIAnswer"),
        not_found="unknown model or precision, or no vLLM/OpenAI backend at it",
    ),
    Operation(
        "/v1/responses", "post", "OpenAI Responses API (relayed; a record, the energy in `usage`)", "openai",
        "openai", body="ResponsesRequest", params=("XQtrapPrecision", "XQtrapChainId", "XQtrapHop"),
        ok=_relay_ok(
            ": `event: error` with `{\"type\": \"error\"}`; a complete one ends with `response.completed`, "
            "whose `response.usage` gains the energy (no `[DONE]`)",
            _ref("schemas", "OpenAIAnswer"),
        ),
        streams=True,
        not_found="unknown model or precision, or no vLLM/OpenAI backend at it",
    ),
    Operation(
        "/tokenize", "post", "vLLM's tokenizer (passed through to a vLLM backend; no record)", "openai",
        "passthrough", body="TokenizeRequest", params=("XQtrapPrecision",),
        ok=_json_relay_ok("vLLM's answer: `count`, `max_model_len`, `tokens`", record=False),
        not_found="unknown model or precision, or no vLLM backend at it",
    ),
    Operation(
        "/detokenize", "post", "vLLM's detokenizer (passed through to a vLLM backend; no record)", "openai",
        "passthrough", body="TokenizeRequest", params=("XQtrapPrecision",),
        ok=_json_relay_ok("vLLM's answer: `prompt`", record=False),
        not_found="unknown model or precision, or no vLLM backend at it",
    ),
    Operation(
        "/v1/models", "get", "each pool and each `pool@precision`", "openai", "plain",
        ok=_json_ok("ModelList"),
    ),
    Operation(
        "/v1/models/{model_id}", "get", "one entry of `GET /v1/models`", "openai", "plain",
        params=("ModelId",), ok=_json_ok("ModelEntry"),
        not_found="no such model id (`model_not_found`; for a client key, a pool it may not use either)",
    ),
    Operation(
        "/generate", "post", "TGI generate (relayed)", "tgi", "tgi",
        body="TGIRequest", params=(*_QTRAP_HEADERS, "XQtrapModel"), ok=_TGI_OK,
        not_found="unknown pool or precision",
    ),
    Operation(
        "/generate_stream", "post", "TGI generate, streamed (relayed)", "tgi", "tgi",
        body="TGIRequest", params=(*_QTRAP_HEADERS, "XQtrapModel"), ok=_TGI_OK, streams=True,
        not_found="unknown pool or precision",
    ),
    Operation(
        "/", "post", "TGI's compat route (relayed; `stream: true` streams)", "tgi", "tgi",
        body="TGIRequest", params=(*_QTRAP_HEADERS, "XQtrapModel"), ok=_TGI_OK, streams=True,
        not_found="unknown pool or precision",
    ),
    Operation(
        "/health", "get", "the backends' probes and the ledger's state", "operations", "plain",
        ok=_json_ok("HealthReport", "every pool has a healthy backend (status ok or degraded)"),
    ),
    Operation(
        "/health/live", "get", "liveness: the process is up (nothing else is checked)", "operations", "plain",
        ok=lambda: {"description": "`{\"status\": \"ok\"}`", "content": {JSON: {"schema": {"type": "object"}}}},
    ),
    Operation(
        "/health/ready", "get", "readiness: every pool has a healthy backend and the ledger is writable",
        "operations", "plain", ok=_json_ok("ReadyReport", "ready"),
    ),
    Operation(
        "/metrics", "get", "Prometheus metrics (qtrap_*)", "operations", "plain",
        ok=lambda: {
            "description": "Prometheus text exposition format",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
    ),
    Operation(
        "/openapi.json", "get", "this document", "operations", "plain",
        ok=lambda: {"description": "OpenAPI 3.1", "content": {JSON: {"schema": {"type": "object"}}}},
    ),
    Operation(
        "/qtrap/v1/requests", "get", "the records, filtered, newest (or oldest) first, a page at a time",
        "admin", "admin", params=(*_FILTERS, "Final", "ListLimit", "Order", "Cursor"), ok=_json_ok("RecordList"),
    ),
    Operation(
        "/qtrap/v1/usage", "get", "requests, tokens and energy of the final records, summed per group",
        "admin", "admin", params=(*_FILTERS, "GroupBy"), ok=_json_ok("UsageReport"),
    ),
    Operation(
        "/qtrap/v1/requests/{request_id}", "get", "a request's record", "admin", "admin",
        params=("RequestId",), ok=_json_ok("RequestRecord"), not_found="no record of the request",
    ),
    Operation(
        "/qtrap/v1/chains/{chain_id}", "get", "a chain's records by hop, paged", "admin", "admin",
        params=("ChainId", "Offset", "Limit"), ok=_json_ok("ChainPage"), not_found="no record of the chain",
    ),
    Operation(
        "/qtrap/v1/chains/{chain_id}/score", "post", "score a chain's final answer (counted once)", "admin",
        "admin", body="ScoreRequest", params=("ChainId",), ok=_json_ok("ScoreResult"),
        not_found="no record of the chain",
    ),
    Operation(
        "/qtrap/v1/energy", "get", "energy per device and the token counters' state", "admin", "plain",
        ok=_json_ok("EnergyReport"),
    ),
    Operation(
        "/qtrap/v1/backends", "get", "each backend as configured and its engine's name and version", "admin",
        "plain",
        ok=lambda: {"description": "`{\"backends\": [{name, pool, precision, kind, url, model, devices, engine, "
                    "engine_version, simulated, served_model, max_model_len, dtype, engine_error}]}`",
                    "content": {JSON: {"schema": {"type": "object"}}}},
    ),
    Operation(
        "/qtrap/v1/routing", "get", "each cost-routed pool's cost table, accuracy, budgets and current best",
        "admin", "plain",
        ok=lambda: {"description": "`{\"pools\": [{pool, default_precision, current_best, accuracy, budgets, "
                    "backends: [{name, precision, inflight, up, candidate, ttft_p95_s, itl_p95_s, curves: "
                    "[{device, seconds, points: [{load, mean_load, power_w, power_stderr_w, tokens_per_s, "
                    "tokens_per_s_stderr, seconds_eff}]}], j_per_token_by_load: {load: J/token or null}}]}], "
                    "\"round_robin_pools\": [...]}`",
                    "content": {JSON: {"schema": {"type": "object"}}}},
    ),
    Operation(
        "/qtrap/v1/keys", "get", "every client key (auth on, admin key; never secrets)", "admin", "plain",
        ok=lambda: {"description": "`{\"keys\": [{id, name, pools, created, expires, revoked, state}]}`",
                    "content": {JSON: {"schema": {"type": "object"}}}},
        not_found="authentication is off: there are no keys",
    ),
    Operation(
        "/qtrap/v1/keys/{key_id}/usage", "get", "a key's requests, tokens and energy, by precision", "admin",
        "plain", params=("KeyId", "Since", "Until"),
        ok=lambda: {"description": "requests, tokens, energy_j (null with a reason when unknown), idle share, "
                    "by_precision", "content": {JSON: {"schema": {"type": "object"}}}},
        not_found="authentication is off, or no such key (another key's usage is not found either)",
    ),
)  # fmt: skip


def _error(description: str, shape: str | tuple[str, ...], headers: tuple[str, ...] = ()) -> dict[str, Any]:
    """An error answer; several shapes are a oneOf (who answers depends on when the request failed)."""
    schema = (
        _ref("schemas", shape) if isinstance(shape, str) else {"oneOf": [_ref("schemas", s) for s in shape]}
    )
    out: dict[str, Any] = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        out["headers"] = {_header_name(h): _ref("headers", h) for h in headers}
    return out


def _header_name(component: str) -> str:
    names = {"RetryAfter": b"retry-after", "Connection": b"connection", **_RESPONSE_HEADER_NAMES}
    return names[component].decode()


# the admin routes that read the ledger (a PostgreSQL ledger may be unable to answer: 503)
_LEDGER_READS = frozenset(
    (
        wire.REQUESTS_PATH,
        wire.REQUEST_PATH,
        wire.CHAIN_PATH,
        wire.CHAIN_SCORE_PATH,
        wire.USAGE_PATH,
        wire.KEY_USAGE_PATH,
    )
)


def _responses(op: Operation, server: ServerConfig) -> dict[str, Any]:
    shape = "TGIError" if op.family == "tgi" else "OpenAIError"
    relayed = op.family in ("openai", "tgi", "passthrough")
    ids = ("XQtrapRequestId",) if op.family in ("openai", "tgi") else ()
    out: dict[str, Any] = {"200": op.ok()}
    if op.body is not None or op.params:
        what = []
        if op.body is not None:
            what.append(
                f"malformed JSON (not UTF-8, nested deeper than "
                f"{MAX_REWRITE_DEPTH if op.family in ('openai', 'passthrough') else JSON_MAX_DEPTH} levels, not an object), a "
                "missing field or a value outside the documented bounds"
            )
        if relayed:
            what.append("an `x-qtrap-*` header outside its bounds")
        if any(p in ("RequestId", "ChainId", "Offset", "Limit", *_FILTERS) for p in op.params):
            what.append("a path or query value outside its bounds")
        if "Since" in op.params and op.family == "admin":
            what.append("an unknown or repeated query parameter, `since` after `until`")
        if "Cursor" in op.params:
            what.append("a cursor not given by this query (other filters or order)")
        out["400"] = _error("; ".join(what) + "; `param` names it", shape, ids)
    if op.path not in ("/health", "/health/live", "/health/ready", "/metrics", "/openapi.json"):
        out["401"] = _error(
            "with auth.enabled: no, an unknown, an expired or a revoked key in `Authorization: Bearer` "
            "(`code`: missing_api_key, invalid_api_key, expired_api_key, revoked_api_key)",
            shape,
        )
        out["403"] = _error(
            "with auth.enabled: a key outside its pools, a client key on an admin route or the admin key on "
            "a serving route (`code: permission_denied`)",
            shape,
        )
    if op.not_found is not None:
        out["404"] = _error(op.not_found, shape, ids)
    out["408"] = _error(
        f"the request head took longer than server.header_timeout_s ({server.header_timeout_s:g} s), or its "
        f"body stalled for server.body_timeout_s ({server.body_timeout_s:g} s); the connection is closed",
        # the head's timeout is the server's (OpenAI's shape); a stalled body is the route's to answer
        ("TGIError", "OpenAIError") if op.family == "tgi" else "OpenAIError",
        ("Connection",),
    )
    limit = server.max_body_bytes
    if op.family == "admin" and op.body is not None:
        limit = min(limit, MAX_ADMIN_BODY_BYTES)
    out["413"] = _error(f"a body over {limit} bytes; the connection is closed", shape, ("Connection",))
    out["431"] = _error(
        f"more than server.max_headers ({server.max_headers}) header lines or server.max_header_bytes "
        f"({server.max_header_bytes}) bytes of headers; the connection is closed",
        "OpenAIError",
        ("Connection",),
    )
    if relayed:
        out["502"] = _error("the backend is unreachable or failed before answering", shape, ids)
        out["503"] = _error(
            f"past server.max_inflight_requests ({server.max_inflight_requests}) requests in flight; retry "
            "after Retry-After (`code: overloaded`)",
            "OpenAIError",
            ("RetryAfter",),
        )
        out["504"] = _error("the backend was silent past its read timeout", shape, ids)
        out["default"] = {
            "description": "the backend's own 4xx/5xx: its status and body passed through unchanged",
            "headers": {_header_name(h): _ref("headers", h) for h in (*ids, "XQtrapBackend")},
        }
    if op.path == "/health/ready":
        out["503"] = {
            "description": "not ready (`status: not_ready`, `reasons`)",
            "content": {JSON: {"schema": _ref("schemas", "ReadyReport")}},
        }
    if op.path in _LEDGER_READS:
        out["503"] = _error(
            "with a PostgreSQL ledger (ledger.url): the database cannot answer now, being down or restarting "
            "(`code: ledger_unavailable`); records still in the proxy's memory are served",
            shape,
        )
    if op.path == "/health":
        out["503"] = {
            "description": "a pool has no healthy backend (`status: down`)",
            "content": {JSON: {"schema": _ref("schemas", "HealthReport")}},
        }
    return out


def _operation(op: Operation, server: ServerConfig) -> dict[str, Any]:
    out: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "tags": [op.tag],
        "responses": _responses(op, server),
    }
    if op.params:
        out["parameters"] = [_ref("parameters", p) for p in op.params]
    if op.body is not None:
        out["requestBody"] = {"required": True, "content": {JSON: {"schema": _ref("schemas", op.body)}}}
    return out


_DESCRIPTION = """\
qtrap-proxy: an OpenAI-compatible (and TGI-native) proxy that records every request's token timeline
and attributes measured GPU energy to it.

Relay routes take the documented fields and pass every other field through to the backend unchanged.
Every `x-qtrap-*` request header on them must be printable ASCII (0x20-0x7E), at most {hdr} characters;
JSON bodies must be UTF-8, nested at most {depth} levels ({rewrite} on the OpenAI routes, whose
bodies the proxy rewrites), an object at the top. A value outside a
documented bound is a 400 naming it (`param`), never a 5xx. Errors are in OpenAI's shape
(`{{"error": {{"message", "type", "param", "code"}}}}`), on TGI's routes in TGI's (`{{"error", "error_type"}}`).
A wrong method gets 405 with `Allow`; an unknown path 404. Every `GET` route also answers `HEAD`.
Configured limits: bodies at most {body} bytes (413), {headers} header lines / {header_bytes} header bytes
(431), {inflight} requests in flight on the relay routes (503 with Retry-After), head and body timeouts
(408); past server.max_connections uvicorn itself answers a plain-text 503.
"""


def build_openapi(server: ServerConfig | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the proxy's routes, with ``server``'s configured limits."""
    server = server if server is not None else ServerConfig()
    _, defs = models_json_schema(
        [(m, "validation") for m in _MODELS], ref_template="#/components/schemas/{model}"
    )
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op, server)
    description = _DESCRIPTION.format(
        hdr=MAX_HEADER_CHARS,
        depth=JSON_MAX_DEPTH,
        rewrite=MAX_REWRITE_DEPTH,
        body=server.max_body_bytes,
        headers=server.max_headers,
        header_bytes=server.max_header_bytes,
        inflight=server.max_inflight_requests,
    )
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "qtrap-proxy", "version": __version__, "description": description},
        "tags": [
            {"name": "openai", "description": "OpenAI's API"},
            {"name": "tgi", "description": "TGI's native API"},
            {"name": "admin", "description": "records, chains and energy"},
            {"name": "operations", "description": "health, metrics and this document"},
        ],
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "parameters": _PARAMETERS,
            "headers": _HEADERS,
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "with auth.enabled: a client key (serving routes, its own records) or "
                    "the admin key (/qtrap/v1/*); /health, /openapi.json and, unless auth.protect_metrics, "
                    "/metrics stay open",
                }
            },
        },
    }
