"""qtrap's energy attribution on a real GPU: the proxy with the NVML meter in front of `transformers serve`.

Runs on the GPU machine (written for an H100; ``bench/gpu/real_nvml.sh`` sets it up), in one go:

1. builds a random-weight Qwen3 model of a real shape (``--shape qwen3-0.6b`` or ``qwen3-8b``,
   BF16) with an offline word-level tokenizer covering every token id, in ``--work``;
   the end-of-sequence token's embedding (and LM-head) row is zero, so its logit is
   always 0 and greedy decoding practically never stops early: every answer is
   ``--max-tokens`` long;
2. starts ``transformers serve MODEL --continuous-batching`` and ``qtrap-proxy serve``
   in front of it (``kind: openai``, ``meter.kind: nvml`` on GPU 0, ledger in ``--work``);
3. polls NVML's total-energy counter in a separate process as fast as it can
   (``poll``), to see the counter's own update period and to have an independent
   energy reading for any time window;
4. sends the same streamed chat request (same prompt, same ``max_tokens``) alone, then
   as one of N identical concurrent requests (``--concurrency 8,32``), ``--repeats``
   times, waits for every request's final record (``GET /qtrap/v1/requests/{id}``
   until ``final: true``) and reads ``GET /qtrap/v1/energy`` at the end;
5. writes one JSON file (``--out``) with the counter period, conservation, every
   request's figures, and per-phase summaries (alone vs shared, J/token), and prints
   a summary.

For a check of the flow without a GPU, ``--backend sim --meter dcgm`` runs the same job
against qtrap_sim (its simulated counter is read over HTTP instead of NVML)::

    python3 bench/gpu/real_nvml.py run --backend sim --meter dcgm --out /tmp/real-nvml.json
    python3 bench/gpu/real_nvml.py run --shape tiny --serve-args='--device cpu' --meter null ...

Other subcommands (used by ``run`` as child processes): ``build`` writes the model,
``poll`` polls the energy counter until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gzip
import json
import math
import os
import platform
import re
import shlex
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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHAPES: dict[str, dict[str, Any]] = {
    # from the models' public config.json files
    "qwen3-0.6b": {
        "hidden": 1024,
        "inter": 3072,
        "layers": 28,
        "heads": 16,
        "kv_heads": 8,
        "head_dim": 128,
        "vocab": 151936,
        "tie": True,
    },
    "qwen3-8b": {
        "hidden": 4096,
        "inter": 12288,
        "layers": 36,
        "heads": 32,
        "kv_heads": 8,
        "head_dim": 128,
        "vocab": 151936,
        "tie": False,
    },
    "qwen3-32b": {
        "hidden": 5120,
        "inter": 25600,
        "layers": 64,
        "heads": 64,
        "kv_heads": 8,
        "head_dim": 128,
        "vocab": 151936,
        "tie": False,
    },
    "tiny": {  # for a check of the flow on a CPU
        "hidden": 64,
        "inter": 128,
        "layers": 2,
        "heads": 4,
        "kv_heads": 2,
        "head_dim": 16,
        "vocab": 1024,
        "tie": True,
    },
}
SPECIALS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0..3
EOS_ID = 3


# -- build -----------------------------------------------------------------------------------------
def write_tokenizer(vocab: int, out: Path) -> None:
    """A word-level tokenizer covering every id (``w<id>`` words after four specials) with a chat template,
    so that servers load it offline and every generated id decodes to one word."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + [f"w{i}" for i in range(vocab - len(SPECIALS))]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|> {{ m['content'] }} <|im_end|> {% endfor %}<|im_start|>"
    )
    fast.save_pretrained(out)


