"""The three Grafana dashboards, each panel defined once (plain dictionaries in Grafana's JSON model).

* ``qtrap-trap`` "Quantization trap": is a quantized precision dearer than its pool's FP16/BF16
  baseline, per token and per correct answer, over time and by in-flight level; B*; the
  casting-overhead ratio; accuracy by hop depth while loadgen scores chains;
* ``qtrap-requests`` "Requests and hops": energy per request and per hop, tokens/s, TTFT,
  inter-token latency, request duration, requests in flight;
* ``qtrap-fleet`` "Fleet": per-GPU measured, idle and attributed power, conservation, meter and
  backend health.

Queries use the recording rules of :mod:`qtrap_proxy.grafana.rules` (load
``deploy/prometheus/rules/qtrap-recording.yml`` into Prometheus) and the proxy's raw metrics.
Dashboard variables: ``$datasource`` (a Prometheus data source), ``$pool``, ``$precision`` and, on
the fleet dashboard, ``$gpu_device``. Targets Grafana 11 (schema version 39 and later migrate it).
"""

from __future__ import annotations

from typing import Any

from qtrap_proxy.grafana import rules as R

SCHEMA_VERSION = 39
DS = {"type": "prometheus", "uid": "${datasource}"}
TAG = "qtrap"
SEL = 'pool=~"$pool", precision=~"$precision"'

Json = dict[str, Any]


# -- building blocks -----------------------------------------------------------------------------


def target(
    expr: str, legend: str = "__auto", ref: str = "A", *, instant: bool = False, fmt: str = "time_series"
) -> Json:
    return {
        "datasource": DS,
        "refId": ref,
        "expr": expr,
        "legendFormat": legend,
        "range": not instant,
        "instant": instant,
        "format": fmt,
        "editorMode": "code",
    }


def thresholds(*steps: tuple[str, float | None]) -> Json:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for c, v in steps]}


GREEN_BELOW_1 = thresholds(("green", None), ("red", 1))


def field_config(
    unit: str | None = None,
    *,
    decimals: int | None = None,
    custom: Json | None = None,
    thresholds_: Json | None = None,
    mappings: list[Json] | None = None,
    color: str = "palette-classic",
    min_: float | None = None,
) -> Json:
    defaults: Json = {"color": {"mode": color}}
    if unit is not None:
        defaults["unit"] = unit
    if decimals is not None:
        defaults["decimals"] = decimals
    if min_ is not None:
        defaults["min"] = min_
    if thresholds_ is not None:
        defaults["thresholds"] = thresholds_
    if mappings is not None:
        defaults["mappings"] = mappings
    if custom is not None:
        defaults["custom"] = custom
    return {"defaults": defaults, "overrides": []}


def _legend(placement: str = "bottom") -> Json:
    return {"showLegend": True, "displayMode": "list", "placement": placement, "calcs": []}


def timeseries(
    title: str,
    description: str,
    targets: list[Json],
    unit: str,
    *,
    line_at: float | None = None,
    decimals: int | None = None,
    min_: float | None = None,
    w: int = 12,
    h: int = 8,
) -> Json:
    custom: Json = {
        "drawStyle": "line",
        "lineWidth": 1,
        "fillOpacity": 0,
        "showPoints": "auto",
        "spanNulls": False,
    }
    th = None
    if line_at is not None:
        custom["thresholdsStyle"] = {"mode": "line"}
        th = thresholds(("green", None), ("red", line_at))
    return _panel(
        "timeseries",
        title,
        description,
        targets,
        w,
        h,
        options={"legend": _legend(), "tooltip": {"mode": "multi", "sort": "desc"}},
        field_config=field_config(unit, decimals=decimals, custom=custom, thresholds_=th, min_=min_),
    )


def stat(
    title: str,
    description: str,
    targets: list[Json],
    unit: str,
    *,
    th: Json | None = None,
    decimals: int | None = None,
    mappings: list[Json] | None = None,
    w: int = 8,
    h: int = 6,
) -> Json:
    return _panel(
        "stat",
        title,
        description,
        targets,
        w,
        h,
        options={
            "reduceOptions": {"values": False, "calcs": ["lastNotNull"], "fields": ""},
            "orientation": "auto",
            "textMode": "value_and_name",
            "colorMode": "background" if th is not None else "none",
            "graphMode": "none",
            "justifyMode": "auto",
        },
        field_config=field_config(
            unit,
            decimals=decimals,
            thresholds_=th or thresholds(("text", None)),
            mappings=mappings,
            color="thresholds",
        ),
    )


