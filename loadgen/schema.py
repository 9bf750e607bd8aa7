"""report.json as pydantic models: the one place of ``SCHEMA_VERSION``, the models ``build()`` validates
and ``load()`` reads, and the JSON Schema exported to docs/report-schema.json (``python -m loadgen schema``).

docs/report-schema.md documents every field; tests/unit/loadgen/test_schema.py fails when it, the exported
JSON Schema and these models disagree.

Compatibility: ``schema_version`` is ``MAJOR.MINOR`` and minor versions only add fields. Fields added after
1.0 have defaults, so reports of older minor versions load; ``load()`` reads a report of a newer minor
version with the fields it added ignored (``Report.model_validate(doc, context={IGNORE_UNKNOWN: True})``);
otherwise an unknown field is an error (``extra="forbid"``), so a figure the analysis adds without a field
here fails ``build()``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    WithJsonSchema,
    model_serializer,
    model_validator,
)
from pydantic.json_schema import GenerateJsonSchema

SCHEMA_VERSION = "1.5"
GENERATOR = "qtrap loadgen"
IGNORE_UNKNOWN = "ignore_unknown_fields"  # validation context key: a report of a newer minor version
SCHEMA_COMMAND = "python -m loadgen schema > docs/report-schema.json"

Metric = Literal["j_per_correct", "j_per_token"]
# [lo, hi]: a 95% bootstrap interval; [open, close]: a window on time.monotonic()
Interval = Annotated[list[float], Field(min_length=2, max_length=2)]


def _number(value: Any) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("Input should be a number")
    return value


# a figure JSON may carry as an integer (B* is exactly a swept concurrency when a level's ratio is 1):
# kept as written (a float field would make 8 8.0), so a report dumps to the same bytes it was built from
Number = Annotated[int | float, PlainValidator(_number), WithJsonSchema({"type": "number"})]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    @model_validator(mode="before")
    @classmethod
    def _ignore_unknown(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict) and info.context and info.context.get(IGNORE_UNKNOWN):
            return {k: v for k, v in data.items() if k in cls.model_fields}
        return data


class Config(_Model):
    """The run's settings; a report records those it was given (a run of ``python -m loadgen`` sets all;
    older runs lack the later ones)."""

    proxy: str | None = None
    """the proxy's URL, or which embedded default ran"""
    model: str | None = None
    """the pool (model) asked for"""
    precisions: list[str] | None = None
    """the precisions swept"""
    baseline: str | None = None
    """the precision others are compared with"""
    concurrency: list[int] | None = None
    """the concurrency levels swept"""
    dataset: str | None = None
    """synthetic, gsm8k or mathqa"""
    data_file: str | None = None
    """the local dataset file, or null"""
    hops: Literal["requests", "stream"] | None = None
    """requests: one request per hop; stream: one request per problem split into hops by the proxy"""
    num_chains: int | None = None
    """measured chains per level (`--num-chains`), or null"""
    duration_s: float | None = None
    """seconds of steady state per level (`--duration`), or null"""
    warmup: int | None = None
    """warm-up chains per level (`--warmup`), or null for the default (the concurrency)"""
    repeats: int | None = None
    """times each level ran"""
    seed: int | None = None
    """problem order, synthetic problems and sampling seed"""
    max_tokens: int | None = None
    """max_tokens of every request"""
    extra_body: dict[str, Any] | None = None
    """fields added to every request body (`--extra-body`)"""
    bootstrap: int | None = None
    """bootstrap replicates"""
    index_weights: list[float] | None = None
    """weights of the trust, sustainability and economy indices"""
    scoring: str | None = None
    """how answers were scored ("not scored: REASON" with `--no-score`)"""
    no_score: str | None = None
    """`--no-score`'s REASON, or null"""
    argv: list[str] | None = None
    """the command line's arguments"""
    schedule: str | None = None
    """`--schedule` as given (steps, ramp or day), or null for fixed levels; added in 1.2"""
    schedule_unit: str | None = None
    """what the schedule's values are: concurrency, chains/s or requests/s; added in 1.2"""
    arrivals: str | None = None
    """the open loop's arrival process (poisson or uniform), null for concurrency; added in 1.2"""
    window_s: float | None = None
    """length of the schedule's time windows (`--window`); added in 1.2"""

    @model_serializer(mode="wrap")
    def _as_given(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if k in self.model_fields_set}


