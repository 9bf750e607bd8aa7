"""Start real servers (as child processes) on loopback for tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
_LOGS: dict[int, str] = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes] | None, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"server exited with {proc.returncode} before {url} answered:\n{_log_tail(proc)}"
            )
        try:
            if requests.get(url, timeout=1).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


@contextlib.contextmanager
def server(
    cmd: list[str], ready_url: str, timeout_s: float = 60.0, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    log = tempfile.NamedTemporaryFile(prefix="qtrap-test-", suffix=".log", delete=False)  # noqa: SIM115
    with log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    _LOGS[proc.pid] = log.name
    try:
        wait_http(ready_url, proc, timeout_s)
        yield proc
    finally:
        stop(proc)


def _log_tail(proc: subprocess.Popen[bytes], n: int = 3000) -> str:
    path = _LOGS.get(proc.pid)
    return Path(path).read_text(errors="replace")[-n:] if path else ""


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def sim(port: int, *extra: str) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    cmd = [str(BIN / "qtrap-sim"), "--port", str(port), *extra]
    return server(cmd, f"http://127.0.0.1:{port}/health")


def proxy(tmp: Path, config: dict[str, Any]) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    port = config.setdefault("server", {}).setdefault("port", free_port())
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
