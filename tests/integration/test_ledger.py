"""The ledger: batches, retention, a bad path, and faults of its writer (its SIGKILL case, under load, is
test_fault_matrix's `sigkill` cell)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from qtrap_proxy.ledger import Ledger
from tests.helpers import backend, free_port
from tests.integration import fake_backend
from tests.integration.inproc import running_proxy


def test_ledger_batches_and_prunes(ledger_args: dict[str, str]) -> None:
    ledger = Ledger(**ledger_args, retention_days=1, batch_s=0.05)
    durable: list[str] = []
    ledger.start(lambda recs: durable.extend(r["id"] for r in recs))
    now = time.time()
    for i in range(50):
        ledger.put({"id": f"r{i}", "chain_id": "c" if i % 2 else None, "hop": i, "start_unix_s": now})
    ledger.put({"id": "old", "start_unix_s": now - 3 * 86400})
    deadline = time.monotonic() + 5
    while len(durable) < 51:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert ledger.get("r7") == {"id": "r7", "chain_id": "c", "hop": 7, "start_unix_s": now}
    assert [r["id"] for r in ledger.chain("c")][:3] == ["r1", "r3", "r5"]
    ledger.close()
    # a new ledger on the same file prunes what is past retention on its first pass
    again = Ledger(**ledger_args, retention_days=1)
    again.start(lambda recs: None)
    deadline = time.monotonic() + 5
    while again.get("old") is not None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert again.count() == 50
    again.close()


def test_unwritable_ledger_path_is_a_config_error(tmp_path: Path) -> None:
    from qtrap_proxy.errors import ConfigError

    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"ledger\.path"):
        Ledger(str(tmp_path / "file" / "x.sqlite"))


def _metric(url: str, name: str) -> float:
    text = requests.get(url + "/metrics", timeout=5).text
    for line in text.splitlines():
        if line.rsplit(" ", 1)[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


def _final(url: str, rid: str, timeout_s: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        rec: dict[str, Any] = requests.get(f"{url}/qtrap/v1/requests/{rid}", timeout=5).json()
        if rec["final"]:
            return rec
        assert time.monotonic() < deadline, f"record {rid} did not become final"
        time.sleep(0.02)


def test_writer_faults_degrade_health_count_errors_and_lose_no_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13: a hop of 10**30 killed the writer; nothing noticed and every later record was lost."""
    fport = free_port()
    chat = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    with fake_backend.running(fport):
        cfg = {
            "backends": [
                backend("fake", fport, pool="echo", model="echo", kind="openai", health_path="/health")
            ]
        }
        with running_proxy(tmp_path, cfg) as p:
            url, ledger = p.url, p.proxy.ledger

            def post(hop: str) -> requests.Response:
                h = {"x-qtrap-chain-id": "faults", "x-qtrap-hop": hop}
                return requests.post(url + "/v1/chat/completions", json=chat, headers=h, timeout=30)

            first = post("1").headers["x-qtrap-request-id"]
            _final(url, first)
            health = requests.get(url + "/health", timeout=10)
            assert health.status_code == 200 and health.json()["status"] == "ok"
            assert health.json()["ledger"]["status"] == "ok" and _metric(url, "qtrap_ledger_up") == 1

            # an out-of-range hop is refused at the edge, so it never reaches SQLite
            assert post(str(10**30)).status_code == 400 and post("-1").status_code == 400

            # SQLite refuses every write: the proxy keeps serving, /health and the metrics say so
            def refuse(self: Ledger, conn: sqlite3.Connection, rows: list[Any]) -> None:
                raise sqlite3.OperationalError("disk I/O error (injected)")

            monkeypatch.setattr(Ledger, "_write", refuse)
            second = post("2")
            assert second.status_code == 200
            deadline = time.monotonic() + 10
            while (health := requests.get(url + "/health", timeout=10)).json()["ledger"][
                "status"
            ] != "degraded":
                assert time.monotonic() < deadline, "/health did not report the failing ledger"
                time.sleep(0.05)
            body = health.json()
            assert health.status_code == 200 and body["status"] == "degraded"  # degraded, still in service
            assert "disk I/O error" in body["ledger"]["reason"] and body["ledger"]["pending"] >= 1
            assert _metric(url, "qtrap_ledger_up") == 0
            assert _metric(url, 'qtrap_ledger_write_errors_total{kind="commit"}') >= 1
            rid2 = second.headers["x-qtrap-request-id"]
            assert requests.get(f"{url}/qtrap/v1/requests/{rid2}", timeout=5).json()["final"] is False

            # the fault goes away: the kept record is committed, the ledger recovers
            monkeypatch.undo()
            _final(url, rid2)
            body = requests.get(url + "/health", timeout=10).json()
            assert body["status"] == "ok" and body["ledger"]["status"] == "ok"
            assert _metric(url, "qtrap_ledger_up") == 1

            # the writer thread is killed by a fault nothing catches: it is restarted, nothing is lost
            kills = [SystemExit("injected")]
            real_write = Ledger._write

            def kill_once(self: Ledger, conn: sqlite3.Connection, rows: list[Any]) -> None:
                if kills:
                    raise kills.pop()
                real_write(self, conn, rows)

            monkeypatch.setattr(Ledger, "_write", kill_once)
            rid3 = post("3").headers["x-qtrap-request-id"]
            deadline = time.monotonic() + 10
            while ledger.write_errors["writer"] == 0:
                assert time.monotonic() < deadline, "the injected fault did not reach the writer"
                time.sleep(0.02)
            _final(url, rid3)  # a new writer was started at once and took the dead one's batch
            rid4 = post("4").headers["x-qtrap-request-id"]
            _final(url, rid4)
            assert (
                ledger.restarts == 1 and _metric(url, 'qtrap_ledger_write_errors_total{kind="writer"}') == 1
            )
            chain = requests.get(url + "/qtrap/v1/chains/faults", timeout=5).json()
            assert [h["index"] for h in chain["hops"]] == [1, 2, 3, 4] and chain["final"]
            assert ledger.count() >= 4
