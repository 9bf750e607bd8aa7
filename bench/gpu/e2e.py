"""The whole qtrap stack on one real GPU: real inference servers at BF16, 8-bit and 4-bit behind qtrap-proxy
(NVML meter), and a loadgen sweep through it.

Runs on the GPU machine (written for an H100; ``bench/gpu/e2e.sh`` sets it up). ``run`` does, for one
model shape:

1. writes a random-weight Qwen3 model of that shape (``real_nvml.py build``: BF16, a word-level tokenizer
   covering every id, the end-of-sequence row zeroed so that every answer runs to ``max_tokens``);
2. starts three ``transformers serve MODEL --continuous-batching`` servers side by side on the same GPU:
   BF16 (``--dtype bfloat16``), ``--quantization bnb-8bit`` (bitsandbytes LLM.int8) and
   ``--quantization bnb-4bit`` (bitsandbytes NF4, double quantisation; transformers serve leaves the
   compute dtype at its float32 default), each with a fixed KV cache (``--cb-num-blocks``,
   ``--cb-max-batch-tokens``) so that three fit on one GPU, and warms each up directly;
3. polls NVML's energy counter in a separate process (``real_nvml.py poll``), an independent reading of
   the whole run;
4. starts ``qtrap-proxy serve`` with the three servers as one pool (precisions ``bf16``, ``bnb-8bit``,
   ``bnb-4bit``; ``kind: openai``; every backend on the same device, ``localhost`` GPU 0) and
   ``meter: {kind: nvml}``;
5. runs ``python -m loadgen --proxy ...`` (synthetic chains, one request per hop, ``--no-score``: the
   weights are random, so the answers mean nothing and accuracy is not measured) with a deadline: at the
   deadline loadgen gets SIGINT and writes its partial report;
6. reads the proxy's ``GET /qtrap/v1/energy`` and energy metrics, stops everything, and writes
   ``e2e-run.json`` and the summary (``summarise``).

loadgen's levels run one precision at a time, so only one server is busy at any moment and the device's
energy in a level's window belongs to that precision's requests (and the idle floor).

Other subcommands:

* ``summarise --out DIR``: ``e2e-summary.json`` and ``e2e-summary.md`` from a results folder (conservation,
  the independent counter against the proxy, per-request and per-hop energy, J/token per precision and
  concurrency, B*, casting overhead, average power per level);
* ``crosscheck --report report.json --calib calib.json --out DIR``: loadgen's J/token ratios (quantized /
  BF16 per concurrency) against the kernel-level calibration probe's (``bench/gpu/calibrate.py``) at the
  same batch size, with the step-time and power decomposition that explains the difference.

A check of the flow on a CPU (no GPU): ``--device cpu --no-quant --meter sim`` (three BF16 servers under
the three labels; a qtrap_sim process stands in for the GPU's energy counter) with ``--shape tiny``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import gzip
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]
for p in (str(ROOT), str(HERE.parent)):
    if p not in sys.path:
        sys.path.insert(0, p)

import real_nvml  # noqa: E402  (bench/gpu/real_nvml.py: model building, the counter poller)

# precision label (proxy, loadgen) -> transformers serve arguments; calibrate.py kernel that matches it
PRECISIONS: dict[str, list[str]] = {
    "bf16": [],
    "bnb-8bit": ["--quantization", "bnb-8bit"],
    "bnb-4bit": ["--quantization", "bnb-4bit"],
}
KERNEL_OF = {"bf16": "bf16", "bnb-8bit": "bnb_int8", "bnb-4bit": "bnb_nf4_serve"}
KERNEL_FALLBACK = {"bnb_nf4_serve": "bnb_nf4"}
NO_SCORE = (
    "random weights: answers carry no information, so accuracy is not measured; energy and speed are real"
)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, default=str) + "\n")


def _get_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _get_text(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return str(r.read().decode())


def gpu_memory() -> list[dict[str, Any]] | str:
    """nvidia-smi's view of device and per-process memory (MiB), or why there is none."""
    if shutil.which("nvidia-smi") is None:
        return "no nvidia-smi"
    q = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
    )
    d = subprocess.run(
        [
            "nvidia-smi",
            "--query-gpu=memory.used,memory.total,power.draw,temperature.gpu,clocks.sm",
            "--format=csv,noheader,nounits",
        ],
        capture_output=True,
        text=True,
    )
    out: list[dict[str, Any]] = [{"device": d.stdout.strip()}]
    for line in q.stdout.strip().splitlines():
        pid, mem = (x.strip() for x in line.split(","))
        out.append({"pid": pid, "used_mib": mem})
    return out