class HopAccuracy(_Model):
    """Chains of one hop count."""

    chains: int
    correct: int
    accuracy: float


class Accuracy(_Model):
    """One precision's accuracy over all its measured chains."""

    chains: int
    """measured chains scored (without scoring: those that got an answer)"""
    correct: int | None
    """chains answered correctly (strict); null without scoring"""
    accuracy: float | None
    """correct / chains (strict); null without scoring or without chains"""
    accuracy_flexible: float | None
    """the same, scored flexibly"""
    ci: Interval | None
    """95% bootstrap interval of the accuracy"""
    by_hops: dict[str, HopAccuracy]
    """by the chain's hop count; empty without scoring"""
    null_reason: str | None = None
    """why the figures are null (`--no-score`'s REASON); added in 1.1"""


class Percentiles(_Model):
    """Percentiles in seconds; null without a sample."""

    p50: float | None
    p90: float | None
    p99: float | None
    mean: float | None = None
    """the mean; added in 1.3"""


class Spread(_Model):
    """One figure across a level's repeats."""

    values: list[float | None]
    """per repeat, in the order of `RepeatSpread.repeats`; null where unknown"""
    sd: float
    """standard deviation (n - 1) of the known values"""
    min: float
    max: float
    range: float
    """max - min"""
    half_width: float
    """1.96 x sd / sqrt(n): the half-width of the repeats' 95% interval of their mean"""


class RepeatSpread(_Model):
    """How a level's repeats agree (`--repeats` > 1); a figure is null with fewer than two known values."""

    repeats: list[int]
    """the repeat indices (0-based)"""
    j_per_token: Spread | None
    j_per_chain: Spread | None
    j_per_correct: Spread | None


class LevelCI(_Model):
    """95% bootstrap intervals of a level's energy figures."""

    level: float
    """the confidence level, 0.95"""
    j_per_token: Interval | None
    j_per_chain: Interval | None
    j_per_correct: Interval | None
    """null without scoring"""
    bootstrap: dict[str, Interval | None] | None = None
    """the bootstrap intervals before widening, when a figure was widened; added in 1.3"""
    widened: list[str] = Field(default_factory=list)
    """figures whose interval was widened because the repeats disagree more than the bootstrap says
    (docs/methodology.md, "Repeats"); added in 1.3"""


class HopEnergy(_Model):
    """A level's window requests of one hop number."""

    requests: int
    energy_j: float
    tokens: int
    j_per_request: float
    j_per_token: float | None


class LevelTimeline(_Model):
    """One repeat of a level over time, in bins, from its requests on loadgen's clock."""

    repeat: int
    """the repeat drawn (the first)"""
    bin_s: float
    """the bins' length"""
    t_s: list[float]
    """each bin's start, seconds from the level's start (warm-up and drain included)"""
    window_s: Interval | None
    """the steady-state window [open, close], seconds from the level's start; null without one"""
    in_flight: list[float]
    """mean requests in flight"""
    tokens_per_s: list[float]
    """completion tokens per second (each request's tokens spread evenly from its first to last token)"""
    attributed_power_w: list[float]
    """the requests' final attributed energy per second (each request's spread evenly over its life)"""
    energy_unknown_requests: int
    """successful requests without a final energy figure (left out of attributed_power_w)"""
    measured_power_w: float | None
    """the level's devices' counters over this repeat's window / its length; null without both
    snapshots"""