def barchart(
    title: str,
    description: str,
    expr: str,
    x_label: str,
    unit: str,
    *,
    th: Json | None = None,
    decimals: int | None = None,
    w: int = 12,
    h: int = 9,
) -> Json:
    """An instant query as bars: one group per ``x_label`` value, one bar per pool@precision."""
    query = f'label_join({expr}, "series", "@", "pool", "precision")'
    return _panel(
        "barchart",
        title,
        description,
        [target(query, ref="A", instant=True, fmt="table")],
        w,
        h,
        options={
            "orientation": "auto",
            "xField": x_label,
            "showValue": "auto",
            "stacking": "none",
            "groupWidth": 0.7,
            "barWidth": 0.9,
            "xTickLabelRotation": 0,
            "xTickLabelSpacing": 0,
            "legend": _legend(),
            "tooltip": {"mode": "multi", "sort": "none"},
        },
        field_config=field_config(
            unit,
            decimals=decimals,
            thresholds_=th,
            color="thresholds" if th is not None else "palette-classic",
            custom={"fillOpacity": 80, "lineWidth": 1, "gradientMode": "none"},
        ),
        transformations=[
            {
                "id": "groupingToMatrix",
                "options": {"columnField": "series", "rowField": x_label, "valueField": "Value"},
            },
            {
                "id": "sortBy",
                "options": {"fields": {}, "sort": [{"field": f"{x_label}\\series", "desc": False}]},
            },
            {
                "id": "organize",
                "options": {"renameByName": {f"{x_label}\\series": x_label}},
            },
        ],
    )


def heatmap(title: str, description: str, expr: str, unit: str, *, w: int = 12, h: int = 8) -> Json:
    return _panel(
        "heatmap",
        title,
        description,
        [target(expr, "{{le}}", fmt="heatmap")],
        w,
        h,
        options={
            "calculate": False,
            "cellGap": 1,
            "color": {
                "mode": "scheme",
                "scheme": "Oranges",
                "fill": "dark-orange",
                "scale": "exponential",
                "exponent": 0.5,
                "steps": 64,
                "reverse": False,
            },
            "yAxis": {"axisPlacement": "left", "unit": unit},
            "rowsFrame": {"layout": "auto"},
            "showValue": "never",
            "legend": {"show": True},
            "tooltip": {"mode": "single", "yHistogram": True, "showColorScale": False},
            "exemplars": {"color": "rgba(255,0,255,0.7)"},
        },
        field_config=field_config(None, color="palette-classic"),
    )


def table(
    title: str,
    description: str,
    targets: list[Json],
    renames: dict[str, str],
    hide: list[str],
    *,
    w: int = 24,
    h: int = 7,
) -> Json:
    return _panel(
        "table",
        title,
        description,
        targets,
        w,
        h,
        options={
            "showHeader": True,
            "cellHeight": "sm",
            "footer": {"show": False, "reducer": ["sum"], "fields": ""},
        },
        field_config=field_config(
            None, decimals=2, color="thresholds", thresholds_=thresholds(("text", None))
        ),
        transformations=[
            {"id": "merge", "options": {}},
            {
                "id": "organize",
                "options": {"excludeByName": dict.fromkeys(hide, True), "renameByName": renames},
            },
        ],
    )


def _panel(
    kind: str,
    title: str,
    description: str,
    targets: list[Json],
    w: int,
    h: int,
    *,
    options: Json,
    field_config: Json,
    transformations: list[Json] | None = None,
) -> Json:
    p: Json = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"h": h, "w": w, "x": 0, "y": 0},
        "targets": targets,
        "options": options,
        "fieldConfig": field_config,
    }
    if transformations:
        p["transformations"] = transformations
    return p


def row(title: str) -> Json:
    return {
        "type": "row",
        "title": title,
        "collapsed": False,
        "gridPos": {"h": 1, "w": 24, "x": 0, "y": 0},
        "panels": [],
    }


def _layout(panels: list[Json]) -> list[Json]:
    """Flow panels left to right in rows of 24 columns; a row panel starts a new line. Ids in order."""
    x = y = line_h = 0
    for i, p in enumerate(panels, start=1):
        p["id"] = i
        g = p["gridPos"]
        if p["type"] == "row" or x + g["w"] > 24:
            y, x, line_h = y + line_h, 0, 0
        g["x"], g["y"] = x, y
        if p["type"] == "row":
            y += 1
            continue
        x += g["w"]
        line_h = max(line_h, g["h"])
    return panels


def _query_var(name: str, label: str, query: str, *, all_value: str = ".+") -> Json:
    return {
        "type": "query",
        "name": name,
        "label": label,
        "datasource": DS,
        "query": {"query": query, "refId": f"{name}-var", "qryType": 1},
        "refresh": 2,
        "multi": True,
        "includeAll": True,
        "allValue": all_value,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
        "regex": "",
        "sort": 1,
        "hide": 0,
        "skipUrlSync": False,
    }