# -- warm-up ---------------------------------------------------------------------------------------
async def _warm(url: str, model: str, n: int, max_tokens: int, extra: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    body = {
        **extra,
        "model": model,
        "messages": [{"role": "user", "content": " ".join(f"w{i + 4}" for i in range(64))}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    async def one(session: Any) -> int:
        async with session.post(url + "/v1/chat/completions", json=body) as r:
            if r.status != 200:
                raise RuntimeError(f"warm-up: HTTP {r.status}: {(await r.text())[:300]}")
            n_chunks = 0
            async for _ in r.content:
                n_chunks += 1
            return n_chunks

    t0 = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as s:
        chunks = await asyncio.gather(*(one(s) for _ in range(n)))
    return {"n": n, "seconds": time.monotonic() - t0, "lines": sum(chunks)}


def warm_up(
    urls: dict[str, str], model: str, sizes: list[int], max_tokens: int, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Direct requests to each server (not through the proxy): the first request starts transformers'
    continuous-batching loop and allocates its cache (vLLM: its first batches of each size); a wave of each
    loadgen concurrency follows."""
    out: dict[str, Any] = {}
    for p, url in urls.items():
        out[p] = [asyncio.run(_warm(url, model, n, max_tokens, extra or {})) for n in [1, *sizes]]
        print(f"warm-up {p}: " + ", ".join(f"{w['n']} in {w['seconds']:.1f} s" for w in out[p]), flush=True)
    return out


# -- CPU time of the stack's processes ---------------------------------------------------------------
class CpuSampler:
    """Every ``period_s``, the CPU seconds (user + system) so far of each named process and all its
    descendants, read from /proc (Linux): shows whether the proxy, loadgen or a server's host side was
    saturated at a level (CPU seconds per second near 1.0 for a single-threaded Python process)."""

    def __init__(self, out: Path, period_s: float = 0.5) -> None:
        import threading

        self.out = out
        self.period_s = period_s
        self.roots: dict[str, int] = {}
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def watch(self, name: str, pid: int) -> None:
        self.roots[name] = pid

    def _tree_cpu(self) -> dict[str, float]:
        stats: dict[int, tuple[int, float]] = {}  # pid -> (ppid, cpu seconds)
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                raw = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            fields = raw[raw.rindex(")") + 2 :].split()
            stats[int(d)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / self._tick)
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in stats.items():
            children.setdefault(ppid, []).append(pid)
        out = {}
        for name, root in self.roots.items():
            total, todo = 0.0, [root]
            while todo:
                pid = todo.pop()
                if pid in stats:
                    total += stats[pid][1]
                    todo.extend(children.get(pid, []))
            out[name] = round(total, 2)
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.samples.append({"t": time.monotonic(), "cpu_s": self._tree_cpu()})
            except Exception as e:  # never lose the run for a sampler
                self.samples.append({"t": time.monotonic(), "error": str(e)[:200]})

    def start(self) -> None:
        if Path("/proc/self/stat").exists():
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.out.write_text(
            json.dumps({"period_s": self.period_s, "roots": self.roots, "samples": self.samples})
        )


# -- engines ---------------------------------------------------------------------------------------
class Engine:
    """What differs between serving engines: the model folders, the server commands, how the proxy
    addresses a server. ``run`` does the rest (poller, proxy, loadgen, accounts) the same way for all."""

    name = "engine"
    modules: tuple[str, ...] = ()  # versions recorded in e2e-run.json

    def build(
        self, args: argparse.Namespace, work: Path, logs: Path, env: dict[str, str], result: dict[str, Any]
    ) -> None:
        raise NotImplementedError

    def commands(self, args: argparse.Namespace, work: Path, ports: dict[str, int]) -> dict[str, list[str]]:
        raise NotImplementedError

    def env(self, args: argparse.Namespace, work: Path) -> dict[str, str]:
        return {}

    def model_id(self, args: argparse.Namespace, work: Path) -> str:
        raise NotImplementedError

    def backend(self, args: argparse.Namespace, work: Path, precision: str, url: str) -> dict[str, Any]:
        raise NotImplementedError

    def extra_body(self) -> dict[str, Any]:
        return {}

    def after_up(
        self, args: argparse.Namespace, urls: dict[str, str], out: Path, result: dict[str, Any]
    ) -> None:
        """Checks against the running servers before the measurement (none by default)."""

    def after_proxy(
        self, args: argparse.Namespace, proxy: str, urls: dict[str, str], out: Path, result: dict[str, Any]
    ) -> None:
        """Checks through the running proxy before the measurement (none by default)."""


class ServeEngine(Engine):
    """``transformers serve --continuous-batching``, one server per precision (bitsandbytes quantization)."""

    name = "transformers-serve"
    modules = ("bitsandbytes",)

    def build(
        self, args: argparse.Namespace, work: Path, logs: Path, env: dict[str, str], result: dict[str, Any]
    ) -> None:
        model_dir = work / args.shape
        if (model_dir / "config.json").exists() and args.reuse_model:
            return
        built = subprocess.run(
            [sys.executable, str(HERE.parent / "real_nvml.py"), "build", "--shape", args.shape,
             "--dir", str(model_dir)],
            env={**os.environ, **env}, capture_output=True, text=True,
        )  # fmt: skip
        (logs / "build.log").write_text(built.stdout + built.stderr)
        if built.returncode != 0:
            raise RuntimeError(f"model build failed: {built.stderr[-2000:]}")
        result["model"] = json.loads(built.stdout.strip().splitlines()[-1])

    def commands(self, args: argparse.Namespace, work: Path, ports: dict[str, int]) -> dict[str, list[str]]:
        base = [sys.executable, "-m", "transformers.cli.transformers", "serve"]
        help_text = subprocess.run(
            [*base, "--help"], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
        ).stdout
        common = ["--continuous-batching", "--host", "127.0.0.1", "--dtype", "bfloat16"]
        if "--cb-num-blocks" in help_text and args.cb_num_blocks:
            common += ["--cb-num-blocks", str(args.cb_num_blocks)]
        if "--cb-max-batch-tokens" in help_text and args.cb_max_batch_tokens:
            common += ["--cb-max-batch-tokens", str(args.cb_max_batch_tokens)]
        common += args.serve_args.split()
        return {
            p: [*base, str(work / args.shape), *common, "--port", str(port),
                *([] if args.no_quant else PRECISIONS[p])]
            for p, port in ports.items()
        }  # fmt: skip

    def model_id(self, args: argparse.Namespace, work: Path) -> str:
        return str(work / args.shape)

    def backend(self, args: argparse.Namespace, work: Path, precision: str, url: str) -> dict[str, Any]:
        return {"name": f"hf-{precision}", "kind": "openai", "url": url, "model": self.model_id(args, work),
                "health_path": "/health"}  # fmt: skip


# -- run -------------------------------------------------------------------------------------------
def run(args: argparse.Namespace, engine: Engine | None = None) -> int:
    """The whole job for one shape (steps: the module docstring); ``engine`` starts the servers (default:
    transformers serve; bench/gpu/vllm_e2e.py passes vLLM)."""
    import yaml

    from qtrap_common.localproc import child, free_port, stop, wait_http

    deadline = float(os.environ.get("QTRAP_DEADLINE_UNIX", "0")) or (time.time() + args.budget_s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    engine = engine or ServeEngine()
    result: dict[str, Any] = {
        "bench": "e2e",
        "engine": engine.name,
        "started": _now(),
        "host": platform.node(),
        "python": sys.version.split()[0],
        "args": vars(args),
        "deadline_unix": deadline,
        "steps": {},
    }
    run_json = out / "e2e-run.json"

    def save() -> None:
        write_json(run_json, result)

    def left() -> float:
        return deadline - time.time()

    def step(name: str, t0: float, **extra: Any) -> None:
        result["steps"][name] = {"seconds": round(time.monotonic() - t0, 2), **extra}
        print(f"[{name}] {time.monotonic() - t0:.1f} s {extra if extra else ''}", flush=True)
        save()

    env = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(work / "hf-home"),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    versions: dict[str, str | None] = {}
    for mod in ("torch", "transformers", *engine.modules, "aiohttp", "pynvml", "numpy", "rich", "matplotlib"):
        try:
            m = __import__(mod)
            versions[mod] = getattr(m, "__version__", "?")
        except Exception:
            versions[mod] = None
    result["versions"] = versions
    try:
        result["git_commit"] = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        result["git_commit"] = None
    save()

    def _term(*_: object) -> None:  # `timeout` stops us: stop the servers, keep what was measured
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, _term)
    rc = 0
    poll_out = work / f"poll-{args.shape}.json"
    try:
        with ExitStack() as stack:
            # 1. the model(s); 2. the servers, side by side; their warm-up
            t0 = time.monotonic()
            engine.build(args, work, logs, env, result)
            step("build", t0)
            t0 = time.monotonic()
            ports = {p: free_port() for p in precisions}
            urls = {p: f"http://127.0.0.1:{port}" for p, port in ports.items()}
            procs: dict[str, subprocess.Popen[bytes]] = {}
            cmds = engine.commands(args, work, ports)
            senv = {**os.environ, **env, **engine.env(args, work)}
            for p in precisions:
                with (logs / f"serve-{p}.log").open("wb") as f:
                    procs[p] = subprocess.Popen(
                        cmds[p],
                        stdout=f,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        cwd=ROOT,
                        env=senv,
                    )
                stack.callback(stop, procs[p], signal.SIGTERM, 20.0)
                if args.stagger_s:
                    time.sleep(args.stagger_s)
            result["serve_cmds"] = cmds
            sampler = CpuSampler(out / "cpu.json")
            for p in precisions:
                sampler.watch(f"server-{p}", procs[p].pid)
            sampler.start()
            stack.callback(sampler.stop)
            for p in precisions:
                wait_http(urls[p] + "/health", procs[p], args.start_timeout_s, logs / f"serve-{p}.log")
            step("servers_up", t0, gpu_memory=gpu_memory())

            t0 = time.monotonic()
            sizes = [c for c in (args.warm_sizes or args.concurrency) if c > 1]
            result["warm_up"] = warm_up(urls, engine.model_id(args, work), sizes, args.warm_tokens,
                                        engine.extra_body())  # fmt: skip
            step("warm_up", t0, gpu_memory=gpu_memory())
            engine.after_up(args, urls, out, result)
            save()

            # 3. the independent counter
            poller = None
            sim_dcgm = None
            if args.meter == "sim":  # a simulated GPU's counter stands in for NVML (flow check on a CPU)
                sim_port = free_port()
                sim_proc = stack.enter_context(
                    child(
                        [sys.executable, "-m", "qtrap_sim", "--port", str(sim_port), "--model", "qwen3-0.6b"],
                        f"http://127.0.0.1:{sim_port}/health",
                        logs / "sim-counter.log",
                        env=env,
                        cwd=ROOT,
                    )
                )
                del sim_proc
                sim_dcgm = f"http://127.0.0.1:{sim_port}/dcgm/metrics"
            if args.meter != "null":
                poll_out.unlink(missing_ok=True)
                poll_out.with_suffix(".ready").unlink(missing_ok=True)
                poll_cmd = [sys.executable, str(HERE.parent / "real_nvml.py"), "poll", "--out", str(poll_out),
                            "--sleep-s", str(args.poll_sleep_s)]  # fmt: skip
                if sim_dcgm:
                    poll_cmd += ["--dcgm-url", sim_dcgm]
                poll_log = (logs / "poll.log").open("wb")
                stack.callback(poll_log.close)
                poller = subprocess.Popen(
                    poll_cmd, stdout=poll_log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT
                )
                stack.callback(stop, poller, signal.SIGTERM, 15.0)
                t_end = time.monotonic() + 30
                while not poll_out.with_suffix(".ready").exists() and poller.poll() is None:
                    if time.monotonic() > t_end:
                        break
                    time.sleep(0.02)
                if not poll_out.with_suffix(".ready").exists():
                    raise RuntimeError("the energy counter poller did not start; see logs/poll.log")

            # 4. the proxy
            proxy_port = free_port()
            host = "qtrap-sim" if args.meter == "sim" else "localhost"
            meter: dict[str, Any] = {"kind": "dcgm" if args.meter == "sim" else args.meter}
            if sim_dcgm:
                meter["urls"] = [sim_dcgm]
            cfg = {
                "server": {"host": "127.0.0.1", "port": proxy_port},
                "backends": [
                    {
                        **engine.backend(args, work, p, urls[p]),
                        "pool": args.shape,
                        "precision": p,
                        "devices": [{"host": host, "index": 0}],
                        "timeouts": {"read_s": 300},
                    }
                    for p in precisions
                ],
                "pools": {args.shape: {"default_precision": precisions[0]}},
                "meter": meter,
                "ledger": {"path": str(work / f"ledger-{args.shape}-{proxy_port}.sqlite")},
            }
            cfg_path = out / "proxy.yaml"
            cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            result["proxy_config"] = cfg
            result["proxy_start_t"] = time.monotonic()
            proxy_proc = stack.enter_context(
                child(
                    [sys.executable, "-m", "qtrap_proxy", "serve", "--config", str(cfg_path), "--log-level",
                     "warning"],
                    f"http://127.0.0.1:{proxy_port}/v1/models", logs / "proxy.log", timeout_s=60, env=env,
                    cwd=ROOT,
                )
            )  # fmt: skip
            proxy = f"http://127.0.0.1:{proxy_port}"
            sampler.watch("proxy", proxy_proc.pid)
            if args.meter != "null":  # the meter's first updates
                t_end = time.monotonic() + 30
                while time.monotonic() < t_end:
                    devs = _get_json(proxy + "/qtrap/v1/energy")["devices"]
                    if devs and all(d["meter_up"] and d["updates"] >= 3 for d in devs):
                        break
                    time.sleep(0.1)
            engine.after_proxy(args, proxy, urls, out, result)
            save()
            result["proxy_energy_before"] = _get_json(proxy + "/qtrap/v1/energy")
            result["proxy_energy_before_t"] = time.monotonic()

            # 5. loadgen, with a deadline
            lg_out = out / "loadgen"
            lg = [
                sys.executable, "-m", "loadgen", "--proxy", proxy, "--model", args.shape,
                "--precisions", ",".join(precisions), "--baseline", precisions[0],
                "--concurrency", ",".join(map(str, args.concurrency)), "--hops", "requests",
                "--max-tokens", str(args.max_tokens), "--no-score", NO_SCORE,
                "--bootstrap", str(args.bootstrap), "--final-timeout", "60", "--timeout", "300",
                "--seed", str(args.seed), "--out", str(lg_out), "--quiet",
            ]  # fmt: skip
            extra = engine.extra_body()
            if extra:
                lg += ["--extra-body", json.dumps(extra)]
            lg += (
                ["--duration", str(args.duration)]
                if args.duration
                else ["--num-chains", str(args.num_chains)]
            )
            result["loadgen_cmd"] = lg
            budget = left() - args.reserve_s
            result["loadgen_budget_s"] = budget
            save()
            print(f"loadgen: {budget:.0f} s before SIGINT: {' '.join(lg)}", flush=True)
            t0 = time.monotonic()
            with (logs / "loadgen.log").open("wb") as f:
                lgp = subprocess.Popen(
                    lg, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **env}
                )
                sampler.watch("loadgen", lgp.pid)
                try:
                    lgp.wait(timeout=max(5.0, budget))
                except subprocess.TimeoutExpired:
                    result["loadgen_interrupted"] = f"SIGINT after {budget:.0f} s (deadline)"
                    lgp.send_signal(signal.SIGINT)
                    try:
                        lgp.wait(timeout=max(20.0, args.reserve_s - 25))
                    except subprocess.TimeoutExpired:
                        lgp.kill()
                        lgp.wait()
            result["loadgen_exit"] = lgp.returncode
            step("loadgen", t0, exit=lgp.returncode)
            print((logs / "loadgen.log").read_text(errors="replace")[-6000:], flush=True)

            # 6. the proxy's accounts
            t_rep = time.monotonic()
            result["proxy_energy_after"] = _get_json(proxy + "/qtrap/v1/energy")
            result["proxy_energy_after_t"] = (t_rep + time.monotonic()) / 2
            write_json(out / "proxy-energy.json", result["proxy_energy_after"])
            metrics = _get_text(proxy + "/metrics")
            (out / "proxy-metrics.txt").write_text(
                "".join(line + "\n" for line in metrics.splitlines() if line.startswith("qtrap_"))
            )
            stop(proxy_proc, signal.SIGTERM, 15.0)
            ledger = Path(cfg["ledger"]["path"])
            if ledger.exists():  # every request's final record and token timeline, as the proxy stored it
                import sqlite3

                copy = work / "ledger-copy.sqlite"
                copy.unlink(missing_ok=True)
                with sqlite3.connect(ledger) as src, sqlite3.connect(copy) as dst:
                    src.backup(dst)
                (out / "ledger.sqlite.gz").write_bytes(gzip.compress(copy.read_bytes(), 6))
                copy.unlink()
            if poller is not None:
                time.sleep(0.3)  # a counter update after the proxy's last reading
                stop(poller, signal.SIGTERM, 15.0)
            result["gpu_memory_end"] = gpu_memory()
            save()
    except (Exception, SystemExit) as e:  # keep what was measured
        result["error"] = f"{type(e).__name__}: {e}"[:3000]
        print("e2e failed:", result["error"], file=sys.stderr, flush=True)
        rc = 1
    # the counter polls travel compressed
    if poll_out.exists():
        (out / "poll.json.gz").write_bytes(gzip.compress(poll_out.read_bytes(), 9))
    result["finished"] = _now()
    save()
    try:
        summarise(out)
    except Exception as e:
        print(f"summary failed: {type(e).__name__}: {e}", file=sys.stderr)
        rc = rc or 1
    return rc


# -- summary ---------------------------------------------------------------------------------------
def _f(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        return f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:,.0f}"
    return str(x)


def _q(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return math.nan
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarise(out: Path) -> dict[str, Any]:
    """e2e-summary.json / .md from a results folder (run's e2e-run.json, loadgen/report.json, its
    requests.csv, the counter polls)."""
    run_doc = json.loads((out / "e2e-run.json").read_text()) if (out / "e2e-run.json").exists() else {}
    rep_path = out / "loadgen" / "report.json"
    if not rep_path.exists():
        raise FileNotFoundError(f"{rep_path}: loadgen wrote no report")
    rep = json.loads(rep_path.read_text())
    s: dict[str, Any] = {
        "accuracy": "measured"
        if rep.get("accuracy_measured", True)
        else f"not measured ({rep.get('accuracy_null_reason')})"
    }
    poll = None
    if (out / "poll.json.gz").exists():
        poll = json.loads(gzip.decompress((out / "poll.json.gz").read_bytes()))
    counter = real_nvml.Counter(poll) if poll else None

    # conservation (the proxy's accounts at the end) and the independent counter
    after = run_doc.get("proxy_energy_after") or {}
    before = run_doc.get("proxy_energy_before") or {}
    cons = []
    for d in after.get("devices", []):
        b = next((x for x in before.get("devices", []) if x["device"] == d["device"]), None)
        row = {k: d.get(k) for k in ("device", "meter", "updates", "measured_j", "attributed_j", "idle_j",
                                     "foreign_j", "conservation_error_j", "conservation_error_ratio",
                                     "pending_intervals", "counter_resets")}  # fmt: skip
        if b is not None and counter is not None:
            row["proxy_measured_between_reads_j"] = d["measured_j"] - b["measured_j"]
            row["counter_between_reads_j"] = counter.window(
                run_doc["proxy_energy_before_t"], run_doc["proxy_energy_after_t"]
            )
            if row["counter_between_reads_j"]:
                row["proxy_over_counter"] = (
                    row["proxy_measured_between_reads_j"] / row["counter_between_reads_j"]
                )
        cons.append(row)
    s["conservation"] = cons
    if counter is not None and poll:
        busy = [tuple(w) for lv in rep["levels"] for w in lv.get("windows_monotonic_s") or []]
        s["counter"] = real_nvml.counter_period(poll, busy)  # type: ignore[arg-type]

    cpu = json.loads((out / "cpu.json").read_text()) if (out / "cpu.json").exists() else None

    def cpu_rates(windows: list[list[float]]) -> dict[str, float] | None:
        """CPU seconds per second of each watched process tree over a level's windows."""
        if not cpu or not windows:
            return None
        samples = [x for x in cpu["samples"] if "cpu_s" in x]
        rates: dict[str, float] = {}
        for name in cpu["roots"]:
            used = span = 0.0
            for a, b in windows:
                inside = [x for x in samples if a <= x["t"] <= b and name in x["cpu_s"]]
                if len(inside) >= 2:
                    used += inside[-1]["cpu_s"][name] - inside[0]["cpu_s"][name]
                    span += inside[-1]["t"] - inside[0]["t"]
            if span > 0:
                rates[name] = round(used / span, 3)
        return rates or None

    # requests
    rows: list[dict[str, str]] = []
    if (out / "loadgen" / "requests.csv").exists():
        with (out / "loadgen" / "requests.csv").open() as f:
            rows = list(csv.DictReader(f))
    levels = []
    for lv in sorted(rep["levels"], key=lambda x: (x["concurrency"], x["precision"])):
        p, c = lv["precision"], lv["concurrency"]
        mine = [r for r in rows if r["precision"] == p and int(r["concurrency"]) == c]
        win = [r for r in mine if r["in_window"] == "1" and r["warmup"] == "0" and r["energy_j"]]
        e = [float(r["energy_j"]) for r in win]
        jt = [
            float(r["energy_j"]) / int(r["completion_tokens"])
            for r in win
            if int(r["completion_tokens"] or 0)
        ]
        eb = [float(r["error_bound_j"]) for r in win if r["error_bound_j"]]
        comp = sorted({int(r["completion_tokens"]) for r in mine if r["completion_tokens"]})
        prompt = [int(r["prompt_tokens"]) for r in win if r["prompt_tokens"]]
        counter_j = None
        if counter is not None and lv.get("windows_monotonic_s"):
            parts = [counter.window(a, b) for a, b in lv["windows_monotonic_s"]]
            counter_j = None if any(x is None for x in parts) else sum(parts)  # type: ignore[misc]
        w_s = lv["window_s"] or math.nan
        tokens_win = (lv["tokens_per_s"] or math.nan) * w_s
        ci = (lv.get("ci") or {}).get("j_per_token")
        levels.append(
            {
                "precision": p,
                "concurrency": c,
                "chains": lv["chains"],
                "requests": lv["requests"],
                "errors": lv["errors"],
                "window_s": lv["window_s"],
                "window_requests": lv["window_requests"],
                "completion_tokens_seen": comp,
                "prompt_tokens_median": statistics.median(prompt) if prompt else None,
                "j_per_token": lv["j_per_token"],
                "j_per_token_ci": ci,
                "measured_j_per_token": lv["measured_j_per_token"],
                "counter_j_per_token": counter_j / tokens_win if counter_j and tokens_win else None,
                "counter_window_j": counter_j,
                "avg_power_w": counter_j / w_s if counter_j else None,
                "attributed_over_counter": (lv["energy_j"] / counter_j) if counter_j and lv["energy_j"] else None,
                "tokens_per_s": lv["tokens_per_s"],
                "ttft_p50_s": lv["ttft_s"]["p50"],
                "itl_p50_s": lv["itl_s"]["p50"],
                "e2e_p50_s": lv["e2e_s"]["p50"],
                "j_per_request": lv["j_per_request"],
                "request_energy_j": {"n": len(e), "median": _q(e, 0.5), "p10": _q(e, 0.1), "p90": _q(e, 0.9),
                                     "min": min(e) if e else None, "max": max(e) if e else None},
                "request_j_per_token": {"median": _q(jt, 0.5), "p10": _q(jt, 0.1), "p90": _q(jt, 0.9)},
                "error_bound_j_median": _q(eb, 0.5) if eb else None,
                "energy_by_hop": lv.get("energy_by_hop"),
                "cpu_per_s": cpu_rates(lv.get("windows_monotonic_s") or []),
                "energy_null_reason": lv["energy_null_reason"],
                "energy_unknown_requests": lv["energy_unknown_requests"],
            }
        )  # fmt: skip
    s["levels"] = levels
    s["crossovers"] = [
        {k: cx.get(k) for k in ("precision", "baseline", "metric", "concurrency", "ratio", "ratio_ci", "b_star",
                                "ci", "ci_coverage", "direction", "note")}
        for cx in rep.get("crossovers", [])
    ]  # fmt: skip
    s["casting_overhead"] = [
        {k: i.get(k) for k in ("precision", "concurrency", "bits", "casting_overhead_ratio", "economy_index")}
        for i in rep.get("indices", [])
    ]
    s["partial"] = rep.get("partial")
    s["loadgen_exit"] = run_doc.get("loadgen_exit")
    s["steps"] = run_doc.get("steps")
    s["error"] = run_doc.get("error")
    write_json(out / "e2e-summary.json", s)
    (out / "e2e-summary.md").write_text(summary_md(s))
    print(summary_md(s), flush=True)
    return s


def summary_md(s: dict[str, Any]) -> str:
    L: list[str] = []
    L.append("### Conservation (proxy's accounts at the end of the run)\n")
    L.append(
        "| device | meter | measured J | attributed J | idle J | foreign J | conservation error | "
        "proxy measured / independent counter (between the proxy's first and last read of the run) |"
    )
    L.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for d in s["conservation"]:
        L.append(f"| {d['device']} | {d['meter']} | {_f(d['measured_j'], 6)} | {_f(d['attributed_j'], 6)} | "
                 f"{_f(d['idle_j'], 6)} | {_f(d['foreign_j'])} | "
                 f"{'-' if d['conservation_error_ratio'] is None else format(d['conservation_error_ratio'], '.1e')} | "
                 f"{_f(d.get('proxy_over_counter'), 4)} |")  # fmt: skip
    L.append("\n### Levels (steady-state windows)\n")
    L.append(
        "| precision | C | chains | window requests | window s | J/token [95% CI] | counter J/token | "
        "avg power W | tok/s | TTFT p50 s | ITL p50 ms | J/request median [p10, p90] | attributed / counter |"
    )
    L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for lv in s["levels"]:
        ci = lv["j_per_token_ci"]
        r = lv["request_energy_j"]
        L.append(
            f"| {lv['precision']} | {lv['concurrency']} | {lv['chains']} | {lv['window_requests']} | "
            f"{_f(lv['window_s'])} | {_f(lv['j_per_token'])} "
            f"{'' if not ci else '[' + _f(ci[0]) + ', ' + _f(ci[1]) + ']'} | {_f(lv['counter_j_per_token'])} | "
            f"{_f(lv['avg_power_w'])} | {_f(lv['tokens_per_s'])} | {_f(lv['ttft_p50_s'])} | "
            f"{_f(None if lv['itl_p50_s'] is None else lv['itl_p50_s'] * 1e3)} | "
            f"{_f(r['median'])} [{_f(r['p10'])}, {_f(r['p90'])}] | {_f(lv['attributed_over_counter'], 4)} |"
        )
    names = sorted({k for lv in s["levels"] for k in (lv.get("cpu_per_s") or {})})
    if names:
        L.append("\n### CPU seconds per second of each process tree over the window (1.0 = one core)\n")
        L.append("| precision | C | " + " | ".join(names) + " |")
        L.append("| --- | --- | " + " | ".join("---" for _ in names) + " |")
        for lv in s["levels"]:
            c = lv.get("cpu_per_s") or {}
            L.append(
                f"| {lv['precision']} | {lv['concurrency']} | "
                + " | ".join(_f(c.get(n)) for n in names)
                + " |"
            )
    L.append("\n### Energy by hop (window requests; J/request, J/token)\n")
    hops = sorted({int(h) for lv in s["levels"] for h in (lv["energy_by_hop"] or {})})
    L.append("| precision | C | " + " | ".join(f"hop {h}" for h in hops) + " |")
    L.append("| --- | --- | " + " | ".join("---" for _ in hops) + " |")
    for lv in s["levels"]:
        cells = []
        for h in hops:
            x = (lv["energy_by_hop"] or {}).get(str(h))
            cells.append(
                "-"
                if not x
                else f"{_f(x['j_per_request'])} J, {_f(x['j_per_token'])} J/tok (n={x['requests']})"
            )
        L.append(f"| {lv['precision']} | {lv['concurrency']} | " + " | ".join(cells) + " |")
    L.append("\n### B* (quantized / baseline J/token)\n")
    L.append(
        "| precision | metric | ratio by concurrency [95% CI] | B* | 95% CI | replicates crossing | direction |"
    )
    L.append("| --- | --- | --- | --- | --- | --- | --- |")
    for cx in s["crossovers"]:
        rs = []
        for i, c in enumerate(cx["concurrency"]):
            ci = (cx.get("ratio_ci") or [None] * len(cx["concurrency"]))[i]
            rs.append(f"C={c}: {_f(cx['ratio'][i])}" + (f" [{_f(ci[0])}, {_f(ci[1])}]" if ci else ""))
        L.append(f"| {cx['precision']} vs {cx['baseline']} | {cx['metric']} | {'; '.join(rs)} | "
                 f"{_f(cx['b_star']) if cx['b_star'] is not None else 'no crossover in range'} | "
                 f"{'-' if not cx['ci'] else '[' + _f(cx['ci'][0]) + ', ' + _f(cx['ci'][1]) + ']'} | "
                 f"{'-' if cx['ci_coverage'] is None else format(cx['ci_coverage'], '.0%')} | {cx['direction']} |")  # fmt: skip
    L.append("\n### Casting overhead (J/token against linear-in-bits scaling of BF16)\n")
    L.append("| precision | C | bits | casting overhead ratio | economy (tok/s vs BF16) |")
    L.append("| --- | --- | --- | --- | --- |")
    for i in s["casting_overhead"]:
        L.append(f"| {i['precision']} | {i['concurrency']} | {i['bits']} | {_f(i['casting_overhead_ratio'])} | "
                 f"{_f(i['economy_index'])} |")  # fmt: skip
    L.append(f"\nAccuracy: {s['accuracy']}.\n")
    return "\n".join(L) + "\n"


# -- cross-check -----------------------------------------------------------------------------------
def _load_calib(paths: list[Path]) -> dict[str, Any]:
    calib: dict[str, Any] = {"models": {}}
    for c in paths:
        doc = json.loads(c.read_text())
        calib.setdefault("idle_power_w", doc.get("idle_power_w"))
        for name, m in doc["models"].items():
            calib["models"].setdefault(name, {"kernels": {}, "attention": []})
            calib["models"][name]["kernels"].update(m.get("kernels", {}))
            calib["models"][name]["attention"] += m.get("attention", [])
            calib["models"][name]["shape"] = m.get("shape")
    return calib


def _calib_points(calib: dict[str, Any], shape: str, kernel: str | None) -> dict[int, dict[str, Any]]:
    m = calib["models"].get(shape) or {}
    ks = m.get("kernels") or {}
    k = ks.get(kernel or "") or ks.get(KERNEL_FALLBACK.get(kernel or "", ""))
    if not k:
        return {}
    return {pt["batch"]: pt for pt in k.get("points", []) if pt.get("step_s")}


def _attention(calib: dict[str, Any], shape: str, batch: int, ctx: int) -> dict[str, Any] | None:
    m = calib["models"].get(shape) or {}
    pts = [a for a in m.get("attention", []) if a.get("batch") == batch and "step_s" in a]
    if not pts:
        return None
    return min(pts, key=lambda a: abs(a["context"] - ctx))


def crosscheck(
    report: Path, calibs: list[Path], shape: str, out: Path, eager: list[Path] | None = None
) -> dict[str, Any]:
    """loadgen's J/token ratio (quantized / BF16, per concurrency) through the proxy against the kernel
    probe's at batch = concurrency, with what explains the difference:

    * J/token = average power x step time / batch, so a ratio of J/token at equal batch is the product of
      the step-time ratio and the power ratio; both are given for serving and for the probe;
    * the serving step is the kernel step plus what serving adds (attention, sampling over the vocabulary,
      scheduling, Python, streaming): ``serving step - kernel step``;
    * an additive model: the quantized server's step = the BF16 server's step + the difference of the
      kernels' steps in the probe (``eager`` probe when given: transformers serve launches kernels
      without CUDA graphs), and the ratio it predicts at the measured power ratio.
    """
    rep = json.loads(report.read_text())
    calib = _load_calib(calibs)
    ecalib = _load_calib(eager) if eager else None
    layers = (calib["models"].get(shape, {}).get("shape") or {}).get("layers")
    summary_path = report.parent.parent / "e2e-summary.json"
    summ = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    by = {(lv["precision"], lv["concurrency"]): lv for lv in rep["levels"]}
    sby = {(lv["precision"], lv["concurrency"]): lv for lv in summ.get("levels", [])}
    base = rep.get("baseline") or "bf16"
    rows = []

    def step_of(lv: dict[str, Any] | None) -> float | None:
        # the decode step in serving, from the window: C requests each get a token per step (prefill and the
        # gaps between a chain's hops make the running batch a little smaller than C)
        return lv["concurrency"] / lv["tokens_per_s"] if lv and lv.get("tokens_per_s") else None

    for (p, c), lv in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        kernel = KERNEL_OF.get(p)
        kp = _calib_points(calib, shape, kernel).get(c)
        kb = _calib_points(calib, shape, KERNEL_OF[base]).get(c)
        ekp = _calib_points(ecalib, shape, kernel).get(c) if ecalib else None
        ekb = _calib_points(ecalib, shape, KERNEL_OF[base]).get(c) if ecalib else None
        b = by.get((base, c))
        sl, sb = sby.get((p, c), {}), sby.get((base, c), {})
        row: dict[str, Any] = {"precision": p, "kernel": kernel, "concurrency": c, "batch": c}
        row["serve_j_per_token"] = lv["j_per_token"]
        row["serve_tokens_per_s"] = lv["tokens_per_s"]
        row["serve_step_s"] = step_of(lv)
        row["serve_itl_p50_s"] = (lv.get("itl_s") or {}).get("p50")
        row["serve_avg_power_w"] = sl.get("avg_power_w")
        row["kernel_j_per_token"] = kp.get("j_per_token") if kp else None
        row["kernel_step_s"] = kp.get("step_s") if kp else None
        row["kernel_avg_power_w"] = kp.get("avg_power_w") if kp else None
        row["kernel_eager_j_per_token"] = ekp.get("j_per_token") if ekp else None
        row["kernel_eager_step_s"] = ekp.get("step_s") if ekp else None
        ctx = sl.get("prompt_tokens_median") or 512
        att = _attention(calib, shape, c, int(ctx))
        row["attention_step_s"] = att["step_s"] * layers if att and layers else None
        row["serve_minus_kernel_s"] = (
            row["serve_step_s"] - row["kernel_step_s"]
            if row["serve_step_s"] and row["kernel_step_s"]
            else None
        )
        if b is not None and p != base:
            row["serve_ratio"] = _ratio(lv["j_per_token"], b["j_per_token"])
            row["kernel_ratio"] = _ratio(row["kernel_j_per_token"], kb.get("j_per_token") if kb else None)
            row["kernel_eager_ratio"] = _ratio(
                row["kernel_eager_j_per_token"], ekb.get("j_per_token") if ekb else None
            )
            row["disagreement"] = _ratio(row["serve_ratio"], row["kernel_ratio"])
            row["serve_step_ratio"] = _ratio(row["serve_step_s"], step_of(b))
            row["kernel_step_ratio"] = _ratio(row["kernel_step_s"], kb.get("step_s") if kb else None)
            row["serve_power_ratio"] = _ratio(sl.get("avg_power_w"), sb.get("avg_power_w"))
            row["kernel_power_ratio"] = _ratio(
                row["kernel_avg_power_w"], kb.get("avg_power_w") if kb else None
            )
            mp, mb, model = (ekp, ekb, "eager") if ekp and ekb else (kp, kb, "graph")
            base_step = step_of(b)
            if mp and mb and base_step:
                pred = base_step + mp["step_s"] - mb["step_s"]
                row["additive_model_probe"] = model
                row["additive_step_s"] = pred
                row["additive_step_error"] = row["serve_step_s"] / pred - 1 if row["serve_step_s"] else None
                row["additive_ratio"] = (
                    pred / base_step * row["serve_power_ratio"] if row["serve_power_ratio"] else None
                )
        rows.append(row)
    doc = {"shape": shape, "report": str(report), "calibration": [str(c) for c in calibs],
           "calibration_eager": [str(c) for c in eager or []],
           "idle_power_w_probe": calib.get("idle_power_w"), "rows": rows}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "crosscheck.json", doc)
    md = crosscheck_md(doc)
    (out / "crosscheck.md").write_text(md)
    print(md)
    return doc


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if a is not None and b else None


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.3g} ms"


def crosscheck_md(doc: dict[str, Any]) -> str:
    eager = bool(doc.get("calibration_eager"))
    L = [
        "| precision (probe kernel) | C = batch | J/token ratio through the proxy | J/token ratio, probe with CUDA "
        "graphs | proxy / probe | J/token ratio, probe without graphs | step time ratio: serving / probe | "
        "power ratio: serving / probe | additive model: step error, predicted ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in doc["rows"]:
        if "serve_ratio" not in r:
            continue
        flag = ""
        if r.get("disagreement") is not None and abs(r["disagreement"] - 1) > 0.15:
            flag = " **(>15%)**"
        add = "-"
        if r.get("additive_step_s") is not None:
            err = r.get("additive_step_error")
            add = (f"{'-' if err is None else format(err, '+.0%')} ({r['additive_model_probe']}), "
                   f"{_f(r.get('additive_ratio'))}")  # fmt: skip
        L.append(
            f"| {r['precision']} ({r['kernel']}) | {r['concurrency']} | {_f(r['serve_ratio'])} | "
            f"{_f(r['kernel_ratio'])} | {_f(r['disagreement'])}{flag} | "
            f"{_f(r.get('kernel_eager_ratio')) if eager else '-'} | "
            f"{_f(r['serve_step_ratio'])} / {_f(r['kernel_step_ratio'])} | "
            f"{_f(r['serve_power_ratio'])} / {_f(r['kernel_power_ratio'])} | {add} |"
        )  # fmt: skip
    L.append("")
    L.append("| precision | C | J/token through the proxy | J/token, probe (graphs) | serving step (window) | "
             "ITL p50 | probe step (graphs) | probe step (no graphs) | serving step - probe step (graphs) | "
             "attention probe, all layers | avg power: serving / probe |")  # fmt: skip
    L.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in doc["rows"]:
        L.append(
            f"| {r['precision']} | {r['concurrency']} | {_f(r['serve_j_per_token'])} | {_f(r['kernel_j_per_token'])} | "
            f"{_ms(r['serve_step_s'])} | {_ms(r['serve_itl_p50_s'])} | {_ms(r['kernel_step_s'])} | "
            f"{_ms(r['kernel_eager_step_s'])} | {_ms(r['serve_minus_kernel_s'])} | {_ms(r['attention_step_s'])} | "
            f"{_f(r['serve_avg_power_w'])} W / {_f(r['kernel_avg_power_w'])} W |"
        )  # fmt: skip
    return "\n".join(L) + "\n"


def squeeze_log(text: str) -> str:
    """A log with each run of identical consecutive lines (bitsandbytes warns once per 8-bit matmul) written
    once, followed by how often it repeated."""
    out: list[str] = []
    prev: str | None = None
    n = 0
    for line in [*text.splitlines(), None]:
        if line == prev:
            n += 1
            continue
        if prev is not None:
            out.append(prev if n == 1 else f"{prev}    [this line {n} times in a row]")
        prev, n = line, 1
    return "\n".join(out) + "\n"


def collect(src: Path, dst: Path) -> None:
    """Copy an unpacked results folder (``e2e-results.tar.gz``) to ``dst``, logs squeezed (squeeze_log)."""
    for f in sorted(src.rglob("*")):
        if f.is_dir():
            continue
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        if f.suffix == ".log":
            target.write_text(squeeze_log(f.read_text(errors="replace")))
        else:
            shutil.copyfile(f, target)
        print(f"{target} ({target.stat().st_size:,} bytes)")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def add_run_args(
    r: argparse.ArgumentParser,
    *,
    precisions: str,
    concurrency: list[int],
    duration: float,
    max_tokens: int,
    work: str,
    start_timeout_s: float,
    serve_help: str,
) -> None:
    """The ``run`` options every engine's driver shares (this module's and vllm_e2e.py's)."""
    r.add_argument("--shape", choices=sorted(real_nvml.SHAPES), default="qwen3-0.6b")
    r.add_argument("--precisions", default=precisions)
    r.add_argument("--concurrency", type=_ints, default=concurrency)
    r.add_argument(
        "--duration", type=float, default=duration, help="seconds of steady state per level (0: chains)"
    )
    r.add_argument("--num-chains", type=int, default=16, help="measured chains per level when --duration 0")
    r.add_argument("--max-tokens", type=int, default=max_tokens)
    r.add_argument("--bootstrap", type=int, default=1000)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--meter", choices=["nvml", "sim", "null"], default="nvml")
    r.add_argument("--serve-args", default="", help=serve_help)
    r.add_argument("--stagger-s", type=float, default=0.0, help="pause between server starts")
    r.add_argument(
        "--warm-sizes",
        type=_ints,
        help="concurrent warm-up waves per server after a single request (default: the concurrency levels)",
    )
    r.add_argument("--warm-tokens", type=int, default=8)
    r.add_argument("--poll-sleep-s", type=float, default=0.01)
    r.add_argument("--work", default=work)
    r.add_argument("--out", required=True)
    r.add_argument("--start-timeout-s", type=float, default=start_timeout_s)
    r.add_argument("--budget-s", type=float, default=540.0, help="or QTRAP_DEADLINE_UNIX")
    r.add_argument(
        "--reserve-s", type=float, default=45.0, help="kept after loadgen for its report and teardown"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="the whole job for one model shape")
    add_run_args(
        r, precisions=",".join(PRECISIONS), concurrency=[1, 8, 32], duration=20.0, max_tokens=32,
        work="/tmp/qtrap-e2e", start_timeout_s=240.0, serve_help="more transformers serve arguments (e.g. --device cpu)",
    )  # fmt: skip
    r.add_argument("--no-quant", action="store_true", help="flow check: every server at BF16")
    r.add_argument(
        "--cb-num-blocks", type=int, default=256, help="KV cache blocks per server (256 tokens each)"
    )
    r.add_argument("--cb-max-batch-tokens", type=int, default=2048)
    r.add_argument("--reuse-model", action="store_true")
    s = sub.add_parser("summarise", help="e2e-summary.json/.md from a results folder")
    s.add_argument("--out", required=True)
    c = sub.add_parser("crosscheck", help="loadgen's J/token ratios against the kernel probe's")
    c.add_argument("--report", required=True)
    c.add_argument("--calib", required=True, nargs="+", help="probe results with CUDA graphs")
    c.add_argument("--calib-eager", nargs="+", help="probe results without CUDA graphs (--no-graph)")
    c.add_argument("--shape", default="qwen3-0.6b")
    c.add_argument("--out", required=True)
    k = sub.add_parser("collect", help="copy an unpacked results folder, logs squeezed")
    k.add_argument("--src", required=True)
    k.add_argument("--dst", required=True)
    args = ap.parse_args()
    if args.cmd == "collect":
        collect(Path(args.src), Path(args.dst))
        return 0
    if args.cmd == "summarise":
        summarise(Path(args.out))
        return 0
    if args.cmd == "crosscheck":
        crosscheck(
            Path(args.report),
            [Path(x) for x in args.calib],
            args.shape,
            Path(args.out),
            [Path(x) for x in args.calib_eager or []],
        )
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
