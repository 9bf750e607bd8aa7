"""Running one or several simulated backends in one process."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import uvicorn
import yaml
from prometheus_client import disable_created_metrics
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette

from qtrap_sim.backend import SimBackend, SimBackendConfig
from qtrap_sim.tgi_api import create_tgi_app
from qtrap_sim.vllm_api import create_vllm_app

log = logging.getLogger("qtrap.sim")


class SimConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    backends: list[SimBackendConfig] = Field(min_length=1)


class SimConfigError(Exception):
    pass


def load_sim_config(path: str | Path) -> SimConfig:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise SimConfigError(f"cannot read {path}: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise SimConfigError(f"{path}: not valid YAML: {e}") from e
    try:
        cfg = SimConfig.model_validate(data or {})
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise SimConfigError(f"{path}: {loc}: {err['msg']}") from e
    for i, b in enumerate(cfg.backends):
        if "gpu_index" not in b.model_fields_set:
            b.gpu_index = i  # one simulated GPU per backend
    ports = [b.port for b in cfg.backends if b.port]
    if len(ports) != len(set(ports)):
        raise SimConfigError(f"{path}: two backends share a port")
    return cfg


def create_app(backend: SimBackend) -> Starlette:
    return create_vllm_app(backend) if backend.cfg.api == "vllm" else create_tgi_app(backend)


async def serve_all(configs: list[SimBackendConfig], log_level: str = "warning") -> None:
    disable_created_metrics()  # type: ignore[no-untyped-call]
    servers = []
    for c in configs:
        backend = SimBackend(c)
        ucfg = uvicorn.Config(
            create_app(backend),
            host=c.host,
            port=c.port,
            log_level=log_level,
            access_log=False,
            backlog=4096,
            timeout_keep_alive=75,
        )
        servers.append(uvicorn.Server(ucfg))
        log.warning(
            "qtrap-sim %s (%s API, %s at %s on a simulated %s) on http://%s:%d",
            c.display_name,
            c.api,
            c.served_name,
            c.precision,
            c.gpu,
            c.host,
            c.port,
        )
    await asyncio.gather(*(s.serve() for s in servers))
