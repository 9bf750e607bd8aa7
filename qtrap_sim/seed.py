"""``qtrap-sim seed``: a routing seed from a calibrated GPU profile, without running anything.

Routing by cost (``pools.<name>.routing: cost``) can start its curves from a seed file in the shape of a
loadgen ``report.json`` (``cost.seed_report``; ``qtrap-proxy routing seed FILE`` prints what it reads).
This command writes one from the simulator's profile: per precision and concurrency, the steady state of
an engine that keeps ``c`` requests running, each with a prompt of ``--prompt-tokens`` (all prefilled) and
``--max-tokens`` output tokens. A mean engine step then holds ``c`` rows of decode less the ``c / m``
requests admitted in it, plus those requests' prompts; its context is each running request's prompt and
half its output. The step's time and energy come from the profile (``CalibratedPerf.step``), and:

* ``tokens_per_s`` = c / step time (every running request makes one token per step);
* ``j_per_token`` = (step energy - idle power x step time) / c: the energy **above idle**, what the
  proxy's curves learn from its meter (a loadgen report's J/token includes its run's idle share instead);
* ``power_w`` = the step's energy over its time, idle included (for reading).

Nothing here is a measurement: the file says it is simulated (``simulated: true``) and names the profile.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from qtrap_sim import __version__
from qtrap_sim.perf import CalibratedPerf, ProfileError, available_gpus, kernel_of, precision_labels

SEED_SCHEMA_VERSION = "1.3"  # the loadgen report schema whose `levels` fields the seed carries
DEFAULT_LEVELS = (1, 2, 4, 8, 16, 32, 64, 128)


def steady_state(perf: CalibratedPerf, c: int, prompt_tokens: int, max_tokens: int) -> dict[str, float]:
    """Tokens/s, power (idle included) and J/token above idle of ``c`` requests kept running."""
    admitted = c / max_tokens
    decoding = c - admitted
    rows = decoding + admitted * prompt_tokens
    ctx = decoding * (prompt_tokens + max_tokens / 2) + admitted * prompt_tokens
    step = perf.step(max(1, round(rows)), round(ctx))
    dynamic_j = step.energy_j - perf.idle_power_w * step.time_s
    return {
        "tokens_per_s": c / step.time_s,
        "power_w": step.energy_j / step.time_s,
        "j_per_token": dynamic_j / c,
    }


def profile_seed(
    gpu: str, model: str, precisions: list[str], levels: list[int], prompt_tokens: int, max_tokens: int
) -> dict[str, Any]:
    """The seed document (a loadgen report's shape: ``schema_version``, ``config.model``, ``levels``)."""
    out_levels: list[dict[str, Any]] = []
    kernels: dict[str, str] = {}
    for precision in precisions:
        kernel = kernel_of(gpu, precision)
        if kernel is None:
            raise ProfileError(f"GPU profile {gpu!r} knows no precision {precision!r}")
        kernels[precision] = kernel
        perf = CalibratedPerf(gpu, model, kernel)
        for c in levels:
            out_levels.append(
                {"precision": precision, "concurrency": c, **steady_state(perf, c, prompt_tokens, max_tokens)}
            )
    return {
        "schema_version": SEED_SCHEMA_VERSION,
        "generator": f"qtrap-sim {__version__} seed",
        "simulated": True,
        "basis": "j_per_token is energy above idle power per output token (what routing's curves learn)",
        "config": {
            "model": model,
            "gpu_profile": gpu,
            "kernels": kernels,
            "prompt_tokens": prompt_tokens,
            "max_tokens": max_tokens,
        },
        "levels": out_levels,
    }


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: comma-separated positive integers, got {text!r}") from None
    if not values or any(v < 1 or v > 100_000 for v in values):
        raise argparse.ArgumentTypeError(f"{what}: comma-separated integers in 1..100000, got {text!r}")
    return values


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qtrap-sim seed",
        description="Write a routing seed (cost.seed_report) from a calibrated GPU profile: J per output "
        "token above idle and tokens/s per precision and concurrency, in a loadgen report's shape.",
    )
    p.add_argument(
        "--gpu", default="h200", help=f"GPU profile (default: h200; have: {', '.join(available_gpus())})"
    )
    p.add_argument("--model", default="qwen3-8b", help="model shape in the profile (default: qwen3-8b)")
    p.add_argument(
        "--precisions",
        help="comma-separated precision labels (default: every one the profile has a kernel for)",
    )
    p.add_argument(
        "--concurrency",
        type=lambda s: _ints(s, "--concurrency"),
        default=list(DEFAULT_LEVELS),
        help="levels (requests in flight), comma-separated (default: 1,2,4,...,128)",
    )
    p.add_argument("--prompt-tokens", type=int, default=300, help="prompt tokens per request (default: 300)")
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (default: 128)")
    p.add_argument("--out", metavar="FILE", help="write here (default: standard output)")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if not 1 <= args.prompt_tokens <= 1_000_000 or not 1 <= args.max_tokens <= 1_000_000:
        print("qtrap-sim seed: --prompt-tokens and --max-tokens must be in 1..1000000", file=sys.stderr)
        return 2
    try:
        precisions = (
            [p.strip() for p in args.precisions.split(",") if p.strip()]
            if args.precisions
            else sorted(precision_labels(args.gpu))
        )
        doc = profile_seed(
            args.gpu, args.model, precisions, args.concurrency, args.prompt_tokens, args.max_tokens
        )
    except ProfileError as e:
        print(f"qtrap-sim seed: {e}", file=sys.stderr)
        return 2
    text = json.dumps(doc, indent=1) + "\n"
    if args.out:
        try:
            with open(args.out, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as e:
            print(f"qtrap-sim seed: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
            return 2
    else:
        sys.stdout.write(text)
    return 0