def _datasource_var() -> Json:
    return {
        "type": "datasource",
        "name": "datasource",
        "label": "Prometheus",
        "query": "prometheus",
        "current": {},
        "options": [],
        "refresh": 1,
        "regex": "",
        "hide": 0,
        "skipUrlSync": False,
    }


POOL_VAR = _query_var("pool", "Pool", 'label_values(qtrap_requests_total{pool!=""}, pool)')
PRECISION_VAR = _query_var(
    "precision", "Precision", 'label_values(qtrap_requests_total{pool=~"$pool", precision!=""}, precision)'
)
DEVICE_VAR = _query_var("gpu_device", "GPU", "label_values(qtrap_gpu_energy_joules_total, gpu_device)")


def _dashboard(uid: str, title: str, description: str, variables: list[Json], panels: list[Json]) -> Json:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": [TAG],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "links": [
            {
                "type": "dashboards",
                "title": "qtrap",
                "tags": [TAG],
                "asDropdown": False,
                "includeVars": True,
                "keepTime": True,
                "icon": "external link",
                "targetBlank": False,
                "tooltip": "",
                "url": "",
            }
        ],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": {"list": [_datasource_var(), *variables]},
        "panels": _layout(panels),
    }


# -- Quantization trap -----------------------------------------------------------------------------

_RATIO_READING = (
    "Each precision is measured at the load it served over the window, so read it beside "
    "'Requests in flight': a ratio taken while the baseline idled or ran at another load compares "
    "different operating points. The panels 'by in-flight level' compare at equal load."
)


def _label(metric: str) -> str:
    return "J/token" if metric == "j_per_token" else "J per correct answer"


