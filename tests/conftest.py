from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import backend, free_port, proxy, sim
from tests.pg import PgServer, pg_server


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


@pytest.fixture(scope="session")
def pg() -> Iterator[PgServer]:
    """A PostgreSQL server for the session (tests/pg.py); each test makes its own database in it."""
    with pg_server() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_kind(request: pytest.FixtureRequest) -> str:
    """The ledger's database: tests taking this run on SQLite and on PostgreSQL."""
    kind: str = request.param
    return kind


@pytest.fixture
def ledger_args(ledger_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> dict[str, str]:
    """Ledger(**ledger_args, ...): a fresh ledger of ``ledger_kind`` (a new database in PostgreSQL)."""
    if ledger_kind == "sqlite":
        return {"path": str(tmp_path / "l.sqlite")}
    server: PgServer = request.getfixturevalue("pg")
    return {"path": str(tmp_path / "unused.sqlite"), "url": server.url(server.create_db())}
