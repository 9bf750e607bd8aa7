"""A real OpenAI-compatible server (HF `transformers serve`, CPU, tiny random model) behind the proxy."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests

from tests.helpers import BIN, backend, free_port, proxy, server

pytest.importorskip("transformers")

pytestmark = pytest.mark.slow  # a real `transformers serve`


@pytest.fixture(scope="module")
def hf_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    tmp = tmp_path_factory.mktemp("hf")
    model_dir = tmp / "tiny-qwen3"
    env = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HOME": str(tmp / "hf-home"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; "
            "from tests.integration.tiny_hf_model import write_tiny_qwen3; write_tiny_qwen3(Path(sys.argv[1]))",
            str(model_dir),
        ],
        check=True,
        env={**os.environ, **env},
        capture_output=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    port = free_port()
    cmd = [
        str(BIN / "transformers"),
        "serve",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
    ]
    with server(cmd, f"http://127.0.0.1:{port}/health", timeout_s=180, env=env):
        cfg = {
            "backends": [
                backend(
                    "hf-bf16",
                    port,
                    pool="tiny",
                    kind="openai",
                    model=str(model_dir),
                    health_path="/health",
                    timeouts={"read_s": 120},
                )
            ]
        }
        with proxy(tmp, cfg):
            yield f"http://127.0.0.1:{cfg['server']['port']}", str(model_dir)  # type: ignore[index]


def _record(url: str, rid: str) -> dict[str, object]:
    return requests.get(f"{url}/qtrap/v1/requests/{rid}", timeout=5).json()  # type: ignore[no-any-return]


def test_non_streaming_chat(hf_proxy: tuple[str, str]) -> None:
    url, _ = hf_proxy
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "w1 w2 w3"}], max_tokens=5
    )
    resp = raw.parse()
    assert resp.usage is not None and resp.usage.completion_tokens == 5
    assert resp.choices[0].message.content is not None
    rec = _record(url, raw.headers["x-qtrap-request-id"])
    assert rec["status"] == "ok" and rec["completion_tokens"] == 5
    assert rec["prompt_tokens"] == resp.usage.prompt_tokens


def test_streaming_chat_through_proxy(hf_proxy: tuple[str, str]) -> None:
    url, model_dir = hf_proxy
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    # the upstream model id works too: clients need not change the model name
    with client.chat.completions.with_streaming_response.create(
        model=model_dir, messages=[{"role": "user", "content": "w4 w5"}], max_tokens=6, stream=True
    ) as r:
        rid = r.headers["x-qtrap-request-id"]
        chunks = list(r.parse())
    assert chunks and all(c.usage is None for c in chunks)  # the injected usage was stripped
    assert any(c.choices and c.choices[0].finish_reason == "length" for c in chunks)
    rec = _record(url, rid)
    assert rec["status"] == "ok" and rec["completion_tokens"] == 6 and rec["prompt_tokens"]
    assert rec["chunks"] >= 1 and not rec["tokens_exact"]  # per-chunk counts are estimates for this server

    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "w6"}],
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and usage[0].completion_tokens == 4
