"""Real vLLM behind qtrap-proxy on one GPU: BF16, FP8, INT8 W8A8 and INT4 W4A16 servers of one random-weight
Qwen3 shape side by side, a loadgen sweep through the proxy, the protocol the proxy assumes checked on the
real engine.

Runs on the GPU machine (``bench/gpu/vllm_e2e.sh`` sets it up: vLLM 0.26.0 unpacked into ``--vllm-site``).
``run`` does, for one shape, what ``e2e.py run`` does for transformers serve (the steps are shared: the
independent NVML poller, the proxy with the NVML meter, loadgen with a deadline, the proxy's accounts, the
summary), with these servers:

* the model folders hold only ``config.json``, the generation config and an offline word-level tokenizer
  (``models``); the servers run with ``--load-format dummy`` (vLLM's benchmarking mode: random weights),
  so no weight file is written and a 32B shape needs no disk;
* ``bf16``: the plain config, ``--dtype bfloat16``;
* ``fp8``: the same config with ``--quantization fp8`` (weights quantized to FP8 per tensor at load,
  activations dynamically per token; CUTLASS FP8 GEMMs on Hopper);
* ``w8a8``: a compressed-tensors ``int-quantized`` config (INT8 weights per output channel, INT8 activations
  quantized dynamically per token; CUTLASS INT8 GEMMs);
* ``w4a16``: a compressed-tensors ``pack-quantized`` config (INT4 weights, symmetric, groups of 128, BF16
  activations; vLLM picks Machete or Marlin);
* the plugin in ``bench/gpu/vllm_plugin`` gives the integer weight tensors random bits (vLLM's dummy loader
  leaves integer tensors uninitialised, mostly zeros, which would draw less power than real weights);
* each server gets a fixed KV cache (``--kv-cache-memory-bytes``, sized from ``--kv-tokens``) so that four
  start side by side on one GPU without profiling each other's memory;
* the proxy addresses them as ``kind: vllm`` with ``token_counters: true``;
* every request carries ``ignore_eos`` (``loadgen --extra-body``), so each answer runs to ``--max-tokens``.

Before the sweep ``protocol`` checks (``vllm_protocol.py``) run against the BF16 server directly and through
the proxy; afterwards the kernels vLLM chose are read from its logs (``kernels``).

``--engine sim`` runs the same flow on a CPU with qtrap-sim speaking vLLM's API in place of vLLM (a check of
the script, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]
for p in (str(ROOT), str(HERE.parent)):
    if p not in sys.path:
        sys.path.insert(0, p)

import e2e  # noqa: E402  (bench/gpu/e2e.py: the shared steps)
import real_nvml  # noqa: E402  (shapes, tokenizer)

GIB = 1024**3
# precision label -> (model folder format, extra server arguments)
PRECISIONS: dict[str, tuple[str, list[str]]] = {
    "bf16": ("bf16", []),
    "fp8": ("bf16", ["--quantization", "fp8"]),
    "w8a8": ("w8a8", []),
    "w4a16": ("w4a16", []),
}
FORMATS = ("bf16", "w8a8", "w4a16")
# weight bytes per parameter of the linear layers (embeddings and lm_head stay BF16)
WEIGHT_BYTES = {"bf16": 2.0, "fp8": 1.0, "w8a8": 1.0, "w4a16": 0.5 + 2 / 128}


def quantization_config(fmt: str) -> dict[str, Any] | None:
    """compressed-tensors' ``quantization_config`` block of each checkpoint format (its field names and
    values as the library writes them; ``lm_head`` stays BF16)."""
    if fmt == "bf16":
        return None
    if fmt == "w8a8":
        weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False,
                   "group_size": None, "observer": "minmax"}  # fmt: skip
        acts: dict[str, Any] | None = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                       "dynamic": True, "observer": None}  # fmt: skip
        layout = "int-quantized"
    elif fmt == "w4a16":
        weights = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128,
                   "dynamic": False, "actorder": None, "observer": "minmax"}  # fmt: skip
        acts = None
        layout = "pack-quantized"
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return {
        "quant_method": "compressed-tensors",
        "format": layout,
        "quantization_status": "compressed",
        "ignore": ["lm_head"],
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": acts,
                "output_activations": None,
                "format": layout,
            }
        },
    }


def write_models(shape: str, root: Path) -> dict[str, str]:
    """Config-only model folders, one per format, under ``root/<shape>/<format>``; the tokenizer once."""
    s = real_nvml.SHAPES[shape]
    cfg = real_nvml.qwen3_config(shape).to_dict()
    cfg.update({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "torch_dtype": "bfloat16",
                "dtype": "bfloat16"})  # fmt: skip
    gen = {"bos_token_id": 2, "eos_token_id": real_nvml.EOS_ID, "pad_token_id": 1, "do_sample": False}
    out: dict[str, str] = {}
    tok_dir = root / shape / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        real_nvml.write_tokenizer(s["vocab"], tok_dir)
    for fmt in FORMATS:
        d = root / shape / fmt
        d.mkdir(parents=True, exist_ok=True)
        c = dict(cfg)
        q = quantization_config(fmt)
        if q is not None:
            c["quantization_config"] = q
        (d / "config.json").write_text(json.dumps(c, indent=1, default=str))
        (d / "generation_config.json").write_text(json.dumps(gen, indent=1))
        for f in tok_dir.iterdir():
            if f.is_file():
                (d / f.name).write_bytes(f.read_bytes())
        out[fmt] = str(d)
    return out


def kv_bytes_per_token(shape: str) -> int:
    s = real_nvml.SHAPES[shape]
    return int(2 * s["layers"] * s["kv_heads"] * s["head_dim"] * 2)  # K and V, BF16


def weight_gib(shape: str, precision: str) -> float:
    s = real_nvml.SHAPES[shape]
    h, i, L = s["hidden"], s["inter"], s["layers"]
    q = s["heads"] * s["head_dim"]
    kv = s["kv_heads"] * s["head_dim"]
    linear = L * (h * (q + 2 * kv) + q * h + 3 * h * i)
    emb = s["vocab"] * h * (1 if s["tie"] else 2)
    return (linear * WEIGHT_BYTES[precision] + emb * 2) / GIB


def memory_plan(shape: str, precisions: list[str], kv_tokens: int, total_gib: float) -> dict[str, Any]:
    """Each server's KV cache and ``--gpu-memory-utilization`` (its weights, KV cache and a margin for
    activations and CUDA graphs, as a share of the card), and whether the four fit side by side."""
    kv = kv_tokens * kv_bytes_per_token(shape)
    plan: dict[str, Any] = {"kv_tokens": kv_tokens, "kv_bytes": kv, "servers": {}}
    need = 0.0
    for p in precisions:
        w = weight_gib(shape, p)
        gib = w + kv / GIB + 3.0
        need += gib
        plan["servers"][p] = {"weights_gib": round(w, 2), "kv_gib": round(kv / GIB, 2),
                              "utilization": round(min(0.95, gib / total_gib), 3)}  # fmt: skip
    plan["need_gib"] = round(need, 1)
    plan["total_gib"] = round(total_gib, 1)
    plan["fits"] = need <= total_gib * 0.97
    return plan


def _gpu_total_gib() -> float:
    try:
        import pynvml

        pynvml.nvmlInit()
        return float(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total) / GIB
    except Exception:
        return 80.0


# the kernels vLLM reports choosing, as its logs word them (vLLM 0.26)
_KERNEL_RE = re.compile(
    r"(Using \S*(?:Kernel|kernel)\S*[^\n]*|Selected \S+ for \S+[^\n]*|Using (?:Machete|Marlin|CUTLASS|Cutlass)[^\n]*|"
    r"\S+LinearKernel[^\n]*|Using FlashAttention[^\n]*|Using \S+ backend[^\n]*|Using \S+ attention backend[^\n]*)"
)


def kernels(logs: Path) -> dict[str, list[str]]:
    """The lines of each server's log that name a kernel or backend it picked (deduplicated)."""
    out: dict[str, list[str]] = {}
    for f in sorted(logs.glob("serve-*.log")):
        seen: list[str] = []
        for m in _KERNEL_RE.finditer(f.read_text(errors="replace")):
            line = re.sub(r"\s+", " ", m.group(1)).strip()[:200]
            if line not in seen:
                seen.append(line)
        out[f.stem.removeprefix("serve-")] = seen[:40]
    return out


