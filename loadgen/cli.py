"""``python -m loadgen``: replay reasoning chains through a qtrap proxy and locate B*.

``python -m loadgen --concurrency 1,8,64`` runs the embedded default (simulated
backends of one calibrated model at BF16, INT8 and INT4 behind a qtrap proxy);
``--proxy URL`` drives a running proxy instead. ``python -m loadgen compare
A/report.json B/report.json`` compares finished runs; ``python -m loadgen render
A/report.json`` draws a report's plots and report.html again (e.g. where the run's
machine had no matplotlib); ``python -m loadgen schema`` prints report.json's JSON Schema.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadgen import __version__
from loadgen.datasets import DATASETS
from loadgen.schedule import ARRIVALS, UNITS, Schedule, ScheduleError
from loadgen.schedule import parse as parse_schedule

EPILOG = """examples:
  python -m loadgen --concurrency 1,8,64                       # embedded default, simulated H200s
  python -m loadgen --proxy http://127.0.0.1:8080 --model qwen3-8b --dataset gsm8k \\
      --data-file gsm8k/test.jsonl --concurrency 1,4,16,64 --num-chains 200 --repeats 3
  python -m loadgen --schedule steps:1@30s,8@30s,64@60s --window 10  # time-varying load, each precision
  python -m loadgen --schedule day:0.5..8@300s --schedule-unit chains/s --arrivals poisson
  python -m loadgen compare-routing --schedule ramp:1..64@120s      # policies side by side
  python -m loadgen compare small/report.json large/report.json
  python -m loadgen render run/report.json --out run-html        # plots and report.html again
  python -m loadgen schema > docs/report-schema.json             # report.json's JSON Schema

outputs in --out: report.json (docs/report-schema.md), requests.csv, *.png, report.html.
exit status: 0 done, 1 the run finished with failed requests only, 2 bad input or unreachable proxy,
3 --strict and a validity check raised a warning (reports written), 130 interrupted (the partial report
is written)."""


COMPARE_ROUTING_EPILOG = """examples:
  python -m loadgen compare-routing --schedule steps:1@30s,8@30s,64@60s      # embedded default: every policy
  python -m loadgen compare-routing --schedule day:1..32@600s --policies bf16,int4,cost --cost-config '{}'
  python -m loadgen compare-routing --proxy http://127.0.0.1:8080 --policies bf16,int4,cost \\
      --schedule ramp:1..64@300s        # cost: the proxy's pool is configured with routing: cost

outputs in --out: compare-routing.json (loadgen/schema.py CompareRouting), compare-routing.md, requests.csv.
exit status: 0 done, 1 no policy ran, 2 bad input or unreachable proxy, 130 interrupted."""


def check_keys(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Keys go to a running proxy only (the embedded default's proxy has no auth); with --proxy they default
    to $QTRAP_API_KEY and $QTRAP_ADMIN_KEY."""
    if not args.proxy:
        if args.api_key or args.admin_key:
            p.error("--api-key and --admin-key need --proxy (the embedded default's proxy has no auth)")
        return
    args.api_key = args.api_key or os.environ.get("QTRAP_API_KEY") or None
    args.admin_key = args.admin_key or os.environ.get("QTRAP_ADMIN_KEY") or None


def check_schedule(p: argparse.ArgumentParser, args: argparse.Namespace, required: bool) -> None:
    """Options that depend on one another: one line and exit 2 (argparse's error)."""
    if args.schedule is None:
        if required:
            p.error("--schedule is required (e.g. --schedule steps:1@30s,8@30s)")
        for opt in ("schedule_unit", "arrivals"):
            if getattr(args, opt) is not None:
                p.error(f"--{opt.replace('_', '-')} needs --schedule")
        return
    args.schedule_unit = args.schedule_unit or "concurrency"
    if args.schedule_unit == "concurrency":
        if args.arrivals is not None:
            p.error("--arrivals is for arrival rates (--schedule-unit chains/s or requests/s)")
        if args.schedule.shape == "steps" and any(v != int(v) for v, _ in args.schedule.points):
            p.error(f"--schedule {args.schedule.spec}: concurrency steps are whole numbers of chains")
    args.arrivals = args.arrivals or "poisson"


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"concurrency levels must be integers >= 1, got {text!r}")
    return sorted(dict.fromkeys(values))


def _name_list(text: str) -> list[str]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    if not values:
        raise argparse.ArgumentTypeError("expected a comma-separated list of precisions")
    return list(dict.fromkeys(values))