def qwen3_config(shape: str) -> Any:
    """transformers' Qwen3Config of a shape (public config.json values; EOS id 3, see SPECIALS)."""
    from transformers import Qwen3Config

    s = SHAPES[shape]
    return Qwen3Config(
        vocab_size=s["vocab"],
        hidden_size=s["hidden"],
        intermediate_size=s["inter"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        head_dim=s["head_dim"],
        max_position_embeddings=40960,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        bos_token_id=2,
        eos_token_id=EOS_ID,
        pad_token_id=1,
        tie_word_embeddings=s["tie"],
    )


def build_model(shape: str, out: Path) -> dict[str, Any]:
    import torch
    from transformers import Qwen3ForCausalLM

    s = SHAPES[shape]
    t0 = time.monotonic()
    write_tokenizer(s["vocab"], out)
    cfg = qwen3_config(shape)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg)
    model = model.to(torch.bfloat16)
    with torch.no_grad():  # EOS logit always 0: greedy decoding never picks it over 150k random logits
        model.get_input_embeddings().weight[EOS_ID].zero_()
        model.get_output_embeddings().weight[EOS_ID].zero_()
    model.generation_config.do_sample = False
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = 1
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    return {"shape": shape, "params": params, "device": device, "build_s": time.monotonic() - t0, **s}


# -- poll ------------------------------------------------------------------------------------------
_DCGM_RE = re.compile(r'^DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION\{[^}]*gpu="0"[^}]*\}\s+(\S+)', re.M)


def poll(out: Path, dcgm_url: str | None, sleep_s: float) -> None:
    """Read the energy counter (mJ) in a tight loop until SIGTERM; write its changes to ``out``."""
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if dcgm_url is None:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)

        def read() -> float:
            return float(pynvml.nvmlDeviceGetTotalEnergyConsumption(h))

        def power_w() -> float | None:
            return float(pynvml.nvmlDeviceGetPowerUsage(h)) / 1000.0
    else:
        url = dcgm_url

        def read() -> float:
            with urllib.request.urlopen(url, timeout=2) as r:
                m = _DCGM_RE.search(r.read().decode())
            if m is None:
                raise RuntimeError(f"no energy counter for gpu 0 at {url}")
            return float(m.group(1))

        def power_w() -> float | None:
            return None

    t_change: list[float] = []
    t_before: list[float] = []  # the poll before each change: the change happened in (t_before, t_change]
    value_mj: list[float] = []
    power: list[float | None] = []
    polls = 0
    last: float | None = None
    t_prev = time.monotonic()
    t_first = t_prev
    while not stop:
        v = read()
        t = time.monotonic()
        polls += 1
        if v != last:
            if last is None:
                out.with_suffix(".ready").touch()
            t_change.append(t)
            t_before.append(t_prev)
            value_mj.append(v)
            power.append(power_w())
            last = v
        t_prev = t
        if sleep_s > 0:
            time.sleep(sleep_s)
    out.write_text(
        json.dumps(
            {
                "source": "dcgm" if dcgm_url else "nvml",
                "polls": polls,
                "t_first": t_first,
                "t_last": t_prev,
                "t_change": t_change,
                "t_before": t_before,
                "value_mj": value_mj,
                "power_w": power,
            }
        )
    )