class VllmEngine(e2e.Engine):
    name = "vllm"
    modules = ()

    def __init__(self, site: str) -> None:
        self.site = site
        self.models: dict[str, str] = {}
        self.plan: dict[str, Any] = {}

    def build(self, args: argparse.Namespace, work: Path, logs: Path, env: dict[str, str],
              result: dict[str, Any]) -> None:  # fmt: skip
        self.models = write_models(args.shape, work / "models")
        precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
        self.plan = memory_plan(args.shape, precisions, args.kv_tokens, _gpu_total_gib())
        result["models"] = self.models
        result["memory_plan"] = self.plan
        version = Path(self.site, "vllm", "_version.py")
        result.setdefault("versions", {})["vllm"] = (
            re.search(r"version = [^'\"]*['\"]([^'\"]+)", version.read_text()).group(1)  # type: ignore[union-attr]
            if version.exists()
            else None
        )
        if not self.plan["fits"]:
            print(f"memory plan: {self.plan['need_gib']} GiB needed of {self.plan['total_gib']}: "
                  "lower --kv-tokens or run fewer precisions at once", flush=True)  # fmt: skip

    def commands(self, args: argparse.Namespace, work: Path, ports: dict[str, int]) -> dict[str, list[str]]:
        cmds = {}
        for p, port in ports.items():
            fmt, extra = PRECISIONS[p]
            srv = self.plan["servers"][p]
            cmds[p] = [
                sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.models[fmt],
                "--served-model-name", args.shape, "--load-format", "dummy", "--dtype", "bfloat16",
                "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(args.max_model_len),
                "--max-num-seqs", str(args.max_num_seqs), "--gpu-memory-utilization", str(srv["utilization"]),
                "--kv-cache-memory-bytes", str(self.plan["kv_bytes"]), "--seed", "0", *extra,
                *args.serve_args.split(),
            ]  # fmt: skip
        return cmds

    def env(self, args: argparse.Namespace, work: Path) -> dict[str, str]:
        return {
            "PYTHONPATH": os.pathsep.join([str(HERE.parent / "vllm_plugin"), self.site]),
            "VLLM_USE_FLASHINFER_SAMPLER": "0",
            "VLLM_NO_USAGE_STATS": "1",
            "VLLM_CACHE_ROOT": str(work / "vllm-cache"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }

    def model_id(self, args: argparse.Namespace, work: Path) -> str:
        return str(args.shape)

    def backend(self, args: argparse.Namespace, work: Path, precision: str, url: str) -> dict[str, Any]:
        return {"name": f"vllm-{precision}", "kind": "vllm", "url": url, "model": args.shape,
                "token_counters": True}  # fmt: skip

    def extra_body(self) -> dict[str, Any]:
        return {"ignore_eos": True}

    def after_up(
        self, args: argparse.Namespace, urls: dict[str, str], out: Path, result: dict[str, Any]
    ) -> None:
        import vllm_protocol

        first = next(iter(urls))
        try:
            result["protocol_server"] = vllm_protocol.check_server(urls[first], args.shape, out / "protocol")
        except Exception as e:  # a failed check is a finding, not a reason to lose the sweep
            result["protocol_server"] = {"error": f"{type(e).__name__}: {e}"}
        result["kernels_at_start"] = kernels(out / "logs")

    def after_proxy(self, args: argparse.Namespace, proxy: str, urls: dict[str, str], out: Path,
                    result: dict[str, Any]) -> None:  # fmt: skip
        import vllm_protocol

        first = next(iter(urls))
        try:
            result["protocol_proxy"] = vllm_protocol.check_proxy(
                proxy, f"{args.shape}@{first}", urls[first], out / "protocol"
            )
        except Exception as e:
            result["protocol_proxy"] = {"error": f"{type(e).__name__}: {e}"}


class Job:
    """What a GPU job (vllm_facts.py, vllm_routing.py) starts from: its folders, precisions, the engine with
    its model folders built, and a result document saved to ``out/<name>-run.json``."""

    def __init__(self, args: argparse.Namespace, name: str) -> None:
        self.out = Path(args.out)
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
        self.result: dict[str, Any] = {
            "bench": f"vllm_{name}",
            "args": vars(args),
            "started_unix_s": time.time(),
        }
        self._path = self.out / f"{name}-run.json"
        self.sim = args.engine == "sim"
        self.engine: VllmEngine = SimEngine(args.vllm_site) if self.sim else VllmEngine(args.vllm_site)
        self.ns = argparse.Namespace(
            shape=args.shape,
            precisions=args.precisions,
            kv_tokens=args.kv_tokens,
            max_model_len=4096,
            max_num_seqs=256,
            serve_args="",
        )
        self.engine.build(self.ns, self.work, self.logs, {}, self.result)

    def save(self) -> None:
        self._path.write_text(json.dumps(self.result, indent=1))


def span_servers(
    engine: VllmEngine,
    ns: argparse.Namespace,
    work: Path,
    precisions: list[str],
    otlp_port: int | None,
    batch_delay_ms: int,
    pkgs: str,
) -> tuple[dict[str, int], dict[str, list[str]], dict[str, str]]:
    """Each precision's port, server command and environment, the servers exporting their ``llm_request``
    spans to ``http://127.0.0.1:<otlp_port>/v1/traces`` over OTLP/HTTP (none without ``otlp_port``)."""
    from qtrap_common.localproc import free_port

    if (
        otlp_port is not None
    ):  # and usage says how many prompt tokens the prefix cache held (the proxy's rows)
        ns.serve_args = (
            f"--otlp-traces-endpoint http://127.0.0.1:{otlp_port}/v1/traces --enable-prompt-tokens-details"
        )
    ports = {p: free_port() for p in precisions}
    cmds = engine.commands(ns, work, ports)
    if isinstance(engine, SimEngine) and otlp_port is not None:  # qtrap-sim takes them as options
        for p in precisions:
            cmds[p] += [*ns.serve_args.split(), "--otlp-batch-delay-ms", str(batch_delay_ms)]
    env = {
        **os.environ,
        **engine.env(ns, work),
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
        "OTEL_BSP_SCHEDULE_DELAY": str(batch_delay_ms),
        "HF_HOME": str(work / "hf-home"),
    }
    env["PYTHONPATH"] = os.pathsep.join([p for p in (env.get("PYTHONPATH"), pkgs, str(ROOT)) if p])
    return ports, cmds, env


def start_servers(
    stack: ExitStack,
    cmds: dict[str, list[str]],
    ports: dict[str, int],
    env: dict[str, str],
    logs: Path,
    timeout_s: float,
) -> float:
    """Start every server at once (each in its own session, stopped when ``stack`` closes), wait for each
    ``/health``; the seconds that took."""
    from qtrap_common.localproc import stop, wait_http

    t0 = time.monotonic()
    procs = {}
    for p, cmd in cmds.items():
        with (logs / f"serve-{p}.log").open("wb") as f:
            procs[p] = subprocess.Popen(
                cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT, env=env
            )
        stack.callback(stop, procs[p], signal.SIGTERM, 20.0)
    for p in cmds:
        wait_http(f"http://127.0.0.1:{ports[p]}/health", procs[p], timeout_s, logs / f"serve-{p}.log")
    return round(time.monotonic() - t0, 1)


class SimEngine(VllmEngine):
    """qtrap-sim speaking vLLM's API in place of vLLM: a CPU check of this script's flow."""

    name = "qtrap-sim (flow check)"

    def build(self, args: argparse.Namespace, work: Path, logs: Path, env: dict[str, str],
              result: dict[str, Any]) -> None:  # fmt: skip
        precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
        self.plan = memory_plan(args.shape, precisions, args.kv_tokens, 80.0)

    def commands(self, args: argparse.Namespace, work: Path, ports: dict[str, int]) -> dict[str, list[str]]:
        return {
            p: [sys.executable, "-m", "qtrap_sim", "--model", "qwen3-0.6b", "--served-model-name", args.shape,
                "--precision", {"w8a8": "int8", "w4a16": "int4"}.get(p, p), "--port", str(port)]
            for p, port in ports.items()
        }  # fmt: skip

    def env(self, args: argparse.Namespace, work: Path) -> dict[str, str]:
        return {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("models", help="write the config-only model folders of a shape")
    m.add_argument("--shape", choices=sorted(real_nvml.SHAPES), required=True)
    m.add_argument("--dir", required=True)
    r = sub.add_parser("run", help="the whole job for one model shape")
    e2e.add_run_args(
        r, precisions=",".join(PRECISIONS), concurrency=[1, 4, 16, 64, 128, 256], duration=8.0, max_tokens=64,
        work="/tmp/qtrap-vllm", start_timeout_s=420.0, serve_help="more vLLM server arguments",
    )  # fmt: skip
    r.add_argument("--engine", choices=["vllm", "sim"], default="vllm")
    r.add_argument("--vllm-site", default="/tmp/vsite", help="where vLLM's packages were unpacked")
    r.add_argument("--kv-tokens", type=int, default=120_000, help="KV cache per server, in tokens")
    r.add_argument("--max-model-len", type=int, default=4096)
    r.add_argument("--max-num-seqs", type=int, default=256)
    k = sub.add_parser("kernels", help="the kernels each server's log names")
    k.add_argument("--logs", required=True)
    s = sub.add_parser("summarise", help="e2e-summary.json/.md from a results folder")
    s.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.cmd == "models":
        print(json.dumps(write_models(args.shape, Path(args.dir))))
        return 0
    if args.cmd == "kernels":
        print(json.dumps(kernels(Path(args.logs)), indent=1))
        return 0
    if args.cmd == "summarise":
        e2e.summarise(Path(args.out))
        return 0
    args.no_quant = False
    args.reuse_model = True
    engine: VllmEngine = SimEngine(args.vllm_site) if args.engine == "sim" else VllmEngine(args.vllm_site)
    rc = e2e.run(args, engine)
    out = Path(args.out)
    try:
        doc = json.loads((out / "e2e-run.json").read_text())
        doc["kernels"] = kernels(out / "logs")
        e2e.write_json(out / "e2e-run.json", doc)
    except (OSError, ValueError) as e:
        print(f"kernels: {e}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