def trap_dashboard() -> Json:
    ratio_sel = '{pool=~"$pool", precision=~"$precision"}'
    panels: list[Json] = [
        row("Is the quantized precision the dearer one? (last 5 minutes)"),
        stat(
            "Trap indicator: J/token ratio to baseline",
            "Energy per completion token of each non-baseline precision divided by its pool's baseline "
            "(fp16, else bf16, else fp32) over the last 5 minutes "
            f"(`{R.J_PER_TOKEN_RATIO}`). Green below 1: the precision saves energy per token. "
            "Red at 1 and above: the quantization trap at the current load, the precision costs more "
            "energy per token than the baseline (alert QtrapTrapActive when it lasts 10 minutes). "
            + _RATIO_READING,
            [target(f"{R.J_PER_TOKEN_RATIO}{ratio_sel}", "{{pool}}@{{precision}} / {{baseline}}")],
            "none",
            th=GREEN_BELOW_1,
            decimals=2,
        ),
        stat(
            "J per correct answer: ratio to baseline",
            "Energy per chain answered correctly (loadgen scores each chain and reports it to the proxy: "
            "`qtrap_chains_scored_total`) of each non-baseline precision divided by the baseline's, over "
            f"the last 5 minutes (`{R.J_PER_CORRECT_RATIO}`). Below 1 the quantized precision "
            "answers correctly for less energy, accuracy losses included. Empty unless loadgen (or "
            "another client) reports scores. " + _RATIO_READING,
            [target(f"{R.J_PER_CORRECT_RATIO}{ratio_sel}", "{{pool}}@{{precision}} / {{baseline}}")],
            "none",
            th=GREEN_BELOW_1,
            decimals=2,
        ),
        stat(
            "B* estimate (requests in flight, last 30 minutes)",
            "The in-flight level where a precision's J/token (or J per correct answer) ratio to the "
            "baseline crosses 1, interpolated in log(in-flight) and log(ratio) between the two measured "
            "in-flight levels on either side, as loadgen interpolates between concurrency levels "
            "(the bar charts below show the levels). 'cheaper below': the quantized precision saves "
            "energy below B* and is the dearer one above it; 'cheaper above': the reverse. No value when "
            "the ratio does not cross 1 exactly once among the levels measured in the last 30 minutes "
            "(cheaper or dearer everywhere, or only one level measured). Loadgen's report gives B* "
            "with a confidence interval; this is a live estimate without one.",
            [
                target(
                    f"{R.bstar('j_per_token')}{ratio_sel}",
                    "{{pool}}@{{precision}} J/token, cheaper {{direction}}",
                    "A",
                ),
                target(
                    f"{R.bstar('j_per_correct')}{ratio_sel}",
                    "{{pool}}@{{precision}} J/correct, cheaper {{direction}}",
                    "B",
                ),
            ],
            "none",
            decimals=1,
        ),
        row("Energy per token and per correct answer over time"),
        timeseries(
            "J/token by precision",
            "Attributed energy (final figures) per completion token, 5-minute rates "
            f"(`{R.J_PER_TOKEN}`). With the proxy's full policy it includes prefill and the idle power "
            "drawn while requests were in flight, as loadgen's J/token does.",
            [target(f"{R.J_PER_TOKEN}{{{SEL}}}", "{{pool}}@{{precision}}")],
            "joule",
            decimals=3,
            min_=0,
        ),
        timeseries(
            "J per correct answer by precision",
            "Attributed energy of the pool's precision divided by its chains scored correct, 5-minute "
            f"rates (`{R.J_PER_CORRECT}`). It charges all of the precision's energy to the scored chains, "
            "so it is loadgen's figure only while loadgen's chains are its traffic.",
            [target(f"{R.J_PER_CORRECT}{{{SEL}}}", "{{pool}}@{{precision}}")],
            "joule",
            decimals=1,
            min_=0,
        ),
        timeseries(
            "Ratio to baseline over time",
            "J/token and J per correct answer of each non-baseline precision divided by the "
            "baseline's (5-minute rates). Above the red line at 1 the quantized precision is the dearer "
            "one. " + _RATIO_READING,
            [
                target(f"{R.J_PER_TOKEN_RATIO}{ratio_sel}", "{{pool}}@{{precision}} J/token", "A"),
                target(f"{R.J_PER_CORRECT_RATIO}{ratio_sel}", "{{pool}}@{{precision}} J/correct", "B"),
            ],
            "none",
            line_at=1,
            decimals=2,
        ),
        timeseries(
            "Casting-overhead ratio",
            "(J/token / baseline J/token) / (bits / baseline bits), 5-minute rates "
            f"(`{R.CASTING_OVERHEAD}`): what a precision costs per token relative to the ideal where "
            "energy scales with weight width (INT4 at 4/16 of BF16's J/token gives 1). Above 1, "
            "dequantisation and casting eat part of the saving; above 16/bits (4 for INT4) the "
            "precision is dearer than the baseline outright. Bits come from a fixed table of precision "
            "labels (fp32 32; bf16, fp16 16; fp8, int8, w8a8 8; int4, awq, gptq, nf4, fp4 4; the "
            "recording rule lists all): a precision label outside it has no series.",
            [target(f"{R.CASTING_OVERHEAD}{ratio_sel}", "{{pool}}@{{precision}} vs {{baseline}}")],
            "none",
            line_at=1,
            decimals=2,
        ),
        timeseries(
            "Requests in flight by precision",
            "Requests in flight at each scrape, summed over backends and proxy replicas: the load at "
            "which the figures above were measured.",
            [
                target(
                    f"sum by (pool, precision) (qtrap_inflight_requests{{{SEL}}})", "{{pool}}@{{precision}}"
                )
            ],
            "none",
            min_=0,
            w=24,
        ),
        row("Against load: where is B*? (last 30 minutes, by in-flight level)"),
    ]
    for metric in R.METRICS:
        label = _label(metric)
        panels.append(
            barchart(
                f"{label} by in-flight level",
                f"{label} of each precision at each in-flight level over the last 30 minutes "
                f"(`{R.by_inflight(metric)}`). In-flight level: the average number of the precision's "
                "requests in flight over each minute in which it was busy, binned into powers of two "
                "(001: below 1.41, 002: 1.41 to 2.83, 004: 2.83 to 5.66, ...). Only the minutes in "
                "which a precision is busy count, so runs at different times (loadgen sweeps one "
                "precision and level at a time) line up by load. Where the quantized precision's bar "
                "overtakes the baseline's lies B*. Levels should last a few minutes: a level's "
                "first and last minute mix with the neighbouring load.",
                R.by_inflight(metric) + "{" + SEL + "}",
                "inflight",
                "joule",
                decimals=3 if metric == "j_per_token" else 1,
            )
        )
        panels.append(
            barchart(
                f"{label} ratio to baseline by in-flight level",
                f"{label} of each non-baseline precision / the baseline's at the same in-flight level, "
                f"last 30 minutes (`{R.by_inflight_ratio(metric)}`). Green below 1 (cheaper than the "
                "baseline at that load), red at 1 and above. B* lies between the last green level "
                "and the first red one (or the reverse); the B* panel interpolates it.",
                R.by_inflight_ratio(metric) + "{" + SEL + "}",
                "inflight",
                "none",
                th=GREEN_BELOW_1,
                decimals=2,
            )
        )
    panels.append(
        table(
            "B* and the in-flight levels it lies between",
            "For each precision whose ratio to the baseline crosses 1 once in the last 30 minutes: B*, "
            "the measured in-flight level just below it and just above it, and the ratio at those "
            "levels. 'cheaper below': the quantized precision saves energy below B*.",
            [
                target(_bstar_table_query(part), ref=chr(ord("A") + i), instant=True, fmt="table")
                for i, part in enumerate((None, "lower", "upper", "lower_ratio", "upper_ratio"))
            ],
            {
                "Value #A": "B* (in flight)",
                "Value #B": "level below",
                "Value #C": "level above",
                "Value #D": "ratio below",
                "Value #E": "ratio above",
                "direction": "cheaper",
            },
            ["Time"],
        )
    )
    panels += [
        row("Accuracy (chains scored by loadgen)"),
        barchart(
            "Accuracy by hop depth (dashboard time range)",
            "Chains answered correctly / chains scored, by the chain's number of hops (01, 02, ... "
            "then 17+) and precision, over the dashboard's time range (`qtrap_chains_scored_total`, "
            "reported by loadgen for each chain it scores). Errors compound over hops: a precision "
            "that loses little accuracy on short chains can lose much on long ones.",
            "label_replace(\n  sum by (pool, precision, hops) "
            f'(increase(qtrap_chains_scored_total{{{SEL}, result="correct"}}[$__range]))\n'
            f"  / (sum by (pool, precision, hops) (increase(qtrap_chains_scored_total{{{SEL}}}[$__range])) > 0),\n"
            '  "hops", "0$1", "hops", "([1-9])"\n)',
            "hops",
            "percentunit",
            decimals=0,
        ),
        timeseries(
            "Accuracy by precision",
            f"Chains correct / chains scored, 5-minute rates (`{R.ACCURACY}`).",
            [target(f"{R.ACCURACY}{{{SEL}}}", "{{pool}}@{{precision}}")],
            "percentunit",
            min_=0,
        ),
        timeseries(
            "Chains scored per second",
            "Chains scored by loadgen per second, by result.",
            [
                target(
                    "sum by (pool, precision, result) "
                    f"(rate(qtrap_chains_scored_total{{{SEL}}}[$__rate_interval]))",
                    "{{pool}}@{{precision}} {{result}}",
                )
            ],
            "none",
            min_=0,
            w=24,
        ),
        row("Routing by cost (pools with routing: cost)"),
        timeseries(
            "Routing decisions by reason",
            "Requests routed per second by why their backend was chosen "
            "(`qtrap_route_decisions_total`): cheapest (the pool's current best), explore (Thompson "
            "sampling or the minimum exploration share), sticky (a chain kept its first hop's precision), "
            "ramp (every replica past its measured load range: slow start), pinned, no_data, fallback (no "
            "candidate within the budgets), round_robin (other pools).",
            [
                target(
                    f"sum by (pool, reason) (rate(qtrap_route_decisions_total{{{SEL}}}[$__rate_interval]))",
                    "{{pool}} {{reason}}",
                )
            ],
            "reqps",
            min_=0,
        ),
        timeseries(
            "Share of routed requests by precision",
            "Each precision's share of the requests routed in its pool (`qtrap_route_decisions_total`, "
            "all reasons): where routing by cost sends the load as the measured J/token moves.",
            [
                target(
                    f"sum by (pool, precision) (rate(qtrap_route_decisions_total{{{SEL}}}[$__rate_interval]))\n"
                    "  / ignoring(precision) group_left sum by (pool) "
                    f"(rate(qtrap_route_decisions_total{{{SEL}}}[$__rate_interval]))",
                    "{{pool}}@{{precision}}",
                )
            ],
            "percentunit",
            min_=0,
        ),
    ]
    return _dashboard(
        "qtrap-trap",
        "qtrap / Quantization trap",
        "Is the quantized deployment cheaper than FP16/BF16 at the load it runs? J/token and J per "
        "correct answer by precision, over time and by in-flight level, B*, casting overhead, accuracy "
        "by hop depth.",
        [POOL_VAR, PRECISION_VAR],
        panels,
    )


