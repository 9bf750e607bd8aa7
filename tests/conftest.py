from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import backend, free_port, proxy, sim


@dataclass
class Fleet:
    proxy_url: str
    bf16_port: int
    int4_port: int
    tgi_port: int

    @property
    def v1(self) -> str:
        return self.proxy_url + "/v1"


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Three qtrap_sim backends (vLLM bf16 and int4, TGI int8) of one pool behind a real proxy process."""
    tmp: Path = tmp_path_factory.mktemp("fleet")
    p16, p4, ptgi = free_port(), free_port(), free_port()
    common = ["--model", "qwen3-8b", "--step-ms", "2"]
    with (
        sim(p16, *common, "--precision", "bf16"),
        sim(p4, *common, "--precision", "int4"),
        sim(ptgi, *common, "--precision", "int8", "--api", "tgi"),
    ):
        cfg = {
            "backends": [
                backend("sim-bf16", p16, "bf16", model="qwen3-8b"),
                backend("sim-int4", p4, "int4", model="qwen3-8b"),
                backend("sim-tgi-int8", ptgi, "int8", kind="tgi", model="qwen3-8b"),
            ],
            "pools": {"qwen3-8b": {"default_precision": "bf16"}},
        }
        with proxy(tmp, cfg):
            yield Fleet(f"http://127.0.0.1:{cfg['server']['port']}", p16, p4, ptgi)
