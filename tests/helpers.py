"""Start real servers (as child processes) on loopback for tests."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
import yaml

from qtrap_common.localproc import child, free_port, stop

__all__ = ["free_port", "stop"]

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@contextlib.contextmanager
def server(
    cmd: list[str], ready_url: str, timeout_s: float = 60.0, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    log = Path(tempfile.mkdtemp(prefix="qtrap-test-")) / "server.log"
    with child(cmd, ready_url, log, timeout_s, env, cwd=ROOT) as proc:
        yield proc


def sim(port: int, *extra: str) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    cmd = [str(BIN / "qtrap-sim"), "--port", str(port), *extra]
    return server(cmd, f"http://127.0.0.1:{port}/health")


def proxy(tmp: Path, config: dict[str, Any]) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    port = config.setdefault("server", {}).setdefault("port", free_port())
    config.setdefault("ledger", {}).setdefault("path", str(tmp / f"ledger-{port}.sqlite"))
    path = tmp / f"proxy-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [str(BIN / "qtrap-proxy"), "serve", "--config", str(path), "--log-level", "warning"]
    return server(cmd, f"http://127.0.0.1:{port}/v1/models")


def backend(
    name: str,
    port: int,
    precision: str = "bf16",
    pool: str = "qwen3-8b",
    kind: str = "vllm",
    model: str = "qwen3-8b",
    **extra: Any,
) -> dict[str, Any]:
    return {
        "name": name,
        "pool": pool,
        "precision": precision,
        "kind": kind,
        "url": f"http://127.0.0.1:{port}",
        "model": model,
        **extra,
    }


def running_requests(sim_port: int) -> float:
    text = requests.get(f"http://127.0.0.1:{sim_port}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith("vllm:num_requests_running"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("vllm:num_requests_running not exported")


# one backend on one device (host "h", index 0) that is never contacted: for tests of the proxy's internals
ONE_BACKEND: list[dict[str, Any]] = [
    {
        "name": "b",
        "pool": "p",
        "precision": "bf16",
        "url": "http://127.0.0.1:9",
        "model": "m",
        "devices": [{"host": "h", "index": 0}],
    }
]


def wait_meter(url: str, timeout_s: float = 15.0, headers: dict[str, str] | None = None) -> None:
    """Until every device's counter has moved twice (energy before the first reading is unknown)."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = requests.get(url + "/qtrap/v1/energy", headers=headers or {}, timeout=5)
        assert r.status_code == 200, r.text
        if all(d["meter_up"] and d["updates"] >= 2 for d in r.json()["devices"]):
            return
        assert time.monotonic() < deadline, "meter never came up"
        time.sleep(0.05)
