"""The embedded default: simulated backends of one calibrated model and a qtrap proxy, as child processes.

One qtrap_sim process serves the model at each precision on its own simulated
H200 (vLLM's API; step time and power calibrated to real vLLM 0.26 serving on an
H200, docs/results/h200-vllm-2026-12-05; dcgm-exporter energy counters);
a qtrap-proxy in front of them meters those counters with its DCGM meter and
writes the ledger. Everything binds to 127.0.0.1 and is stopped on exit.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from qtrap_common.localproc import child, free_port

PRECISIONS = ("bf16", "fp8", "int8", "int4")  # on the H200 profile: CUTLASS FP8, CUTLASS W8A8, Machete W4A16
GPU = "h200"  # the simulator's profile calibrated to real vLLM serving
MODELS = ("qwen3-8b", "qwen3-0.6b", "qwen3-32b")  # the shapes the H200 profile has
THINK_TOKENS = 32  # mean <think> words before each simulated answer, as a reasoning model writes


@dataclass(frozen=True, slots=True)
class Stack:
    url: str  # the proxy
    workdir: Path
    sim_urls: dict[str, str]


def configs(
    model: str,
    precisions: tuple[str, ...],
    workdir: Path,
    oracle_data: list[str],
    think_tokens: int = 0,
    token_counters: bool = False,
    gpu: str = GPU,
    pool_options: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, int], int]:
    ports = {p: free_port() for p in precisions}
    proxy_port = free_port()
    sim = {
        "backends": [
            {
                "name": f"{model}-{p}",
                "model": model,
                "precision": p,
                "gpu": gpu,
                "port": port,
                "oracle_data": oracle_data,
                "think_tokens": think_tokens,
            }
            for p, port in ports.items()
        ]
    }
    proxy = {
        "server": {"host": "127.0.0.1", "port": proxy_port},
        "ledger": {"path": str(workdir / "ledger.sqlite")},
        "backends": [
            {
                "name": f"sim-{p}",
                "pool": model,
                "precision": p,
                "kind": "vllm",
                "url": f"http://127.0.0.1:{port}",
                "model": model,
                "devices": [{"host": "qtrap-sim", "index": i}],
                "token_counters": token_counters,
            }
            for i, (p, port) in enumerate(ports.items())
        ],
        "pools": {model: {"default_precision": precisions[0], **(pool_options or {})}},
        "meter": {
            "kind": "dcgm",
            "urls": [f"http://127.0.0.1:{port}/dcgm/metrics" for port in ports.values()],
            "settle_s": 1.0,
        },
    }
    return sim, proxy, ports, proxy_port


@contextmanager
def embedded_stack(
    model: str = "qwen3-8b",
    precisions: tuple[str, ...] = PRECISIONS,
    oracle_data: list[str] | None = None,
    workdir: Path | None = None,
    think_tokens: int = THINK_TOKENS,
    token_counters: bool = False,
    gpu: str = GPU,
    pool_options: dict[str, Any] | None = None,
    proxy_options: dict[str, Any] | None = None,
) -> Iterator[Stack]:
    """Start the simulated fleet and the proxy; stop both when the block ends. ``token_counters``: the proxy
    reads the simulated backends' token counters (as replicas sharing backends do); ``gpu``: the simulator's
    profile (``h200``: calibrated to real vLLM serving; ``h100``: the 2026-11 kernel probe, whose fused INT4
    what-if crosses BF16 at low load); ``pool_options``: more keys of the pool's entry in the proxy's config
    (compare-routing's ``routing: cost``); ``proxy_options``: more top-level keys of the proxy's config
    (``carbon``, ``pricing``, ...)."""
    if model not in MODELS:
        raise ValueError(
            f"the embedded default simulates {', '.join(MODELS)}, not {model!r}; use --proxy URL"
        )
    work = workdir or Path(tempfile.mkdtemp(prefix="qtrap-loadgen-"))
    sim_cfg, proxy_cfg, ports, proxy_port = configs(
        model, precisions, work, oracle_data or [], think_tokens, token_counters, gpu, pool_options
    )
    (work / "sim.yaml").write_text(yaml.safe_dump(sim_cfg))
    proxy_cfg.update(proxy_options or {})
    (work / "proxy.yaml").write_text(yaml.safe_dump(proxy_cfg))
    url = f"http://127.0.0.1:{proxy_port}"
    last = precisions[-1]
    with ExitStack() as stack:
        stack.enter_context(
            child(
                [sys.executable, "-m", "qtrap_sim", "--config", str(work / "sim.yaml")],
                f"http://127.0.0.1:{ports[last]}/health",
                work / "sim.log",
            )
        )
        stack.enter_context(
            child(
                [
                    sys.executable,
                    "-m",
                    "qtrap_proxy",
                    "serve",
                    "--config",
                    str(work / "proxy.yaml"),
                    "--log-level",
                    "warning",
                ],
                url + "/health",
                work / "proxy.log",
            )
        )
        yield Stack(url, work, {p: f"http://127.0.0.1:{port}" for p, port in ports.items()})
