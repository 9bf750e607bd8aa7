"""The wire contract between qtrap's products and their clients (DESIGN.md's contracts).

Header names, the admin API's paths and the shapes of the request record and the chain summary, in
one place: the proxy writes them, loadgen and the simulator read them. Header names are lower-case
(ASGI and aiohttp give them so); the ``B_*`` forms are the same names as bytes for raw-ASGI code.
Records are plain JSON objects on the wire; :class:`RequestRecord` and :class:`ChainSummary` type them
for code on both sides (``total=False`` nowhere: every key is always present, null when unknown; the one
exception is ``ledger_error``, only on a record the ledger had to store with a note).
"""

from __future__ import annotations

from typing import Final, NotRequired, TypedDict

# -- request headers a client may send (all optional) -----------------------------------------------
HEADER_PREFIX: Final = "x-qtrap-"
CHAIN_ID: Final = "x-qtrap-chain-id"  # groups the hops of one reasoning chain
HOP: Final = "x-qtrap-hop"  # 1-based hop number within the chain
HOP_SPLIT: Final = "x-qtrap-hop-split"  # `lines` or `regex`: one stream split into hops by the proxy
PRECISION: Final = "x-qtrap-precision"  # pins a precision (as does `model@precision`)
MODEL: Final = "x-qtrap-model"  # pool or pool@precision on TGI's routes, which have no `model` field
# the proxy sends its own request id upstream under this name (the simulator's truth is keyed by it); a
# client's own X-Request-Id is kept in its record (`client_request_id`) and echoed back, never sent upstream
REQUEST_ID: Final = "x-request-id"
B_REQUEST_ID: Final = REQUEST_ID.encode()
# W3C trace context: a client's valid traceparent is continued; every upstream request carries one whose
# parent span id is the request's (the first 16 hex digits of its id), which joins the engine's span to it
TRACEPARENT: Final = "traceparent"
TRACESTATE: Final = "tracestate"

# -- response headers every relayed answer carries ----------------------------------------------------
RESP_REQUEST_ID: Final = "x-qtrap-request-id"  # the key to the request's record
# x-request-id (REQUEST_ID) on every relayed answer: the client's own X-Request-Id when it sent a valid one,
# else the proxy's request id (what the openai SDK shows as `_request_id`); a backend's is not relayed
RESP_BACKEND: Final = "x-qtrap-backend"
RESP_PRECISION: Final = "x-qtrap-precision"
# a non-streaming answer's provisional energy figure; the final one is in the record
RESP_ENERGY_PROVISIONAL: Final = "x-qtrap-energy-j-provisional"
# how the backend was chosen: `<policy>; precision=<p>; reason=<reason>` (policy cost or round_robin)
RESP_ROUTE: Final = "x-qtrap-route"

B_HEADER_PREFIX: Final = HEADER_PREFIX.encode()
B_CHAIN_ID: Final = CHAIN_ID.encode()
B_HOP: Final = HOP.encode()
B_HOP_SPLIT: Final = HOP_SPLIT.encode()
B_PRECISION: Final = PRECISION.encode()
B_MODEL: Final = MODEL.encode()
B_TRACEPARENT: Final = TRACEPARENT.encode()
B_TRACESTATE: Final = TRACESTATE.encode()
B_RESP_REQUEST_ID: Final = RESP_REQUEST_ID.encode()
B_RESP_BACKEND: Final = RESP_BACKEND.encode()
B_RESP_PRECISION: Final = RESP_PRECISION.encode()
B_RESP_ENERGY_PROVISIONAL: Final = RESP_ENERGY_PROVISIONAL.encode()
B_RESP_ROUTE: Final = RESP_ROUTE.encode()

# -- routing decisions (x-qtrap-route's reason, qtrap_route_decisions_total's reason label) -------------
ROUTE_POLICIES: Final = ("round_robin", "cost")
ROUTE_REASONS: Final = (
    "pinned",
    "cheapest",
    "explore",
    "sticky",
    "ramp",
    "fallback",
    "no_data",
    "round_robin",
)

# -- the admin API (paths are starlette route templates; `path()` fills them) -------------------------
ADMIN_PREFIX: Final = "/qtrap/v1"
REQUEST_PATH: Final = ADMIN_PREFIX + "/requests/{request_id}"
CHAIN_PATH: Final = ADMIN_PREFIX + "/chains/{chain_id}"
CHAIN_SCORE_PATH: Final = ADMIN_PREFIX + "/chains/{chain_id}/score"
ENERGY_PATH: Final = ADMIN_PREFIX + "/energy"
KEYS_PATH: Final = ADMIN_PREFIX + "/keys"
KEY_USAGE_PATH: Final = ADMIN_PREFIX + "/keys/{key_id}/usage"
REQUESTS_PATH: Final = ADMIN_PREFIX + "/requests"  # the records query (paged)
USAGE_PATH: Final = ADMIN_PREFIX + "/usage"  # usage sums, grouped
ROUTING_PATH: Final = ADMIN_PREFIX + "/routing"
BACKENDS_PATH: Final = ADMIN_PREFIX + "/backends"


def path(template: str, **params: str) -> str:
    """An admin path with its ``{name}`` parameters filled in (values are not escaped: callers pass ids
    the proxy issued or validated, which contain no ``/``)."""
    return template.format(**params)


# -- request statuses (a record's ``status``, the ``status`` label of qtrap_requests_total) ------------
STATUSES: Final = (
    "in_flight", "ok", "upstream_error", "upstream_unreachable", "upstream_timeout", "stream_broken",
    "client_disconnected", "bad_request", "not_found", "unauthorized", "forbidden", "too_large",
    "internal_error",
)  # fmt: skip