def _weights(text: str) -> tuple[float, float, float]:
    try:
        w = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three numbers, got {text!r}") from None
    if len(w) != 3 or any(x < 0 for x in w) or sum(w) <= 0:
        raise argparse.ArgumentTypeError(
            "--index-weights takes three non-negative numbers (trust,sustainability,economy)"
        )
    return (w[0], w[1], w[2])


# fields loadgen itself sets on every request: --extra-body may not replace them
_OWN_FIELDS = ("model", "messages", "max_tokens", "temperature", "stream", "stream_options", "seed")


def _extra_body(text: str) -> dict[str, object]:
    import json

    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e.msg} at character {e.pos}") from None
    if not isinstance(doc, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"ignore_eos\": true}'")
    own = [k for k in doc if k in _OWN_FIELDS]
    if own:
        raise argparse.ArgumentTypeError(
            f"sets {', '.join(own)}, which loadgen sets itself (use its options)"
        )
    return doc


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a {getattr(kind, '__name__', 'number')}, got {text!r}"
            ) from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return v

    return parse


def _schedule(text: str) -> Schedule:
    try:
        return parse_schedule(text)
    except ScheduleError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _json_object(text: str) -> dict[str, object]:
    import json

    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e.msg} at character {e.pos}") from None
    if not isinstance(doc, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return doc


def _add_schedule_options(p: argparse.ArgumentParser, w: Any) -> None:
    w.add_argument(
        "--schedule-unit",
        choices=UNITS,
        metavar="UNIT",
        help="what the schedule's values are: concurrency (chains in flight, closed loop; the default), "
        "chains/s or requests/s (arrival rates, open loop)",
    )
    w.add_argument(
        "--arrivals",
        choices=ARRIVALS,
        help="open loop: poisson (default; seeded by --seed) or uniform (evenly spaced in the integrated rate)",
    )
    w.add_argument(
        "--window",
        type=_positive(float),
        default=10.0,
        metavar="S",
        help="length of the schedule's report windows in seconds (default: 10)",
    )


SCHEDULE_HELP = (
    "a load that changes over time instead of fixed levels: steps:1@30s,8@30s,64@60s (concurrency 1 for "
    "30 s, then 8, then 64), ramp:1..64@120s (linear), day:1..64@300s (a daily cycle compressed into 300 s: "
    "lowest at 03:00, highest at 15:00); durations in ms, s (default), m or h"
)


def run_parser(compare_routing: bool = False) -> argparse.ArgumentParser:
    if compare_routing:
        p = argparse.ArgumentParser(
            prog="python -m loadgen compare-routing",
            description="Run ONE schedule under several routing policies, one after another, and report them "
            "side by side: fleet energy (every device, idle included), energy per correct answer, accuracy, "
            "latency percentiles and which precision served what share. Policies: a precision (requests "
            "pinned as model@precision), round_robin (unpinned requests, the proxy's routing as configured) "
            "and cost (unpinned requests against a pool with `routing: cost`: the embedded default writes that "
            "key into its proxy's config; a proxy that refuses it is reported as not run).",
            epilog=COMPARE_ROUTING_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    else:
        p = argparse.ArgumentParser(
            prog="python -m loadgen",
            description="Replay GSM8K/MathQA reasoning chains through a qtrap proxy at controlled concurrency, "
            "score the answers, and locate B*: the concurrency where a quantized precision's energy per correct "
            "answer crosses FP16/BF16's. Subcommands: `compare REPORT...`, `render REPORT`, `schema`, "
            "`compare-routing --schedule ...`.",
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    p.add_argument("--version", action="version", version=f"qtrap loadgen {__version__}")
    t = p.add_argument_group("target")
    t.add_argument(
        "--proxy",
        metavar="URL",
        help="a running qtrap proxy; without it the embedded default starts "
        "simulated backends (BF16, FP8, INT8 W8A8, INT4 W4A16 on simulated H200s calibrated to real vLLM serving) "
        "and a proxy, and stops them afterwards",
    )
    t.add_argument(
        "--api-key",
        metavar="KEY",
        help="a client key for a proxy with auth.enabled, sent on the serving routes and, without "
        "--admin-key, on /qtrap/v1/* (records and scores of its own requests only) (default: $QTRAP_API_KEY)",
    )
    t.add_argument(
        "--admin-key",
        metavar="KEY",
        help="the proxy's admin key, sent on /qtrap/v1/* (the energy counters and backends need it when "
        "auth is on) (default: $QTRAP_ADMIN_KEY); neither key is written to the report",
    )
    t.add_argument(
        "--model",
        help="pool (model) to ask the proxy for (default: qwen3-8b; the embedded default "
        "also simulates qwen3-0.6b)",
    )
    t.add_argument(
        "--precisions",
        type=_name_list,
        metavar="P,P",
        help="precisions to sweep, e.g. bf16,int4 (default: every precision the proxy serves for the model)",
    )
    if not compare_routing:
        t.add_argument("--baseline", help="precision the others are compared with (default: fp16, else bf16)")
    t.add_argument(
        "--sim-gpu",
        choices=["h200", "h100"],
        default="h200",
        help="embedded default only: the simulator's profile: h200 (default; calibrated to real vLLM 0.26 "
        "serving on an H200) or h100 (the 2026-11 kernel probe on an H100: fused INT4 (tinygemm) and "
        "bitsandbytes what-ifs no production server runs)",
    )
    t.add_argument(
        "--sim-think-tokens",
        type=int,
        default=32,
        metavar="N",
        help="embedded default only: mean words of <think> text the simulated model writes before "
        "each answer, as reasoning models do (default: 32; 0 for bare answers)",
    )
    w = p.add_argument_group("workload")
    if compare_routing:
        w.add_argument("--schedule", type=_schedule, metavar="SPEC", help=SCHEDULE_HELP + " (required)")
        t.add_argument(
            "--policies",
            type=_name_list,
            metavar="P,P",
            help="routing policies to run, in order: precisions (pinned), round_robin, cost (default: every "
            "precision, round_robin and cost with the embedded default; every precision and round_robin "
            "against --proxy, whose cost/round_robin mean whatever it is configured with)",
        )
        t.add_argument(
            "--cost-config",
            type=_json_object,
            metavar="JSON",
            help="embedded default: the cost policy's knobs, written as pools.<pool>.cost in its proxy's config",
        )
    else:
        load = w.add_mutually_exclusive_group()
        load.add_argument(
            "--concurrency",
            type=_int_list,
            default=[1, 8, 64],
            metavar="C,C",
            help="concurrency levels: chains in flight at once, closed loop (default: 1,8,64)",
        )
        load.add_argument(
            "--schedule",
            type=_schedule,
            metavar="SPEC",
            help=SCHEDULE_HELP
            + "; each precision runs it in turn, pinned (compare-routing: several policies)",
        )
    _add_schedule_options(p, w)
    w.add_argument(
        "--dataset",
        default="synthetic",
        help=f"one of {', '.join(DATASETS)} (default: synthetic: "
        "arithmetic chains with an exact hop count and known answer, no data needed)",
    )
    w.add_argument(
        "--data-file",
        metavar="FILE",
        help="local GSM8K .jsonl or MathQA .json (gzip-compressed or not) instead of the hub "
        "(openai/gsm8k, allenai/math_qa via the datasets library)",
    )
    w.add_argument("--split", default="test", help="hub split (default: test)")
    w.add_argument(
        "--hops",
        choices=["requests", "stream"],
        default="requests",
        help="requests: one request per reasoning hop, each seeing the earlier hops' answers "
        "(x-qtrap-chain-id, x-qtrap-hop); stream: one chain-of-thought request per problem split "
        "into hops by the proxy (x-qtrap-hop-split: lines) (default: requests)",
    )
    if not compare_routing:
        _add_level_options(w)
    _add_request_options(w)
    a = p.add_argument_group("analysis and output")
    a.add_argument(
        "--out",
        default="compare-routing-out" if compare_routing else "loadgen-out",
        metavar="DIR",
        help="output directory (default: %(default)s): "
        + (
            "compare-routing.json, compare-routing.md, requests.csv"
            if compare_routing
            else "report.json, requests.csv, plots, report.html"
        ),
    )
    a.add_argument(
        "--bootstrap",
        type=_positive(int),
        default=1000,
        metavar="N",
        help="bootstrap replicates for the confidence intervals (default: 1000)",
    )
    if not compare_routing:
        a.add_argument(
            "--index-weights",
            type=_weights,
            default=(1 / 3, 1 / 3, 1 / 3),
            metavar="T,S,E",
            help="weights of the trust, sustainability and economy indices in the composite (default: equal)",
        )
    if not compare_routing:
        _add_check_options(a)
    a.add_argument(
        "--final-timeout",
        type=_positive(float),
        default=60.0,
        metavar="S",
        help="how long to wait for the proxy's final energy records after a level (default: 60)",
    )
    a.add_argument("--quiet", action="store_true", help="no progress display; only errors and the summary")
    return p


def _add_check_options(a: Any) -> None:
    a.add_argument(
        "--min-window-s",
        type=_positive(float),
        metavar="S",
        help="validity check: shortest steady-state window per level and repeat (default: 10 updates of the "
        "meter's energy counter, as the proxy measured them; 1 s when unknown)",
    )
    a.add_argument(
        "--min-chains",
        type=_positive(int),
        default=30,
        metavar="N",
        help="validity check: fewest measured chains per level, repeats summed (default: 30)",
    )
    a.add_argument(
        "--strict",
        action="store_true",
        help="exit with status 3 when a validity check raises a warning (report.json's warnings[] of level "
        "warning); the reports are written first. Fixed levels only: a --schedule run is not checked",
    )


def _add_level_options(w: Any) -> None:
    n = w.add_mutually_exclusive_group()
    n.add_argument(
        "--num-chains",
        type=_positive(int),
        metavar="N",
        help="measured chains per level, after warm-up (default: max(30, 3 x concurrency))",
    )
    n.add_argument(
        "--duration",
        type=_positive(float),
        metavar="S",
        help="seconds of steady state per level instead of a chain count",
    )
    w.add_argument(
        "--warmup",
        type=int,
        metavar="N",
        help="chains per level replayed first and left out (default: the concurrency, i.e. the first wave)",
    )
    w.add_argument(
        "--repeats",
        type=_positive(int),
        default=1,
        metavar="R",
        help="run each level R times; repeats feed the confidence intervals (default: 1)",
    )


def _add_request_options(w: Any) -> None:
    w.add_argument(
        "--seed", type=int, default=0, help="problem order, synthetic problems, sampling seed (default: 0)"
    )
    w.add_argument(
        "--max-tokens",
        type=_positive(int),
        metavar="N",
        help="max_tokens per request (default: 256 with --hops requests, 1024 with stream)",
    )
    w.add_argument(
        "--extra-body",
        type=_extra_body,
        default={},
        metavar="JSON",
        help="fields added to every request body, e.g. '{\"ignore_eos\": true}' (vLLM: every answer runs to "
        "--max-tokens, as `vllm bench serve` does with random weights); not the fields loadgen sets itself",
    )
    w.add_argument(
        "--timeout",
        type=_positive(float),
        default=600.0,
        metavar="S",
        help="per-request timeout in seconds (default: 600)",
    )
    w.add_argument(
        "--no-score",
        metavar="REASON",
        help="do not score the answers, e.g. for models with random weights, whose answers mean nothing: "
        "accuracy, J per correct answer and the trust, sustainability and composite indices are null with "
        "REASON, B* is located on J/token only, and no verdict is sent to the proxy",
    )


def compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadgen compare",
        description="Compare finished runs (e.g. model sizes, for the critical model scale): B*, direction and "
        "ratios of each report side by side.",
    )
    p.add_argument(
        "reports", nargs="+", metavar="REPORT", help="report.json files (or directories holding one)"
    )
    p.add_argument("--metric", choices=["j_per_correct", "j_per_token"], default="j_per_correct")
    return p


def render_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadgen render",
        description="Draw a finished run's plots and report.html again from its report.json and print its "
        "summary (for a report written where matplotlib was not installed).",
    )
    p.add_argument("report", metavar="REPORT", help="report.json (or a directory holding one)")
    p.add_argument("--out", metavar="DIR", help="where to write (default: the report's directory)")
    return p


def schema_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="python -m loadgen schema",
        description="Print the JSON Schema (draft 2020-12) of report.json, generated from loadgen/schema.py "
        "(docs/report-schema.json is this output).",
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        from loadgen.compare import compare

        cargs = compare_parser().parse_args(argv[1:])
        return compare([Path(r) for r in cargs.reports], cargs.metric)
    if argv and argv[0] == "render":
        from loadgen.app import render

        rargs = render_parser().parse_args(argv[1:])
        return render(Path(rargs.report), Path(rargs.out) if rargs.out else None)
    if argv and argv[0] == "schema":
        schema_parser().parse_args(argv[1:])
        from loadgen.schema import schema_json

        sys.stdout.write(schema_json())
        return 0
    if argv and argv[0] == "compare-routing":
        parser = run_parser(compare_routing=True)
        args = parser.parse_args(argv[1:])
        check_schedule(parser, args, required=True)
        check_keys(parser, args)
        from loadgen.routing import compare_routing

        return compare_routing(args)
    if argv and argv[0] == "run":
        argv = argv[1:]
    parser = run_parser()
    args = parser.parse_args(argv)
    check_schedule(parser, args, required=False)
    check_keys(parser, args)
    if args.schedule is not None:
        from loadgen.routing import run_scheduled

        return run_scheduled(args)
    from loadgen.app import run

    return run(args)