class Level(_Model):
    """One (precision, concurrency) level, its repeats merged."""

    precision: str
    concurrency: int
    repeats: int
    chains: int
    """measured chains (warm-up excluded)"""
    chains_ok: int | None = None
    """measured chains that got an answer (every request succeeded); added in 1.1"""
    chains_scored: int
    """measured chains scored (0 without scoring)"""
    requests: int
    """all requests of the level, warm-up included"""
    errors: int
    """failed requests"""
    error_kinds: dict[str, int]
    """failed requests by kind (`HTTP 502`, `connection`, `timed out`, `stream error`, ...)"""
    tokens: int
    """completion tokens of measured requests"""
    window_s: float
    """steady-state window length, summed over repeats"""
    windows_monotonic_s: list[Interval] = Field(default_factory=list)
    """[open, close] per repeat on loadgen's time.monotonic(); added in 1.1"""
    window_requests: int
    """requests inside the window with a final energy figure"""
    energy_j: float | None
    """energy of the window requests; null when none is known"""
    energy_null_reason: str | None
    """why energy_j is null (the most common reason), else null"""
    energy_unknown_requests: int
    """window requests whose energy is unknown"""
    co2e_g: float | None = None
    """gCO2e of the window requests with a known energy, from the proxy's records (GPU energy x PUE x grid
    intensity); null when none is known; added in 1.4"""
    co2e_null_reason: str | None = None
    """why co2e_g is null (the most common reason); added in 1.4"""
    co2e_unknown_requests: int = 0
    """window requests with a known energy but no co2e_g; added in 1.4"""
    cost: float | None = None
    """cost of the same energy at the proxy's pricing.price_per_kwh, in cost_currency; added in 1.4"""
    cost_currency: str | None = None
    cost_null_reason: str | None = None
    cost_unknown_requests: int = 0
    j_per_token: float | None
    j_per_request: float | None
    j_per_chain: float | None
    j_per_correct: float | None
    measured_j_per_token: float | None
    """device counters over the window / tokens in it; null for windows under 2 s"""
    energy_by_hop: dict[str, HopEnergy] = Field(default_factory=dict)
    """window requests by their hop number in the chain (1: the first); added in 1.1"""
    accuracy: float | None
    """this level's measured chains, strict; null without scoring"""
    accuracy_flexible: float | None
    accuracy_by_hops: dict[str, float]
    """{hops: accuracy}; empty without scoring"""
    accuracy_null_reason: str | None = None
    """`--no-score`'s REASON, or null; added in 1.1"""
    tokens_per_s: float | None
    """steady-state output tokens per second"""
    requests_per_s: float | None = None
    """successful requests that ended inside the window per second of window; added in 1.3"""
    ttft_s: Percentiles
    """time to first token"""
    itl_s: Percentiles
    """inter-token latency: each request's mean time per output token after the first (vLLM's TPOT)"""
    e2e_s: Percentiles
    """request latency, send to last token"""
    ci: LevelCI
    repeat_spread: RepeatSpread | None = None
    """the repeats' figures and spread; null with one repeat; added in 1.3"""
    timeline: LevelTimeline | None = None
    """the first repeat over time (power, throughput, requests in flight); added in 1.4"""
    interrupted: bool
    """the level was cut short by Ctrl-C"""

    @model_validator(mode="after")
    def _unknown_energy_has_a_reason(self) -> Level:
        if self.energy_j is None and not self.energy_null_reason:
            raise ValueError("energy_j is null without energy_null_reason")
        return self


class Crossing(_Model):
    """Where the ratio crosses 1."""

    b_star: Number
    direction: Literal["below", "above"]
    """below: the quantized precision is cheaper below b_star"""


class Crossover(_Model):
    """B* of one quantized precision against the baseline on one metric."""

    precision: str
    baseline: str
    metric: Metric
    concurrency: list[int]
    """the levels both precisions ran"""
    ratio: list[float | None]
    """quantized / baseline at each of them; null where unknown"""
    b_star: Number | None
    """the first concurrency where the ratio crosses 1 (log-log interpolation); null when it does not"""
    all_crossings: list[Crossing]
    direction: str | None
    """<p> cheaper below B*, cheaper above B*, cheaper at every swept concurrency or dearer at every swept
    concurrency; null with fewer than two ratios"""
    note: str
    """the finding in words"""
    ci_coverage: float | None
    """the share of bootstrap replicates that cross in b_star's direction (in either direction when the point
    estimate does not cross)"""
    ci: Interval | None
    """95% bootstrap interval of B* over the replicates that cross in the same direction"""
    ratio_ci: list[Interval | None] | None = Field(default=None, exclude_if=lambda v: v is None)
    """bootstrap interval of each ratio; absent with fewer than two ratios"""
    status: Literal["determined", "not_determined", "none_in_range", "too_few_levels"] | None = None
    """determined: b_star is settled; not_determined: b_star is null because the bootstrap does not
    settle it (undetermined_reason); none_in_range: no crossover, and the replicates agree;
    too_few_levels: fewer than two ratios; added in 1.3"""
    b_star_point: Number | None = None
    """the point estimate of B*, kept when status is not_determined; added in 1.3"""
    undetermined_reason: str | None = None
    """why B* (or its absence) is not determined; added in 1.3"""


