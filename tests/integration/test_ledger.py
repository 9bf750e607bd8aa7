"""The ledger survives a SIGKILL of the proxy, and a restarted proxy serves the old records."""

from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path

import pytest
import requests
import yaml

from qtrap_proxy.ledger import Ledger
from tests.helpers import BIN, backend, free_port, server, sim, stop


def test_sigkill_loses_no_final_record(tmp_path: Path) -> None:
    sim_port, port = free_port(), free_port()
    ledger = tmp_path / "ledger.sqlite"
    cfg = {
        "server": {"port": port},
        "ledger": {"path": str(ledger)},
        "backends": [backend("s", sim_port, devices=[{"host": "qtrap-sim", "index": 0}])],
        "meter": {"kind": "dcgm", "urls": [f"http://127.0.0.1:{sim_port}/dcgm/metrics"], "settle_s": 0.2},
    }
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [str(BIN / "qtrap-proxy"), "serve", "--config", str(tmp_path / "p.yaml")]
    url = f"http://127.0.0.1:{port}"
    with sim(sim_port, "--step-ms", "5"):
        with server(cmd, url + "/health") as proc:
            ids = []
            for i in range(12):
                r = requests.post(
                    url + "/v1/chat/completions",
                    timeout=30,
                    headers={"x-qtrap-chain-id": "c1", "x-qtrap-hop": str(i + 1)},
                    json={
                        "model": "qwen3-8b",
                        "max_tokens": 5,
                        "stream": i % 2 == 0,
                        "messages": [{"role": "user", "content": "hi"}],
                    },
                )
                ids.append(r.headers["x-qtrap-request-id"])
            deadline = time.monotonic() + 15
            finals: dict[str, dict[str, object]] = {}
            while len(finals) < len(ids):
                assert time.monotonic() < deadline, "records did not become final"
                for rid in ids:
                    rec = requests.get(f"{url}/qtrap/v1/requests/{rid}", timeout=5).json()
                    if rec["final"]:
                        finals[rid] = rec
                time.sleep(0.05)
            # one more request still in flight when the proxy dies: it may be lost, the finals may not
            requests.post(
                url + "/v1/chat/completions",
                timeout=30,
                json={"model": "qwen3-8b", "max_tokens": 3, "messages": [{"role": "user", "content": "x"}]},
            )
            stop(proc, signal.SIGKILL)
        with sqlite3.connect(ledger) as conn:
            stored = {row[0] for row in conn.execute("SELECT id FROM requests")}
        assert set(ids) <= stored
        with server(cmd, url + "/health"):
            for rid, before in finals.items():
                after = requests.get(f"{url}/qtrap/v1/requests/{rid}", timeout=5).json()
                assert after == before
            chain = requests.get(f"{url}/qtrap/v1/chains/c1", timeout=5).json()
            assert chain["requests"] == 12 and chain["final"]
            assert requests.get(f"{url}/qtrap/v1/requests/unknown-id", timeout=5).status_code == 404


def test_ledger_batches_and_prunes(tmp_path: Path) -> None:
    ledger = Ledger(str(tmp_path / "l.sqlite"), retention_days=1, batch_s=0.05)
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
    again = Ledger(str(tmp_path / "l.sqlite"), retention_days=1)
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