class Counter:
    """Cumulative energy (J) at any instant, interpolated linearly between the counter's updates."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.t: list[float] = data["t_change"]
        self.j: list[float] = [v / 1000.0 for v in data["value_mj"]]

    def at(self, t: float) -> float | None:
        import bisect

        ts = self.t
        if not ts or t < ts[0] or t > ts[-1]:
            return None
        i = bisect.bisect_right(ts, t)
        if i >= len(ts):
            return self.j[-1]
        t0, t1 = ts[i - 1], ts[i]
        return self.j[i - 1] + (self.j[i] - self.j[i - 1]) * (t - t0) / (t1 - t0)

    def window(self, t0: float, t1: float) -> float | None:
        a, b = self.at(t0), self.at(t1)
        return None if a is None or b is None else b - a


# -- load ------------------------------------------------------------------------------------------
async def _one(session: Any, url: str, body: dict[str, Any]) -> dict[str, Any]:
    t0 = time.monotonic()
    first: float | None = None
    chunks = 0
    usage: dict[str, Any] | None = None
    error: str | None = None
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        rid = r.headers.get("x-qtrap-request-id")
        if r.status != 200:
            error = f"HTTP {r.status}: {(await r.text())[:300]}"
        else:
            async for raw in r.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                obj = json.loads(data)
                if obj.get("error"):
                    error = json.dumps(obj["error"])[:300]
                if obj.get("usage"):
                    usage = obj["usage"]
                ch = obj.get("choices") or []
                if ch and (ch[0].get("delta") or {}).get("content"):
                    if first is None:
                        first = time.monotonic()
                    chunks += 1
    t1 = time.monotonic()
    return {
        "id": rid,
        "t_send": t0,
        "t_first": first,
        "t_done": t1,
        "client_chunks": chunks,
        "usage_completion_tokens": (usage or {}).get("completion_tokens"),
        "usage_prompt_tokens": (usage or {}).get("prompt_tokens"),
        "error": error,
    }


async def _final_record(session: Any, url: str, rid: str, timeout_s: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    rec: dict[str, Any] = {}
    while time.monotonic() < deadline:
        async with session.get(f"{url}/qtrap/v1/requests/{rid}") as r:
            if r.status == 200:
                rec = await r.json()
                if rec.get("final"):
                    return rec
        await asyncio.sleep(0.05)
    rec["final_timeout"] = True
    return rec


_KEEP = (
    "prompt_tokens",
    "completion_tokens",
    "ttft_s",
    "e2e_s",
    "chunks",
    "tokens_exact",
    "status",
    "final",
    "energy_j",
    "idle_energy_j",
    "j_per_token",
    "error_bound_j",
    "energy_null_reason",
)


async def run_batch(session: Any, url: str, body: dict[str, Any], n: int) -> list[dict[str, Any]]:
    sent = await asyncio.gather(*(_one(session, url, body) for _ in range(n)))
    recs = await asyncio.gather(*(_final_record(session, url, s["id"]) for s in sent if s["id"]))
    by_id = {r.get("id"): r for r in recs}
    out = []
    for s in sent:
        rec = by_id.get(s["id"], {})
        out.append({**s, **{k: rec.get(k) for k in _KEEP}, "final_timeout": rec.get("final_timeout", False)})
    return out


async def _get_json(session: Any, url: str) -> Any:
    async with session.get(url) as r:
        return await r.json()


# -- analysis --------------------------------------------------------------------------------------
def _stats(xs: list[float]) -> dict[str, float] | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return None
    s = sorted(xs)
    return {
        "n": len(s),
        "median": statistics.median(s),
        "min": s[0],
        "max": s[-1],
        "mean": statistics.fmean(s),
        "p10": s[int(0.1 * (len(s) - 1))],
        "p90": s[round(0.9 * (len(s) - 1))],
    }


RESOLVED_S = 0.006


def counter_period(data: dict[str, Any], busy: list[tuple[float, float]]) -> dict[str, Any]:
    t = data["t_change"]
    gaps = [(t[i - 1], t[i]) for i in range(2, len(t))]  # from the 2nd change: the 1st is the first read
    res = [t - b for t, b in zip(data["t_change"][1:], data["t_before"][1:], strict=True)]

    def is_busy(a: float, b: float) -> bool:
        return any(a < e and b > s for s, e in busy)

    ms = [1000 * (b - a) for a, b in gaps]
    # a slow read (NVML's takes milliseconds) sees a change late: that gap looks long and the next short;
    # gaps whose both ends were seen within RESOLVED_MS show the counter's own period
    resolved_ms = [
        1000 * (gaps[i][1] - gaps[i][0]) for i in range(len(gaps)) if max(res[i], res[i + 1]) < RESOLVED_S
    ]
    busy_ms = [1000 * (b - a) for a, b in gaps if is_busy(a, b)]
    idle_ms = [1000 * (b - a) for a, b in gaps if not is_busy(a, b)]
    steps = [
        data["value_mj"][i] - data["value_mj"][i - 1] for i in range(2, len(t))
    ]  # mJ per update (power x period)
    dur = data["t_last"] - data["t_first"]
    return {
        "source": data["source"],
        "polls": data["polls"],
        "poll_period_us": 1e6 * dur / max(1, data["polls"]),
        "change_resolution_ms": _stats([1000 * r for r in res]),
        "changes": len(t),
        "gap_ms": _stats(ms),
        "gap_ms_busy": _stats(busy_ms),
        "gap_ms_idle": _stats(idle_ms),
        "gap_ms_resolved": _stats(resolved_ms),
        "resolved_within_ms": 1000 * RESOLVED_S,
        "step_mj": _stats(steps),
    }


def summarise(rows: list[dict[str, Any]], counter: Counter | None, idle_w: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    levels = sorted({r["n"] for r in rows if not r["warmup"]})
    for n in levels:
        batches = [r for r in rows if r["n"] == n and not r["warmup"]]
        reqs = [q for b in batches for q in b["requests"]]
        ok = [q for q in reqs if q["energy_j"] is not None]
        per_batch = []
        for b in batches:
            e = [q["energy_j"] for q in b["requests"] if q["energy_j"] is not None]
            w = b.get("nvml_window_j")
            first = min(b["requests"], key=lambda q: q["t_send"])
            med = statistics.median(e) if e else None
            per_batch.append(
                {
                    "repeat": b["repeat"],
                    "attributed_sum_j": sum(e) if e else None,
                    "mean_j": statistics.fmean(e) if e else None,
                    "spread_max_over_min": (max(e) / min(e)) if e and min(e) > 0 else None,
                    "max_over_median": (max(e) / med) if med else None,
                    "first_sent_over_median": (first["energy_j"] / med)
                    if med and first["energy_j"]
                    else None,
                    "window_s": b["t_end"] - b["t_start"],
                    "nvml_window_j": w,
                    "attributed_over_window": (sum(e) / w) if e and w else None,
                    "nvml_window_above_idle_per_request_j": (
                        (w - idle_w * (b["t_end"] - b["t_start"])) / n if w and idle_w is not None else None
                    ),
                }
            )
        toks = [q["completion_tokens"] for q in reqs]
        out[str(n)] = {
            "concurrency": n,
            "repeats": len(batches),
            "requests": len(reqs),
            "completion_tokens": sorted(set(toks), key=lambda x: (x is None, x)),
            "prompt_tokens": sorted({q["prompt_tokens"] for q in reqs}, key=lambda x: (x is None, x)),
            "not_final": sum(1 for q in reqs if not q["final"]),
            "errors": sum(1 for q in reqs if q["error"]),
            "energy_j": _stats([q["energy_j"] for q in ok]),
            "j_per_token": _stats([q["j_per_token"] for q in ok if q["j_per_token"] is not None]),
            "error_bound_j": _stats([q["error_bound_j"] for q in ok if q["error_bound_j"] is not None]),
            "batch_mean_j": _stats([b["mean_j"] for b in per_batch if b["mean_j"] is not None]),
            "within_batch_max_over_median": _stats(
                [b["max_over_median"] for b in per_batch if b["max_over_median"] is not None]
            ),
            "within_batch_first_sent_over_median": _stats(
                [b["first_sent_over_median"] for b in per_batch if b["first_sent_over_median"] is not None]
            ),
            "within_batch_spread": _stats(
                [b["spread_max_over_min"] for b in per_batch if b["spread_max_over_min"] is not None]
            ),
            "attributed_over_nvml_window": _stats(
                [b["attributed_over_window"] for b in per_batch if b["attributed_over_window"] is not None]
            ),
            "nvml_above_idle_per_request_j": _stats(
                [
                    b["nvml_window_above_idle_per_request_j"]
                    for b in per_batch
                    if b["nvml_window_above_idle_per_request_j"] is not None
                ]
            ),
            "e2e_s": _stats([q["e2e_s"] for q in reqs if q["e2e_s"] is not None]),
            "ttft_s": _stats([q["ttft_s"] for q in reqs if q["ttft_s"] is not None]),
            "tokens_per_s_per_request": _stats(
                [q["completion_tokens"] / q["e2e_s"] for q in reqs if q["completion_tokens"] and q["e2e_s"]]
            ),
            "batches": per_batch,
        }
    alone = out.get("1")
    if alone and alone["energy_j"]:
        for n in levels:
            if n == 1 or not out[str(n)]["energy_j"]:
                continue
            s = out[str(n)]
            s["alone_over_shared_energy"] = alone["energy_j"]["median"] / s["energy_j"]["median"]
            if alone["nvml_above_idle_per_request_j"] and s["nvml_above_idle_per_request_j"]:
                s["alone_over_shared_above_idle"] = (
                    alone["nvml_above_idle_per_request_j"]["median"]
                    / s["nvml_above_idle_per_request_j"]["median"]
                )
    return out


def _rounded(x: Any) -> Any:
    if isinstance(x, float):
        return round(x, 6) if abs(x) >= 1 else float(f"{x:.7g}")
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


def write_json(path: Path, result: dict[str, Any]) -> None:
    """Compact JSON; floats to 6 decimals (timestamps keep microseconds), or 7 digits below 1."""
    path.write_text(json.dumps(_rounded(result), separators=(",", ":"), default=str) + "\n")


# -- run -------------------------------------------------------------------------------------------
def _serve_cmd(model_dir: Path, port: int, extra: list[str]) -> list[str]:
    base = [sys.executable, "-m", "transformers.cli.transformers", "serve"]
    return [
        *base,
        str(model_dir),
        "--continuous-batching",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra,
    ]


def run(args: argparse.Namespace) -> int:
    import yaml

    from qtrap_common.localproc import child, free_port, stop

    deadline = float(os.environ.get("QTRAP_DEADLINE_UNIX", "0")) or (time.time() + args.budget_s)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    logs = Path(args.logs or work)
    logs.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "bench": "real_nvml",
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": sys.version.split()[0],
        "args": vars(args),
    }
    out = Path(args.out)

    def save() -> None:
        write_json(out, result)

    def left() -> float:
        return deadline - time.time()

    env = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(work / "hf-home"),
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    versions: dict[str, str | None] = {}
    for mod in ("torch", "transformers", "pydantic", "starlette", "uvicorn", "aiohttp", "pynvml"):
        try:
            m = __import__(mod)
            versions[mod] = getattr(m, "__version__", "?")
        except Exception:
            versions[mod] = None
    result["versions"] = versions

    def _term(*_: object) -> None:  # `timeout` stops us: stop the servers, keep what was measured
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, _term)
    with ExitStack() as stack:
        backend_port, proxy_port = free_port(), free_port()
        if args.backend == "hf":
            model_dir = work / args.shape
            t0 = time.monotonic()
            built = subprocess.run(
                [sys.executable, str(HERE), "build", "--shape", args.shape, "--dir", str(model_dir)],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
            )
            (logs / f"build-{args.shape}.log").write_text(built.stdout + built.stderr)
            if built.returncode != 0:
                result["error"] = f"model build failed: {built.stderr[-2000:]}"
                save()
                print(result["error"], file=sys.stderr)
                return 1
            result["model"] = json.loads(built.stdout.strip().splitlines()[-1])
            result["model"]["build_wall_s"] = time.monotonic() - t0
            help_text = subprocess.run(
                [*_serve_cmd(model_dir, 0, [])[:4], "--help"],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
            ).stdout
            extra = shlex.split(args.serve_args)
            if "--dtype" in help_text and "--dtype" not in extra:
                extra += ["--dtype", "bfloat16"]
            cmd = _serve_cmd(model_dir, backend_port, extra)
            upstream_model, pool = str(model_dir), args.shape
        else:
            cmd = [sys.executable, "-m", "qtrap_sim", "--port", str(backend_port), "--model", args.shape]
            upstream_model, pool = args.shape, args.shape
        result["backend_cmd"] = cmd
        t0 = time.monotonic()
        stack.enter_context(
            child(
                cmd,
                f"http://127.0.0.1:{backend_port}/health",
                logs / f"backend-{args.shape}.log",
                timeout_s=args.start_timeout_s,
                env=env,
                cwd=ROOT,
            )
        )
        result["backend_start_s"] = time.monotonic() - t0
        print(f"backend up in {result['backend_start_s']:.1f} s", flush=True)

        meter: dict[str, Any] = {"kind": args.meter, "interval_s": args.meter_interval_s}
        dcgm_url = f"http://127.0.0.1:{backend_port}/dcgm/metrics"
        if args.meter == "dcgm":
            meter["urls"] = [dcgm_url]
        host = "qtrap-sim" if args.meter == "dcgm" else "localhost"
        cfg = {
            "server": {"host": "127.0.0.1", "port": proxy_port},
            "backends": [
                {
                    "name": f"{args.backend}-bf16",
                    "pool": pool,
                    "precision": "bf16",
                    "kind": "openai",
                    "url": f"http://127.0.0.1:{backend_port}",
                    "model": upstream_model,
                    "devices": [{"host": host, "index": 0}],
                    "health_path": "/health",
                    "timeouts": {"read_s": 300},
                }
            ],
            "meter": meter,
            "ledger": {"path": str(work / f"ledger-{args.shape}-{proxy_port}.sqlite")},
        }
        cfg_path = work / f"proxy-{args.shape}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))
        result["proxy_config"] = cfg

        poll_out = work / f"poll-{args.shape}.json"
        poll_out.unlink(missing_ok=True)
        poll_out.with_suffix(".ready").unlink(missing_ok=True)
        poll_cmd = [sys.executable, str(HERE), "poll", "--out", str(poll_out)]
        if args.meter == "dcgm":
            poll_cmd += ["--dcgm-url", dcgm_url]
        poller = None
        if args.meter != "null":
            poll_log = (logs / f"poll-{args.shape}.log").open("wb")
            stack.callback(poll_log.close)
            poller = subprocess.Popen(
                poll_cmd, stdout=poll_log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT
            )
            stack.callback(stop, poller, signal.SIGTERM, 15.0)
            ready = poll_out.with_suffix(".ready")
            t_end = time.monotonic() + 30
            while not ready.exists() and poller.poll() is None and time.monotonic() < t_end:
                time.sleep(0.02)
            if not ready.exists():
                raise RuntimeError(
                    f"the energy counter poller did not start; see {logs}/poll-{args.shape}.log"
                )

        result["proxy_start_t"] = time.monotonic()
        stack.enter_context(
            child(
                [
                    sys.executable,
                    "-m",
                    "qtrap_proxy",
                    "serve",
                    "--config",
                    str(cfg_path),
                    "--log-level",
                    "warning",
                ],
                f"http://127.0.0.1:{proxy_port}/v1/models",
                logs / f"proxy-{args.shape}.log",
                timeout_s=60,
                env=env,
                cwd=ROOT,
            )
        )
        url = f"http://127.0.0.1:{proxy_port}"
        try:
            asyncio.run(_load(args, url, pool, result, save, left))
        except (Exception, SystemExit) as e:  # keep what was measured
            result["error"] = f"{type(e).__name__}: {e}"
            print("load failed:", result["error"], file=sys.stderr)
        if poller is not None:
            time.sleep(0.3)  # a counter update after the proxy's last reading
            stop(poller, signal.SIGTERM, 15.0)

    # analysis (after the servers are stopped)
    data = json.loads(poll_out.read_text()) if args.meter != "null" and poll_out.exists() else None
    analyse(result, data)
    result["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    save()
    print_summary(result)
    return 0 if "error" not in result else 1


def analyse(result: dict[str, Any], data: dict[str, Any] | None) -> None:
    """Counter period, idle power, per-batch counter energy and the summaries, from the poller's data."""
    counter = None
    if data is not None:
        counter = Counter(data)
        busy = [(b["t_start"], b["t_end"]) for b in result.get("batches", [])]
        result["counter"] = counter_period(data, busy)
    idle = result.get("idle_window")
    idle_w = None
    if counter is not None and idle:
        w = counter.window(idle["t_start"], idle["t_end"])
        if w is not None:
            idle_w = w / (idle["t_end"] - idle["t_start"])
    result["idle_power_w_nvml"] = idle_w
    for b in result.get("batches", []):
        b["nvml_window_j"] = counter.window(b["t_start"], b["t_end"]) if counter else None
    result["summary"] = summarise(result.get("batches", []), counter, idle_w)
    energy = result.get("energy_report") or {}
    if counter is not None and energy and "energy_report_t" in result:
        # a loose check of the proxy's measured_j (which runs from its first reading to its last settled one)
        result["counter_delta_proxy_start_to_report_j"] = counter.window(
            result["proxy_start_t"], result["energy_report_t"]
        )