class IndexWeights(_Model):
    """The composite's weights, normalised to sum 1."""

    trust: float
    sustainability: float
    economy: float


class Index(_Model):
    """The indices of one quantized precision at one concurrency, against the baseline."""

    precision: str
    baseline: str
    concurrency: int
    bits: int | None
    """the precision's bit width, null when unknown"""
    casting_overhead_ratio: float | None
    """J/token against the baseline's scaled linearly in bits"""
    trust_index: float | None
    """accuracy / the baseline's; null without scoring"""
    sustainability_index: float | None
    """the baseline's J per correct answer / this one's; null without scoring"""
    economy_index: float | None
    """tokens/s / the baseline's"""
    weights: IndexWeights
    composite_index: float | None
    """the weighted sum of the three indices; null when one is"""


class DeviceEnergy(_Model):
    """One device's energy accounts over the proxy's lifetime (attributed + idle + foreign = measured)."""

    device: str
    meter: str | None
    meter_up: bool | None
    updates: int | None
    counter_resets: int | None
    measured_j: float | None
    attributed_j: float | None
    idle_j: float | None
    foreign_j: float | None
    conservation_error_j: float | None
    conservation_error_ratio: float | None
    pending_intervals: int | None
    run_measured_j: float | None
    """the counter's increase from the start of the sweep to the end of its last level"""


class Energy(_Model):
    """The proxy's energy accounts (GET /qtrap/v1/energy) after the last level."""

    devices: list[DeviceEnergy]
    null_reason: str | None
    """why there are no devices: the proxy did not answer, meters none, or this was not recorded"""

    @model_validator(mode="after")
    def _no_devices_has_a_reason(self) -> Energy:
        if not self.devices and not self.null_reason:
            raise ValueError("no devices without null_reason")
        return self


class LatencyCI(_Model):
    """Percentiles in seconds with their 95% bootstrap intervals (requests resampled); null without a
    sample (intervals also with fewer than 10 requests)."""

    p50: float | None
    p90: float | None
    p99: float | None
    p50_ci: Interval | None
    p90_ci: Interval | None
    p99_ci: Interval | None


class ScheduleWindow(_Model):
    """One time window of a schedule run (the last may be shorter; windows after the schedule's end are
    the drain)."""

    t_start_s: float
    """seconds from the run's start"""
    t_end_s: float
    offered: float
    """the schedule's mean value over the window (concurrency, chains/s or requests/s); 0 in the drain"""
    chains_in_flight: float
    """mean chains in flight"""
    requests_in_flight: float
    """mean requests in flight"""
    requests_started: int
    requests_ended: int
    errors: int
    """failed requests that ended in the window"""
    tokens: float
    """completion tokens streamed in the window (each request's spread over its first to last token)"""
    tokens_per_s: float
    energy_j: float | None
    """the fleet's device counters' increase over the window (every device, idle included)"""
    energy_null_reason: str | None
    j_per_token: float | None
    """energy_j / tokens"""
    chains_ended: int
    correct: int | None
    """chains that ended in the window with a correct answer; null without scoring"""
    j_per_correct: float | None
    """energy_j / correct; null without a correct chain ending in the window"""