# -- the request record (GET /qtrap/v1/requests/{id}, the ledger's rows) ------------------------------
class Timeline(TypedDict):
    t_s: list[float]  # chunk arrival times, seconds after the request started
    tokens: list[int]  # tokens in each chunk


class HopEnergy(TypedDict):
    index: int  # 1-based hop
    tokens: int | None
    energy_j: float | None


class EngineTiming(TypedDict):
    """When the engine says the request's phases ran, in seconds from the request's start at the proxy
    (engine_facts: otlp or headers), placed on the proxy's clock within ``clock_error_s``."""

    source: str  # otlp | headers
    queued_s: float | None
    prefill_start_s: float
    first_token_s: float | None  # None: the engine does not separate prefill from decode (TGI)
    last_token_s: float
    prompt_tokens: int | None
    completion_tokens: int | None
    clock_error_s: float


class RequestRecord(TypedDict):
    id: str
    chain_id: str | None
    hop: int | None
    key_id: str | None
    client_request_id: str | None  # the client's X-Request-Id, when it sent a valid one
    route: str
    stream: bool
    pool: str | None
    backend: str | None
    precision: str | None
    status: str
    http_status: int | None
    error: str | None
    start_unix_s: float
    prompt_tokens: int | None
    cached_tokens: int | None  # prompt tokens the engine's prefix cache held, where its usage said
    completion_tokens: int | None
    ttft_s: float | None
    e2e_s: float | None
    chunks: int
    tokens_exact: bool
    timeline: Timeline
    devices: list[str]
    meter: str
    final: bool
    energy_j: float | None
    idle_energy_j: float | None
    j_per_token: float | None
    error_bound_j: float | None
    energy_null_reason: str | None
    provisional: bool
    hops: list[HopEnergy]
    # whose view placed the request's work: the engine's facts, or the proxy's own (and why, where the
    # engine's facts were expected); the facts themselves when they came
    facts: str  # engine | proxy
    facts_reason: str | None
    engine_timing: EngineTiming | None
    # meter.compare_views: the final energy the proxy's own view would have given (null otherwise)
    energy_proxy_view_j: float | None
    # carbon and cost (qtrap_proxy/carbon.py), computed once the energy is final (null with the reason
    # before, and where the energy or the intensity is unknown): co2e_g = energy_j / 3.6e6 x pue x
    # carbon_intensity_g_per_kwh, cost = energy_j / 3.6e6 x pue x pricing.price_per_kwh. Absent from
    # records of ledgers written before they existed.
    co2e_g: NotRequired[float | None]
    co2e_null_reason: NotRequired[str | None]
    carbon_intensity_g_per_kwh: NotRequired[float | None]  # the intensity used
    pue: NotRequired[float]
    cost: NotRequired[float | None]
    cost_currency: NotRequired[str | None]  # ISO 4217 (pricing.currency)
    cost_null_reason: NotRequired[str | None]
    # read back from the ledger only, and only when the record could not be stored as it was (a value
    # SQLite or the serialiser refused): what was done instead (qtrap_proxy/ledger.py)
    ledger_error: NotRequired[str]


# -- the chain summary (GET /qtrap/v1/chains/{id}) ----------------------------------------------------
class ChainHop(TypedDict):
    index: int | None
    request_id: str
    status: str | None
    tokens: int | None
    energy_j: float | None
    final: bool | None


class ChainSummary(TypedDict):
    chain_id: str
    requests: int
    final: bool
    energy_j: float | None
    energy_null_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    hops: list[ChainHop]
    records: list[RequestRecord]


class ChainPage(ChainSummary):
    """A page of a chain's summary (``?offset=&limit=``): totals stay the chain's."""

    offset: int
    limit: int
    next_offset: int | None


# -- a page of the records query (GET /qtrap/v1/requests) ---------------------------------------------
class RecordPage(TypedDict):
    object: str  # "list"
    data: list[RequestRecord]
    order: str  # desc (newest first) | asc
    limit: int
    has_more: bool
    next_cursor: str | None  # give it as `cursor=` for the next page; null on the last


# -- usage sums (GET /qtrap/v1/usage; GET /qtrap/v1/keys/{id}/usage has the same sums) -----------------
class UsageSums(TypedDict):
    """Sums over final records: energy covers the requests whose energy is known (null, with a reason,
    when none is); the others are counted in ``energy_unknown_requests``, never as 0 J."""

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
    # the CO2e and cost of the requests whose figure is known; the others counted, never as 0 (absent from
    # the answers of proxies that predate them)
    co2e_g: NotRequired[float | None]
    co2e_unknown_requests: NotRequired[int]
    co2e_null_reason: NotRequired[str | None]
    cost: NotRequired[float | None]
    cost_currency: NotRequired[str | None]
    cost_unknown_requests: NotRequired[int]
    cost_null_reason: NotRequired[str | None]


class UsageGroup(UsageSums):
    """One group's sums; the group's fields are those named in ``group_by``."""

    pool: NotRequired[str | None]
    precision: NotRequired[str | None]
    backend: NotRequired[str | None]
    key: NotRequired[str | None]
    status: NotRequired[str | None]


class UsageReport(TypedDict):
    since_unix_s: float
    until_unix_s: float | None
    group_by: list[str]
    groups: list[UsageGroup]
    truncated: bool  # more than 1000 groups (the total stays whole)
    total: UsageSums
    not_final_requests: int  # selected requests not final yet, not in the sums
    note: str
