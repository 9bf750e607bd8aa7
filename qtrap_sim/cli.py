"""``qtrap-sim``: serve simulated vLLM/TGI backends."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from pydantic import ValidationError

from qtrap_sim import __version__
from qtrap_sim.backend import SimBackendConfig
from qtrap_sim.server import SimConfigError, load_sim_config, serve_all


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qtrap-sim",
        description="A vLLM/TGI-compatible inference server on a simulated GPU (no GPU needed). "
        "`qtrap-sim seed --help`: write a routing seed from a GPU profile instead.",
    )
    p.add_argument("--version", action="version", version=f"qtrap-sim {__version__}")
    p.add_argument(
        "--config", metavar="FILE", help="YAML with a `backends:` list: several backends in one process"
    )
    p.add_argument(
        "--model", default="qwen3-8b", help="model shape, also the served name (default: qwen3-8b)"
    )
    p.add_argument("--served-model-name", help="name clients use in `model` (default: --model)")
    p.add_argument("--precision", default="bf16", help="precision / kernel label (default: bf16)")
    p.add_argument("--gpu", default="h100", help="simulated GPU (default: h100)")
    p.add_argument("--api", choices=["vllm", "tgi"], default="vllm", help="API to speak (default: vllm)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8101)
    p.add_argument("--max-num-seqs", type=int, default=256, help="largest running batch (default: 256)")
    p.add_argument("--max-model-len", type=int, default=32768)
    p.add_argument(
        "--kernel", help="calibrated kernel (default: derived from --precision, e.g. int4 -> int4_tinygemm)"
    )
    p.add_argument("--gpu-index", type=int, default=0, help="GPU index in the DCGM metrics (default: 0)")
    p.add_argument(
        "--step-ms",
        type=float,
        help="use a simple linear model with this fixed step time (ms) instead of the calibrated profile",
    )
    p.add_argument(
        "--per-seq-us", type=float, default=20.0, help="linear model: extra step time per row in us"
    )
    p.add_argument(
        "--oracle-data",
        nargs="+",
        default=[],
        metavar="FILE",
        help="GSM8K .jsonl / MathQA .json files: prompts containing their problems get step-by-step answers "
        "(synthetic 'Start with N. ... What is the result?' problems are answered without data)",
    )
    p.add_argument(
        "--hop-accuracy",
        type=float,
        help="probability of getting one reasoning hop right (default: per model and precision)",
    )
    p.add_argument(
        "--think-tokens",
        type=int,
        default=0,
        help="answers to known problems start with a <think> block of about this many words, as a "
        "reasoning model's do (default: 0)",
    )
    p.add_argument(
        "--otlp-traces-endpoint",
        metavar="URL",
        help="vLLM's API: export each finished request's llm_request span as vLLM does, over OTLP/HTTP "
        "(protobuf) to this full URL, e.g. http://127.0.0.1:4318/v1/traces (default: no spans)",
    )
    p.add_argument(
        "--otlp-batch-delay-ms",
        type=float,
        default=100.0,
        metavar="MS",
        help="how long spans wait in the batch before export (default: 100; vLLM uses the SDK's 5000 "
        "unless OTEL_BSP_SCHEDULE_DELAY is set)",
    )
    p.add_argument(
        "--enable-prompt-tokens-details",
        action="store_true",
        help="as vLLM's flag: usage carries prompt_tokens_details.cached_tokens (prefix-cache hits)",
    )
    p.add_argument(
        "--clock-skew-s",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="the engine's wall clock (its spans' timestamps) runs this far ahead of the true time, "
        "negative for behind (default: 0); GET /sim/v1/requests/{id} reports true time",
    )
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["seed"]:  # `qtrap-sim seed ...`: a routing seed from a profile (qtrap_sim/seed.py)
        from qtrap_sim.seed import main as seed_main

        return seed_main(argv[1:])
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    try:
        if args.config:
            configs = load_sim_config(args.config).backends
        else:
            configs = [
                SimBackendConfig(
                    model=args.model,
                    served_model_name=args.served_model_name,
                    precision=args.precision,
                    gpu=args.gpu,
                    api=args.api,
                    host=args.host,
                    port=args.port,
                    max_num_seqs=args.max_num_seqs,
                    max_model_len=args.max_model_len,
                    step_ms=args.step_ms,
                    per_seq_us=args.per_seq_us,
                    kernel=args.kernel,
                    gpu_index=args.gpu_index,
                    oracle_data=args.oracle_data,
                    hop_accuracy=args.hop_accuracy,
                    think_tokens=args.think_tokens,
                    otlp_traces_endpoint=args.otlp_traces_endpoint,
                    otlp_batch_delay_ms=args.otlp_batch_delay_ms,
                    clock_skew_s=args.clock_skew_s,
                    enable_prompt_tokens_details=args.enable_prompt_tokens_details,
                )
            ]
    except (SimConfigError, ValidationError) as e:
        msg = str(e).splitlines()[0] if isinstance(e, SimConfigError) else _first_error(e)
        print(f"qtrap-sim: {msg}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve_all(configs, args.log_level))
    except KeyboardInterrupt:
        pass
    return 0


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    msg = str(err["msg"]).removeprefix("Value error, ")
    if not err["loc"]:
        return msg
    return f"--{'-'.join(str(x) for x in err['loc']).replace('_', '-')}: {msg}"


if __name__ == "__main__":
    sys.exit(main())