class ScheduleTotals(_Model):
    """A schedule run as a whole, from its start to the end of its drain."""

    duration_s: float
    """the run: the schedule and the drain"""
    schedule_s: float
    """the schedule alone"""
    chains: int
    """chains started"""
    chains_ok: int
    """chains that got an answer (every request succeeded)"""
    correct: int | None
    """chains answered correctly (strict); null without scoring"""
    accuracy: float | None
    """correct / chains_ok; null without scoring"""
    accuracy_ci: Interval | None
    """95% bootstrap interval (chains resampled)"""
    requests: int
    errors: int
    tokens: int
    """completion tokens of the successful requests"""
    tokens_per_s: float | None
    fleet_energy_j: float | None
    """every device's counter increase over the run, idle devices and idle time included"""
    fleet_energy_null_reason: str | None
    energy_by_device: dict[str, float]
    """{device: J} over the run"""
    attributed_energy_j: float | None
    """the sum of the requests' final attributed energy (the proxy's records), where known"""
    energy_unknown_requests: int
    """successful requests without a final attributed figure"""
    j_per_token: float | None
    """fleet_energy_j / tokens"""
    j_per_correct: float | None
    """fleet_energy_j / correct"""
    j_per_correct_ci: Interval | None
    """95% bootstrap interval (chains resampled; the fleet's energy held fixed)"""
    ttft_s: LatencyCI
    e2e_s: LatencyCI
    precision_requests: dict[str, int]
    """successful requests by the precision that served them (the record's, else x-qtrap-precision)"""
    precision_share: dict[str, float]
    """the same as shares of the successful requests"""


class ScheduleRun(_Model):
    """One run of the schedule, pinned to one precision or under one routing policy."""

    label: str
    """the precision pinned, or the routing policy (compare-routing)"""
    model: str
    """the model field sent (`pool@precision` when pinned)"""
    schedule: str
    unit: Literal["concurrency", "chains/s", "requests/s"]
    arrivals: Literal["poisson", "uniform"] | None
    """null for concurrency"""
    window_s: float
    interrupted: bool
    windows: list[ScheduleWindow]
    totals: ScheduleTotals


class ReportWarning(_Model):
    """A validity check that failed (docs/methodology.md, "Validity checks")."""

    code: Literal[
        "short_window",
        "few_chains",
        "bstar_undetermined",
        "ratio_spans_one",
        "attribution_mismatch",
        "errors",
        "simulated",
    ]
    level: Literal["warning", "info"]
    """warning: a figure may not mean what it says (`--strict` exits 3); info: context"""
    message: str
    precision: str | None = None
    """the level or crossover concerned, where there is one"""
    concurrency: int | None = None
    metric: Metric | None = None


class Checks(_Model):
    """The thresholds the validity checks used."""

    min_window_s: float
    """shortest steady-state window of a repeat (`--min-window-s`; default min_window_updates meter
    updates)"""
    min_window_s_source: str
    """how min_window_s was chosen"""
    min_window_updates: int
    min_chains: int
    """fewest measured chains per level (`--min-chains`)"""
    min_bstar_coverage: float
    """the share of bootstrap replicates that must agree on B*"""
    max_attribution_gap: float
    """largest relative difference of attributed and measured J/token"""
    max_error_rate: float
    """largest share of failed requests per level"""


class GPU(_Model):
    """One metered device."""

    device: str
    """the device's key in the proxy (host:index)"""
    name: str | None
    """the GPU's name as its meter reports it (NVML, dcgm-exporter's modelName), or null"""
    update_period_s: float | None
    """mean seconds between its energy counter's updates, as the proxy saw them"""


class BackendInfo(_Model):
    """One backend behind the proxy and the engine it runs (GET /qtrap/v1/backends)."""

    name: str
    pool: str
    precision: str
    kind: str
    """vllm, tgi or openai (the proxy's config)"""
    model: str
    """the model id the proxy asks the backend for"""
    url: str | None
    devices: list[str]
    engine: str
    """vLLM, TGI, OpenAI-compatible, or qtrap-sim (simulated)"""
    engine_version: str | None
    """from vLLM's GET /version or TGI's GET /info; null when the backend does not say"""
    simulated: bool
    served_model: str | None
    """the model the engine says it serves (vLLM's /v1/models root, TGI's model_id)"""
    max_model_len: int | None
    dtype: str | None
    """TGI's model_dtype"""
    engine_error: str | None
    """why the engine's version is unknown"""