def _bstar_table_query(part: str | None) -> str:
    """B* (``part`` None) or one of its parts, only where B* exists, labelled ``metric``, without metric names."""
    terms = []
    for m in R.METRICS:
        expr = R.bstar(m) + "{" + SEL + "}"
        if part is not None:
            expr = f"{R.bstar_part(m, part)}{{{SEL}}} and on(pool, precision, baseline, direction) {expr}"
        terms.append(f'label_replace(max without () ({expr}), "metric", "{_label(m)}", "", "")')
    return "\nor\n".join(terms)


# -- Requests and hops -----------------------------------------------------------------------------


def _quantiles(
    metric: str, qs: tuple[float, ...], by: str = "pool, precision", legend: str = "{{pool}}@{{precision}}"
) -> list[Json]:
    return [
        target(
            f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{SEL}}}[$__rate_interval])))",
            f"p{round(q * 100)} {legend}",
            chr(ord("A") + i),
        )
        for i, q in enumerate(qs)
    ]


def requests_dashboard() -> Json:
    panels: list[Json] = [
        row("Throughput and load"),
        timeseries(
            "Tokens per second",
            "Prompt and completion tokens processed per second, by pool and precision (`qtrap_tokens_total`).",
            [
                target(
                    f"sum by (pool, precision, kind) (rate(qtrap_tokens_total{{{SEL}}}[$__rate_interval]))",
                    "{{pool}}@{{precision}} {{kind}}",
                )
            ],
            "none",
            min_=0,
        ),
        timeseries(
            "Requests in flight",
            "Requests in flight at each scrape (`qtrap_inflight_requests`), summed over backends and proxy replicas.",
            [
                target(
                    f"sum by (pool, precision) (qtrap_inflight_requests{{{SEL}}})", "{{pool}}@{{precision}}"
                )
            ],
            "none",
            min_=0,
        ),
        timeseries(
            "Requests per second by outcome",
            "Requests answered per second by status (ok, upstream_error, upstream_timeout, "
            "stream_broken, client_disconnected, ...). Requests rejected before routing (unknown model, "
            "bad request) carry an empty pool and are counted in the last series.",
            [
                target(
                    f"sum by (pool, precision, status) (rate(qtrap_requests_total{{{SEL}}}[$__rate_interval])) > 0",
                    "{{pool}}@{{precision}} {{status}}",
                    "A",
                ),
                target(
                    'sum by (status) (rate(qtrap_requests_total{pool=""}[$__rate_interval]))',
                    "rejected before routing: {{status}}",
                    "B",
                ),
            ],
            "reqps",
            min_=0,
        ),
        timeseries(
            "Requests whose energy is unknown",
            "Finished requests per second whose energy could not be measured (meter down or not "
            "configured): their energy is null in the ledger, never 0 "
            "(`qtrap_energy_unknown_requests_total`).",
            [
                target(
                    f"sum by (pool, precision) (rate(qtrap_energy_unknown_requests_total{{{SEL}}}[$__rate_interval]))",
                    "{{pool}}@{{precision}}",
                )
            ],
            "reqps",
            min_=0,
        ),
        row("Latency"),
        timeseries(
            "Time to first token",
            "From the request's arrival at the proxy to its first streamed content chunk (p50, p90, p99).",
            _quantiles("qtrap_time_to_first_token_seconds", (0.5, 0.9, 0.99)),
            "s",
            w=8,
        ),
        timeseries(
            "Inter-token latency",
            "Time between streamed chunks of one request (p50, p90, p99; long streams contribute an "
            "even sample of 32 gaps).",
            _quantiles("qtrap_inter_token_latency_seconds", (0.5, 0.9, 0.99)),
            "s",
            w=8,
        ),
        timeseries(
            "Request duration",
            "From the request's arrival to the end of its response (p50, p90, p99).",
            _quantiles("qtrap_request_duration_seconds", (0.5, 0.9, 0.99)),
            "s",
            w=8,
        ),
        row("Energy per request and per hop"),
        timeseries(
            "Energy per request",
            "Attributed energy per finished request (final figures; p50, p90, p99, from the histogram "
            "`qtrap_request_energy_joules`, buckets 0.01 J to 3 kJ).",
            _quantiles("qtrap_request_energy_joules", (0.5, 0.9, 0.99)),
            "joule",
        ),
        timeseries(
            "Mean energy per request",
            "Attributed energy / finished requests with known energy.",
            [
                target(
                    f"sum by (pool, precision) (rate(qtrap_request_energy_joules_sum{{{SEL}}}[$__rate_interval]))\n"
                    f"/ (sum by (pool, precision) (rate(qtrap_request_energy_joules_count{{{SEL}}}[$__rate_interval])) > 0)",
                    "{{pool}}@{{precision}}",
                )
            ],
            "joule",
            min_=0,
        ),
        heatmap(
            "Energy per request: distribution",
            "Requests per energy bucket over time (all selected pools and precisions).",
            f"sum by (le) (increase(qtrap_request_energy_joules_bucket{{{SEL}}}[$__rate_interval]))",
            "joule",
        ),
        barchart(
            "Mean energy per hop, by hop index (dashboard time range)",
            "Attributed energy per reasoning hop by the hop's index in its chain (01, 02, ... then 17+), "
            "over the dashboard's time range (`qtrap_hop_energy_joules`): hops are requests of a chain "
            "(x-qtrap-hop) or steps of one stream split by x-qtrap-hop-split. Later hops carry longer "
            "contexts, so they usually cost more.",
            "label_replace(\n  sum by (pool, precision, hop) "
            f"(increase(qtrap_hop_energy_joules_sum{{{SEL}}}[$__range]))\n"
            f"  / (sum by (pool, precision, hop) (increase(qtrap_hop_energy_joules_count{{{SEL}}}[$__range])) > 0),\n"
            '  "hop", "0$1", "hop", "([1-9])"\n)',
            "hop",
            "joule",
            decimals=2,
        ),
        timeseries(
            "Energy per hop (p50) by hop index",
            "Median attributed energy of a hop, by hop index, all selected pools and precisions.",
            _quantiles("qtrap_hop_energy_joules", (0.5,), by="hop", legend="hop {{hop}}"),
            "joule",
            w=24,
        ),
    ]
    return _dashboard(
        "qtrap-requests",
        "qtrap / Requests and hops",
        "Energy per request and per reasoning hop, throughput, latency and load through the qtrap proxy.",
        [POOL_VAR, PRECISION_VAR],
        panels,
    )