async def _load(
    args: argparse.Namespace, url: str, pool: str, result: dict[str, Any], save: Any, left: Any
) -> None:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        result["proxy_ready_t"] = time.monotonic()
        if args.meter != "null":  # wait for the meter's first updates
            t_end = time.monotonic() + 30
            while time.monotonic() < t_end:
                rep = await _get_json(session, url + "/qtrap/v1/energy")
                d = rep["devices"][0]
                if d["meter_up"] and d["updates"] >= 3:
                    break
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError(f"meter not up: {rep}")
        t0 = time.monotonic()
        await asyncio.sleep(args.idle_s)
        result["idle_window"] = {"t_start": t0, "t_end": time.monotonic()}

        prompt = " ".join(
            f"w{(i * 7919) % (SHAPES[args.shape]['vocab'] - 8) + 4}" for i in range(args.prompt_words)
        )
        if args.backend == "sim":
            prompt = " ".join(["word"] * args.prompt_words)
        body = {
            "model": pool,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": args.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        levels = [1, *[int(x) for x in args.concurrency.split(",") if x.strip()]]
        batches: list[dict[str, Any]] = result.setdefault("batches", [])

        async def batch(n: int, repeat: int, warmup: bool) -> dict[str, Any]:
            t_start = time.monotonic()
            reqs = await run_batch(session, url, body, n)
            t_end = max(q["t_done"] for q in reqs)
            b = {
                "n": n,
                "repeat": repeat,
                "warmup": warmup,
                "t_start": t_start,
                "t_end": t_end,
                "requests": reqs,
            }
            batches.append(b)
            e = [q["energy_j"] for q in reqs if q["energy_j"] is not None]
            toks = sorted({q["completion_tokens"] for q in reqs}, key=lambda x: (x is None, x))
            print(
                f"{'warmup' if warmup else 'repeat ' + str(repeat)} n={n}: {t_end - t_start:.2f} s, "
                f"tokens {toks}, energy/request "
                + (f"{statistics.fmean(e):.1f} J (min {min(e):.1f}, max {max(e):.1f})" if e else "n/a"),
                flush=True,
            )
            await asyncio.sleep(args.gap_s)
            return b

        for n in levels:  # warm-up: first batches of each size (kernels, allocations, graphs)
            await batch(n, 0, True)
        repeat_s: float | None = None
        for rep in range(1, args.repeats + 1):
            t_rep = time.monotonic()
            if left() < (repeat_s or 0.0) * 1.3 + 20:
                result["repeats_cut"] = f"stopped before repeat {rep}: {left():.0f} s left"
                print(result["repeats_cut"], flush=True)
                break
            for n in levels:
                await batch(n, rep, False)
            repeat_s = time.monotonic() - t_rep
            save()
        await asyncio.sleep(args.gap_s)
        result["energy_report"] = await _get_json(session, url + "/qtrap/v1/energy")
        result["energy_report_t"] = time.monotonic()
        async with session.get(url + "/metrics") as r:
            text = await r.text()
        result["metrics"] = [
            line
            for line in text.splitlines()
            if line.startswith(("qtrap_gpu_", "qtrap_energy_", "qtrap_meter_"))
        ]


def print_summary(result: dict[str, Any]) -> None:
    def f(x: Any, p: str = ".1f") -> str:
        return "n/a" if x is None else format(x, p)

    c = result.get("counter")
    if c and c["gap_ms"]:
        g = c["gap_ms"]
        print(
            f"counter ({c['source']}): {c['changes']} updates, gap median {g['median']:.1f} ms "
            f"min {g['min']:.1f} max {g['max']:.1f}; poll every {c['poll_period_us']:.0f} us"
        )
        for k in ("gap_ms_idle", "gap_ms_busy", "gap_ms_resolved"):
            if c[k]:
                print(
                    f"  {k}: n={c[k]['n']} median {c[k]['median']:.1f} min {c[k]['min']:.1f} max {c[k]['max']:.1f}"
                )
    print(f"idle power (counter over the idle window): {f(result.get('idle_power_w_nvml'))} W")
    for d in (result.get("energy_report") or {}).get("devices", []):
        print(
            f"device {d['device']}: measured {f(d['measured_j'])} J, attributed {f(d['attributed_j'])} J, "
            f"idle {f(d['idle_j'])} J, conservation error {f(d['conservation_error_ratio'], '.2e')}"
        )
    for n, s in (result.get("summary") or {}).items():
        e, jt = s["energy_j"], s["j_per_token"]
        if not e:
            print(f"n={n}: no energy figures")
            continue
        print(
            f"n={n}: {s['requests']} requests, tokens {s['completion_tokens']}, energy/request median "
            f"{e['median']:.1f} J [{e['min']:.1f}, {e['max']:.1f}], J/token median {jt['median']:.3f}, "
            f"attributed/counter window {f((s['attributed_over_nvml_window'] or {}).get('median'), '.4f')}, "
            f"alone/shared {f(s.get('alone_over_shared_energy'), '.2f')}"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write a random-weight Qwen3 model and tokenizer")
    b.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b")
    b.add_argument("--dir", required=True)
    p = sub.add_parser("poll", help="poll the energy counter until SIGTERM")
    p.add_argument("--out", required=True)
    p.add_argument("--dcgm-url", help="read a dcgm-exporter endpoint instead of NVML")
    p.add_argument("--sleep-s", type=float, default=0.0005)
    a = sub.add_parser("reanalyse", help="redo the analysis of a result file from its poller data")
    a.add_argument("--result", required=True, help="a result JSON written by run")
    a.add_argument(
        "--poll", required=True, help="the poller's JSON (poll-<shape>.json in the work folder; .gz read too)"
    )
    a.add_argument("--out", required=True)
    r = sub.add_parser("run", help="the whole job for one model")
    r.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b")
    r.add_argument("--backend", choices=["hf", "sim"], default="hf")
    r.add_argument("--meter", choices=["nvml", "dcgm", "null"], default="nvml")
    r.add_argument("--meter-interval-s", type=float, default=0.02)
    r.add_argument("--serve-args", default="", help="extra arguments for transformers serve")
    r.add_argument("--work", default="/tmp/qtrap-real")
    r.add_argument("--logs", help="where the servers' logs go (default: --work)")
    r.add_argument("--out", required=True)
    r.add_argument("--concurrency", default="8,32", help="shared levels (alone is always run)")
    r.add_argument("--repeats", type=int, default=5)
    r.add_argument("--max-tokens", type=int, default=128)
    r.add_argument("--prompt-words", type=int, default=200)
    r.add_argument("--idle-s", type=float, default=3.0)
    r.add_argument("--gap-s", type=float, default=1.0)
    r.add_argument("--start-timeout-s", type=float, default=300.0)
    r.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="stop starting repeats when this runs out (or QTRAP_DEADLINE_UNIX)",
    )
    args = ap.parse_args()
    if args.cmd == "build":
        info = build_model(args.shape, Path(args.dir))
        print(json.dumps(info))
        return 0
    if args.cmd == "poll":
        poll(Path(args.out), args.dcgm_url, args.sleep_s)
        return 0
    if args.cmd == "reanalyse":
        result = json.loads(Path(args.result).read_text())
        raw = Path(args.poll).read_bytes()
        analyse(result, json.loads(gzip.decompress(raw) if args.poll.endswith(".gz") else raw))
        write_json(Path(args.out), result)
        print_summary(result)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