class Meter(_Model):
    """The proxy's meter (GET /qtrap/v1/energy)."""

    kind: str | None
    """nvml, dcgm or null"""
    policy: str | None
    """full (requests carry idle power while in flight) or active"""
    interval_s: float | None
    """the proxy's sampling cadence"""
    update_period_s: float | None
    """the median over devices of the counters' update period"""


class Context(_Model):
    """What ran, where and when: the report's header."""

    date_utc: str
    """when the run started, ISO 8601 in UTC"""
    qtrap_version: str
    command_line: str
    proxy_url: str
    """the proxy loadgen drove (the embedded default's own proxy included)"""
    embedded: bool
    """the embedded default (simulated backends) ran"""
    model: str
    """the pool asked for"""
    dataset: str
    data_file: str | None
    hops: str
    """requests (one request per hop) or stream (one split stream per problem)"""
    backends: list[BackendInfo]
    """the backends of the pool that served this run"""
    backends_null_reason: str | None
    """why backends is empty (a proxy without GET /qtrap/v1/backends), else null"""
    gpus: list[GPU]
    """the devices of those backends, as metered"""
    gpu_count: int
    gpu_names: list[str]
    """the distinct GPU names"""
    meter: Meter


def _not_recorded() -> Energy:
    return Energy(devices=[], null_reason="not recorded")


class Report(_Model):
    """report.json of `python -m loadgen` (docs/report-schema.md). Figures in base units (J, s,
    tokens/s); unknown values are null, never 0."""

    schema_version: str = Field(pattern=r"^\d+\.\d+$")
    """MAJOR.MINOR; a reader accepts its own major version"""
    generator: str
    """the writer: qtrap loadgen"""
    partial: bool
    """the run was interrupted (Ctrl-C); the levels that ran are reported"""
    started_unix_s: float
    duration_s: float
    config: Config
    baseline: str | None
    """the precision others are compared with"""
    accuracy_measured: bool = True
    """false when answers were not scored (`--no-score`); added in 1.1"""
    accuracy_null_reason: str | None = None
    """`--no-score`'s REASON; added in 1.1"""
    accuracy: dict[str, Accuracy]
    """per precision"""
    levels: list[Level]
    crossovers: list[Crossover]
    indices: list[Index]
    energy: Energy = Field(default_factory=_not_recorded)
    """added in 1.1"""
    schedules: list[ScheduleRun] = Field(default_factory=list)
    """`--schedule` runs, one per precision (levels, crossovers and indices are then empty); added in 1.2"""
    context: Context | None = None
    """the run's header: date, versions, command line, backends, GPUs, meter; added in 1.3 (in `--schedule`
    reports from 1.5)"""
    checks: Checks | None = None
    """the thresholds of the validity checks; added in 1.3"""
    warnings: list[ReportWarning] = Field(default_factory=list)
    """validity checks that failed; added in 1.3"""


class PolicyResult(_Model):
    """One routing policy of `python -m loadgen compare-routing`."""

    policy: str
    """a precision (pinned), round_robin or cost"""
    kind: Literal["pinned", "round_robin", "cost"]
    model: str
    """the model field sent: `pool@precision` when pinned, the pool otherwise"""
    ran: bool
    not_run_reason: str | None
    """why the policy did not run (e.g. the proxy rejected `routing: cost`), one line"""
    run: ScheduleRun | None


class CompareRouting(_Model):
    """compare-routing.json: one schedule under several routing policies, one after another."""

    schema_version: str = Field(pattern=r"^\d+\.\d+$")
    generator: str
    partial: bool
    started_unix_s: float
    duration_s: float
    config: Config
    policies: list[PolicyResult]
    context: Context | None = None
    """the run's header, as in report.json; added in 1.5"""


class _Generator(GenerateJsonSchema):
    """No per-field titles: they only repeat the field names."""

    def field_title_should_be_set(self, schema: Any) -> bool:
        return False


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of report.json, as ``load()`` accepts it."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": f"schema {SCHEMA_VERSION}; generated from loadgen/schema.py by `{SCHEMA_COMMAND}`",
        **Report.model_json_schema(schema_generator=_Generator),
    }


def schema_json() -> str:
    """docs/report-schema.json's text."""
    return json.dumps(json_schema(), indent=2) + "\n"
