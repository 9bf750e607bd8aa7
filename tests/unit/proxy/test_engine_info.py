"""What a backend says it runs (probes.engine_info, GET /qtrap/v1/backends), against scripted answers of
vLLM 0.26's `/version` and `/v1/models`, TGI's `/info`, the simulator's, and backends that do not answer;
and the GPU names the meters read."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

from qtrap_proxy.config import BackendConfig, Timeouts
from qtrap_proxy.energy.meters import DcgmMeter, NvmlMeter
from qtrap_proxy.probes import engine_info
from qtrap_proxy.transport import UpstreamResponse
from qtrap_proxy.upstream import Backend
from tests.unit.proxy.energy.test_meters import FakeNVML
from tests.unit.proxy.mock_transport import MockTransport, Script

JSON = [(b"content-type", b"application/json")]


class ByPath(MockTransport):
    """Answers each path with its own script; unknown paths get 404."""

    def __init__(self, scripts: Mapping[str, Script]) -> None:
        super().__init__("b", Script(status=404, headers=JSON, chunks=[b'{"detail":"Not Found"}']))
        self.by_path = dict(scripts)

    async def send(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes | None = None,
        *,
        timeouts: Timeouts | None = None,
    ) -> UpstreamResponse:
        self.script = self.by_path.get(path, self.script)
        return await super().send(method, path, headers, body, timeouts=timeouts)


def _ok(doc: Any) -> Script:
    return Script(headers=JSON, chunks=[json.dumps(doc).encode()])


def _backend(kind: str, transport: MockTransport) -> Backend:
    cfg = BackendConfig.model_validate(
        {
            "name": "b",
            "pool": "p",
            "precision": "bf16",
            "kind": kind,
            "url": "http://x:1",
            "model": "Qwen/Qwen3-8B",
        }
    )
    return Backend(cfg, transport)


def test_vllm_version_and_model_length() -> None:
    t = ByPath(
        {
            "/version": _ok({"version": "0.26.0"}),
            "/v1/models": _ok(
                {
                    "data": [
                        {"id": "other"},
                        {"id": "Qwen/Qwen3-8B", "root": "Qwen/Qwen3-8B", "max_model_len": 40960},
                    ]
                }
            ),
        }
    )
    info = asyncio.run(engine_info(_backend("vllm", t), 1.0))
    assert info == {
        "engine": "vLLM",
        "engine_version": "0.26.0",
        "simulated": False,
        "served_model": "Qwen/Qwen3-8B",
        "max_model_len": 40960,
        "dtype": None,
        "engine_error": None,
    }
    assert {s.path for s in t.sent} == {"/version", "/v1/models"}


def test_tgi_info() -> None:
    doc = {"version": "3.3.4", "model_id": "Qwen/Qwen3-8B", "model_dtype": "torch.bfloat16", "max_total_tokens": 4096,
           "router": "text-generation-router"}  # fmt: skip
    info = asyncio.run(engine_info(_backend("tgi", ByPath({"/info": _ok(doc)})), 1.0))
    assert (info["engine"], info["engine_version"], info["dtype"]) == ("TGI", "3.3.4", "torch.bfloat16")
    assert info["max_model_len"] == 4096 and info["simulated"] is False and info["engine_error"] is None


def test_the_simulator_says_it_is_simulated() -> None:
    t = ByPath({"/version": _ok({"version": "0.1.0", "engine": "qtrap-sim", "simulated": True})})
    info = asyncio.run(engine_info(_backend("vllm", t), 1.0))
    assert info["engine"] == "qtrap-sim (simulated)" and info["simulated"] is True
    assert info["engine_version"] == "0.1.0"
    t = ByPath({"/info": _ok({"version": "0.1.0", "model_id": "qwen3-8b", "simulated": True})})
    assert asyncio.run(engine_info(_backend("tgi", t), 1.0))["engine"] == "qtrap-sim (simulated)"


def test_no_version_or_no_answer_is_null_with_a_reason() -> None:
    info = asyncio.run(engine_info(_backend("openai", ByPath({})), 1.0))
    assert info["engine"] == "OpenAI-compatible" and info["engine_version"] is None
    assert info["engine_error"] == "GET /version: HTTP 404"
    dead = MockTransport("b", Script(head=ConnectionRefusedError("refused")))
    info = asyncio.run(engine_info(_backend("vllm", dead), 1.0))
    assert info["engine_version"] is None and info["served_model"] is None
    assert info["engine_error"] and "refused" in info["engine_error"]


def test_meters_read_gpu_names() -> None:
    class Named(FakeNVML):
        def nvmlDeviceGetName(self, h: Any) -> bytes:
            return b"NVIDIA H100 80GB HBM3"

    assert NvmlMeter({"h:0": 0}, nvml=Named([0])).names == {"h:0": "NVIDIA H100 80GB HBM3"}
    assert NvmlMeter({"h:0": 0}, nvml=FakeNVML([0])).names == {}  # no name: no harm

    text = (
        "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter\n"
        'DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{gpu="1",modelName="NVIDIA H200",Hostname="n1"} 5000\n'
    )
    m = DcgmMeter(["http://exporter/metrics"])

    class Resp:
        status = 200

        async def text(self) -> str:
            return text

        async def __aenter__(self) -> Resp:
            return self

        async def __aexit__(self, *a: object) -> None:
            return None

    class Session:
        def get(self, url: str) -> Resp:
            return Resp()

    m._session = Session()  # type: ignore[assignment]
    assert asyncio.run(m._scrape("http://exporter/metrics")) == {"n1:1": 5.0}
    assert m.names == {"n1:1": "NVIDIA H200"}