# -- Fleet ----------------------------------------------------------------------------------------

_UP_MAPPINGS = [
    {
        "type": "value",
        "options": {
            "0": {"text": "down", "color": "red", "index": 0},
            "1": {"text": "up", "color": "green", "index": 1},
        },
    }
]


def fleet_dashboard() -> Json:
    dev = 'gpu_device=~"$gpu_device"'
    rate_i = "[$__rate_interval]"
    panels: list[Json] = [
        row("Power: measured, idle and attributed"),
        timeseries(
            "Power by GPU: measured, idle, foreign, this replica's requests",
            "Per GPU and proxy replica: measured power (the meter's counter, settled intervals), the "
            "idle part (intervals or shares no request was charged for), the foreign part (work the "
            "GPU's backends did for requests this replica did not serve: other replicas' or direct "
            "clients', from the backends' token counters; 0 without `token_counters`) and the rest, "
            "which this replica hands to its own requests. Conservation (below) checks that every "
            "measured joule lands in exactly one of them.",
            [
                target(
                    f"rate(qtrap_gpu_energy_joules_total{{{dev}}}{rate_i})",
                    "{{gpu_device}} measured ({{instance}})",
                    "A",
                ),
                target(
                    f"rate(qtrap_gpu_idle_energy_joules_total{{{dev}}}{rate_i})",
                    "{{gpu_device}} idle ({{instance}})",
                    "B",
                ),
                target(
                    f"rate(qtrap_gpu_foreign_energy_joules_total{{{dev}}}{rate_i})",
                    "{{gpu_device}} foreign ({{instance}})",
                    "D",
                ),
                target(
                    f"rate(qtrap_gpu_energy_joules_total{{{dev}}}{rate_i}) - rate(qtrap_gpu_idle_energy_joules_total{{{dev}}}{rate_i}) - rate(qtrap_gpu_foreign_energy_joules_total{{{dev}}}{rate_i})",
                    "{{gpu_device}} this replica's requests ({{instance}})",
                    "C",
                ),
            ],
            "watt",
            min_=0,
        ),
        timeseries(
            "Fleet power: measured vs attributed + idle",
            "All metered GPUs, each counted once however many proxy replicas read it (the average over "
            "replicas of each GPU's measured and idle power): measured power against the power "
            "attributed to finished requests, summed over replicas (`qtrap_energy_joules_total`, "
            "counted when a request's figure becomes final, seconds after it ends) plus idle power. "
            "Over minutes the two lines agree; short gaps are requests not final yet. Attributed well "
            "above measured: several replicas share backends without `token_counters: true`, each "
            "charging the whole GPU to its own requests. A lasting gap below: requests whose backend "
            "lists no devices, or energy left unknown.",
            [
                target(
                    f"sum(avg by (gpu_device) (rate(qtrap_gpu_energy_joules_total{rate_i})))", "measured", "A"
                ),
                target(
                    f"sum(rate(qtrap_energy_joules_total{rate_i})) + sum(avg by (gpu_device) (rate(qtrap_gpu_idle_energy_joules_total{rate_i})))",
                    "attributed + idle",
                    "B",
                ),
                target(f"sum(rate(qtrap_energy_joules_total{rate_i}))", "attributed to requests", "C"),
                target(
                    f"sum(avg by (gpu_device) (rate(qtrap_gpu_idle_energy_joules_total{rate_i})))",
                    "idle",
                    "D",
                ),
            ],
            "watt",
            min_=0,
        ),
        timeseries(
            "Attributed power by backend",
            "Energy attributed to finished requests per second, by backend (final figures).",
            [
                target(
                    f"sum by (pool, backend, precision) (rate(qtrap_energy_joules_total{rate_i}))",
                    "{{backend}} ({{pool}}@{{precision}})",
                )
            ],
            "watt",
            min_=0,
        ),
        timeseries(
            "GPU power (meter)",
            "Each GPU's power as its meter counts it (`qtrap_gpu_power_watts`: the energy counter's last "
            "step over its duration, about 100 ms on an H100's counter), per proxy replica. To set it beside "
            "dcgm-exporter's own series, join on `gpu_device`: "
            '`label_join(DCGM_FI_DEV_POWER_USAGE, "gpu_device", ":", "Hostname", "gpu")`.',
            [target(f"qtrap_gpu_power_watts{{{dev}}}", "{{gpu_device}} ({{instance}})")],
            "watt",
            min_=0,
        ),
        row("Conservation and meter health"),
        stat(
            "Conservation error (worst GPU)",
            "|attributed + idle + foreign - measured| / measured, the worst GPU and replica "
            "(`qtrap_energy_conservation_error_ratio`). "
            "Attribution hands out every measured joule exactly once, so this stays at 0 up to rounding; "
            "red from 0.1% (alert QtrapConservationBroken after 5 minutes).",
            [target(f"max(qtrap_energy_conservation_error_ratio{{{dev}}})", "worst GPU")],
            "percentunit",
            th=thresholds(("green", None), ("red", 0.001)),
            decimals=4,
            w=6,
        ),
        stat(
            "Meters",
            "Whether each GPU's meter (NVML or dcgm-exporter) answered its last reading "
            "(`qtrap_meter_up`; alert QtrapMeterDown after 1 minute). While a meter is down, requests "
            "on its GPU get no energy figure (null with a reason, never 0).",
            [target(f"qtrap_meter_up{{{dev}}}", "{{gpu_device}} ({{instance}})")],
            "none",
            th=thresholds(("red", None), ("green", 1)),
            mappings=_UP_MAPPINGS,
            w=6,
        ),
        stat(
            "Backends",
            "Each backend's last health probe (`qtrap_backend_up`; alert QtrapBackendDown after 2 "
            "minutes). The proxy probes its backends when its own GET /health or /health/ready is called, "
            "so a readiness probe or healthcheck must call one; without one this panel stays empty.",
            [target("qtrap_backend_up", "{{backend}} ({{instance}})")],
            "none",
            th=thresholds(("red", None), ("green", 1)),
            mappings=_UP_MAPPINGS,
            w=6,
        ),
        stat(
            "Token counters",
            "Whether each backend's own token counters answered the proxy's last poll "
            "(`qtrap_backend_token_counters_up`, backends with `token_counters: true`; alert "
            "QtrapTokenCountersDown after 2 minutes). While they are down, intervals are split without "
            "them: replicas sharing the backend each charge its whole busy energy to their own requests.",
            [target("qtrap_backend_token_counters_up", "{{backend}} ({{instance}})")],
            "none",
            th=thresholds(("red", None), ("green", 1)),
            mappings=_UP_MAPPINGS,
            w=6,
        ),
        timeseries(
            "Conservation error by GPU",
            "|attributed + idle + foreign - measured| / measured per GPU and proxy replica; the red line is the "
            "0.1% alert threshold.",
            [target(f"qtrap_energy_conservation_error_ratio{{{dev}}}", "{{gpu_device}} ({{instance}})")],
            "percentunit",
            line_at=0.001,
            min_=0,
        ),
        timeseries(
            "Meter: time since the counter last moved",
            "Seconds since each GPU's energy counter last changed (`qtrap_meter_last_update_age_seconds`). "
            "An H100's counter moves about every 100 ms, idle or not; a growing age means a frozen "
            "exporter or a wrong device mapping (alert QtrapMeterStale above 30 s for 2 minutes).",
            [target(f"qtrap_meter_last_update_age_seconds{{{dev}}}", "{{gpu_device}} ({{instance}})")],
            "s",
            line_at=30,
            min_=0,
        ),
        row("Carbon and cost"),
        timeseries(
            "gCO2e per hour by backend",
            "Emissions of the GPU energy attributed to finished requests, in grams of CO2-equivalent per "
            "hour (`qtrap_co2e_grams_total`: final figures x `carbon.pue` x the grid's carbon intensity "
            "when the request ran). The GPU's energy only (not the host's, not idle GPUs'); empty "
            "without a `carbon` config. Requests whose energy is unknown add nothing (their records say "
            "why).",
            [
                target(
                    f"3600 * sum by (pool, backend, precision) (rate(qtrap_co2e_grams_total{rate_i}))",
                    "{{backend}} ({{pool}}@{{precision}})",
                )
            ],
            "massg",
            min_=0,
        ),
        timeseries(
            "Energy cost per hour by backend",
            "Cost of the GPU energy attributed to finished requests per hour, in each currency the "
            "`pricing` config names (`qtrap_energy_cost_total`: final figures x `carbon.pue` x the "
            "energy price). Empty without a `pricing` config.",
            [
                target(
                    f"3600 * sum by (pool, backend, precision, currency) "
                    f"(rate(qtrap_energy_cost_total{rate_i}))",
                    "{{backend}} ({{pool}}@{{precision}}) {{currency}}",
                )
            ],
            "none",
            min_=0,
        ),
    ]
    return _dashboard(
        "qtrap-fleet",
        "qtrap / Fleet",
        "Per-GPU measured, idle and attributed power, energy conservation, meter and backend health.",
        [DEVICE_VAR],
        panels,
    )


def dashboards() -> list[Json]:
    return [trap_dashboard(), requests_dashboard(), fleet_dashboard()]
