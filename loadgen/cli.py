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
import sys
from collections.abc import Callable
from pathlib import Path

from loadgen import __version__
from loadgen.datasets import DATASETS

EPILOG = """examples:
  python -m loadgen --concurrency 1,8,64                       # embedded default, simulated H200s
  python -m loadgen --proxy http://127.0.0.1:8080 --model qwen3-8b --dataset gsm8k \\
      --data-file gsm8k/test.jsonl --concurrency 1,4,16,64 --num-chains 200 --repeats 3
  python -m loadgen compare small/report.json large/report.json
  python -m loadgen render run/report.json --out run-html        # plots and report.html again
  python -m loadgen schema > docs/report-schema.json             # report.json's JSON Schema

outputs in --out: report.json (docs/report-schema.md), requests.csv, *.png, report.html.
exit status: 0 done, 1 the run finished with failed requests only, 2 bad input or unreachable proxy,
130 interrupted (the partial report is written)."""


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


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadgen",
        description="Replay GSM8K/MathQA reasoning chains through a qtrap proxy at controlled concurrency, "
        "score the answers, and locate B*: the concurrency where a quantized precision's energy per correct "
        "answer crosses FP16/BF16's. Subcommands: `compare REPORT...`, `render REPORT`, `schema`.",
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
    w.add_argument(
        "--concurrency",
        type=_int_list,
        default=[1, 8, 64],
        metavar="C,C",
        help="concurrency levels: chains in flight at once, closed loop (default: 1,8,64)",
    )
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
    n = w.add_mutually_exclusive_group()
    n.add_argument(
        "--num-chains",
        type=_positive(int),
        metavar="N",
        help="measured chains per level, after warm-up (default: max(16, concurrency))",
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
    a = p.add_argument_group("analysis and output")
    a.add_argument(
        "--out",
        default="loadgen-out",
        metavar="DIR",
        help="output directory: report.json, requests.csv, plots, report.html (default: loadgen-out)",
    )
    a.add_argument(
        "--bootstrap",
        type=_positive(int),
        default=1000,
        metavar="N",
        help="bootstrap replicates for the confidence intervals (default: 1000)",
    )
    a.add_argument(
        "--index-weights",
        type=_weights,
        default=(1 / 3, 1 / 3, 1 / 3),
        metavar="T,S,E",
        help="weights of the trust, sustainability and economy indices in the composite (default: equal)",
    )
    a.add_argument(
        "--final-timeout",
        type=_positive(float),
        default=60.0,
        metavar="S",
        help="how long to wait for the proxy's final energy records after a level (default: 60)",
    )
    a.add_argument("--quiet", action="store_true", help="no progress display; only errors and the summary")
    return p


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
    if argv and argv[0] == "run":
        argv = argv[1:]
    args = run_parser().parse_args(argv)
    from loadgen.app import run

    return run(args)
