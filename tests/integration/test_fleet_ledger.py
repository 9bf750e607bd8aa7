"""The fleet ledger (``ledger.url``): proxies writing one PostgreSQL ledger (tests/pg.py's real server).

Its schema applied once by replicas starting together; its password from the environment and never in an
error or a log line; a database that cannot be reached at start; two proxies writing concurrently with no
record lost or duplicated, each reading the other's; and a database restart while requests are served,
which loses no final record. (The queries giving the same answers as SQLite's: the ledger's tests, which
run on both.)"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests
import yaml

from qtrap_proxy import ledger_pg
from qtrap_proxy.cli import main
from qtrap_proxy.config import load_config
from qtrap_proxy.errors import ConfigError, LedgerUnavailable
from qtrap_proxy.ledger import Ledger
from tests.helpers import backend, free_port
from tests.integration import fake_backend
from tests.integration.inproc import running_proxy
from tests.pg import PASSWORD, PgServer, pg_server

CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}


def _wait(cond: Any, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql).fetchall()  # type: ignore[arg-type]


def _config(fport: int, url: str, **ledger: Any) -> dict[str, Any]:
    return {
        "backends": [backend("fake", fport, pool="echo", model="echo", kind="openai", health_path="/health")],
        "ledger": {"url": url, "batch_s": 0.01, **ledger},
    }


def _post(url: str, chain: str, hop: int) -> str:
    h = {"x-qtrap-chain-id": chain, "x-qtrap-hop": str(hop)}
    r = requests.post(url + "/v1/chat/completions", json=CHAT, headers=h, timeout=30)
    assert r.status_code == 200, r.text
    return r.headers["x-qtrap-request-id"]


def _is_final(url: str, rid: str) -> bool:
    r = requests.get(f"{url}/qtrap/v1/requests/{rid}", timeout=10)
    return r.status_code == 200 and r.json()["final"] is True


def test_replicas_starting_together_apply_each_migration_once(
    pg: PgServer, caplog: pytest.LogCaptureFixture
) -> None:
    url = pg.url(pg.create_db())
    start = threading.Barrier(6)

    def migrate() -> int:
        target = ledger_pg.PgTarget(url)
        start.wait()
        return target.migrate()

    with ThreadPoolExecutor(6) as pool:
        versions = list(pool.map(lambda _: migrate(), range(6)))
    assert versions == [ledger_pg.LATEST] * 6
    applied = _rows(url, f"SELECT version FROM {ledger_pg.MIGRATIONS_TABLE} ORDER BY version")
    assert applied == [(v,) for v, _, _ in ledger_pg.MIGRATIONS]
    columns = {r[0] for r in _rows(url, f"SELECT column_name FROM information_schema.columns "
                                         f"WHERE table_name = '{ledger_pg.TABLE}'")}  # fmt: skip
    assert {"id", "record", "key_id", "client_request_id", *ledger_pg.FACETS} <= columns
    indexes = {
        r[0] for r in _rows(url, f"SELECT indexname FROM pg_indexes WHERE tablename = '{ledger_pg.TABLE}'")
    }
    assert {f"{ledger_pg.TABLE}_start_id", f"{ledger_pg.TABLE}_key", f"{ledger_pg.TABLE}_chain"} <= indexes

    # a database a newer qtrap migrated (a rolling upgrade): used as it is, with a warning
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"INSERT INTO {ledger_pg.MIGRATIONS_TABLE} VALUES (999, 'from the future', 0)")
    with caplog.at_level(logging.WARNING, "qtrap.ledger"):
        led = Ledger("unused", url=url, batch_s=0.01)
    assert "schema version 999 is newer" in caplog.text
    done: list[str] = []
    led.start(lambda recs: done.extend(r["id"] for r in recs))
    led.put({"id": "r1", "start_unix_s": 1e9})
    _wait(lambda: done == ["r1"], "a record was not written to the newer schema")
    led.close()


def test_a_user_without_create_writes_and_reads_a_ledger_already_migrated(pg: PgServer) -> None:
    """The README's privileges: CREATE for the first start only; then the table's DML and reading the
    migrations table are enough."""
    db = pg.create_db()
    Ledger("unused", url=pg.url(db)).close()  # the owner's first start creates the schema
    with psycopg.connect(pg.url(db), autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS qtrap_writer")
        conn.execute("CREATE ROLE qtrap_writer LOGIN PASSWORD 'writer-pw'")
        conn.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        conn.execute(f"GRANT SELECT ON {ledger_pg.MIGRATIONS_TABLE} TO qtrap_writer")
        conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {ledger_pg.TABLE} TO qtrap_writer")
    url = f"postgresql://qtrap_writer:writer-pw@127.0.0.1:{pg.port}/{db}"
    led = Ledger("unused", url=url, retention_days=1, batch_s=0.01)
    done: list[str] = []
    led.start(lambda recs: done.extend(r["id"] for r in recs))
    led.put({"id": "r1", "start_unix_s": time.time(), "chain_id": "c", "hop": 1})
    _wait(lambda: done == ["r1"], "the restricted user's record was not written")
    assert [r["id"] for r in led.chain("c")] == ["r1"] and led.state()["status"] == "ok"
    led.close()
    with psycopg.connect(pg.url(db), autocommit=True) as conn:  # the session's server is shared
        conn.execute(f"REVOKE ALL ON {ledger_pg.TABLE}, {ledger_pg.MIGRATIONS_TABLE} FROM qtrap_writer")
        conn.execute("DROP ROLE qtrap_writer")


def test_the_password_comes_from_the_environment_and_never_shows(
    pg: PgServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    db = pg.create_db()
    bare = pg.url(db, password=False)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("MY_LEDGER_PW", PASSWORD)
    cfg = load_config(data=_config(free_port(), bare, password_env="MY_LEDGER_PW"))
    assert cfg.ledger.url == bare and cfg.ledger.password_env == "MY_LEDGER_PW"
    led = Ledger("unused", url=bare, password_env="MY_LEDGER_PW")
    assert led.backend == "postgresql" and led.count() == 0
    led.close()

    # check-config names the ledger without its password
    conf = tmp_path / "proxy.yaml"
    conf.write_text(yaml.safe_dump(_config(free_port(), pg.url(db))))
    assert main(["check-config", "--config", str(conf)]) == 0
    out = capsys.readouterr().out
    assert (
        f"ledger: PostgreSQL postgresql://qtrap:***@127.0.0.1:{pg.port}/{db}" in out and PASSWORD not in out
    )

    # a URL that is not PostgreSQL's, or a bad variable name: config errors naming the key
    with pytest.raises(ConfigError, match=r"ledger\.url: must be a postgresql:// URL"):
        load_config(data=_config(free_port(), "http://x"))
    with pytest.raises(ConfigError, match=r"ledger\.password_env"):
        load_config(data=_config(free_port(), bare, password_env="not a name"))
    # QTRAP_LEDGER__URL overrides the file, as every key
    monkeypatch.setenv("QTRAP_LEDGER__URL", pg.url(db))
    assert load_config(data=_config(free_port(), bare)).ledger.url == pg.url(db)
    assert ledger_pg.redact(pg.url(db)) == f"postgresql://qtrap:***@127.0.0.1:{pg.port}/{db}"
    assert PASSWORD not in ledger_pg.redact(f"postgresql://u@h/d?password={PASSWORD}&sslmode=disable")

    # a wrong password: the proxy starts, keeps its records, says why in /health's words, never the password
    monkeypatch.setenv("MY_LEDGER_PW", "wrong-" + PASSWORD)
    with caplog.at_level(logging.INFO):
        led = Ledger("unused", url=bare, password_env="MY_LEDGER_PW", batch_s=0.01)
        led.start(lambda recs: None)
        led.put({"id": "kept", "start_unix_s": 1e9})
        _wait(lambda: led.state()["status"] == "degraded", "the failing ledger was not reported")
        state = led.state()
        assert "password authentication failed" in state["reason"] and state["pending"] == 1
        with pytest.raises(LedgerUnavailable) as e:
            led.get("kept")
        assert e.value.status == 503
        led.close()
    assert PASSWORD not in caplog.text and PASSWORD not in str(state) and PASSWORD not in e.value.message


def test_two_proxies_write_one_ledger_concurrently_without_losing_or_duplicating(
    pg: PgServer, tmp_path: Path
) -> None:
    url = pg.url(pg.create_db())
    fport = free_port()
    per_proxy = 40
    with (
        fake_backend.running(fport),
        running_proxy(tmp_path / "a", _config(fport, url)) as a,
        running_proxy(tmp_path / "b", _config(fport, url)) as b,
    ):
        assert a.proxy.ledger.backend == b.proxy.ledger.backend == "postgresql"
        jobs = [
            (p.url, f"chain-{name}-{i % 8}", i // 8 + 1)
            for p, name in ((a, "a"), (b, "b"))
            for i in range(per_proxy)
        ]
        with ThreadPoolExecutor(16) as pool:
            sent = list(pool.map(lambda job: (job[0], _post(*job)), jobs))
        assert len({rid for _, rid in sent}) == 2 * per_proxy
        for origin, rid in sent:
            _wait(lambda o=origin, r=rid: _is_final(o, r), f"record {rid} did not become final")
        # each replica reads the other's records: one ledger
        for origin, rid in sent[:: per_proxy // 4]:
            other = b.url if origin == a.url else a.url
            assert _is_final(other, rid)
        usage = requests.get(a.url + "/qtrap/v1/usage", timeout=10).json()
        assert usage["total"]["requests"] == 2 * per_proxy
        chain = requests.get(b.url + "/qtrap/v1/chains/chain-a-3", timeout=10).json()
        assert [h["index"] for h in chain["hops"]] == [1, 2, 3, 4, 5]
        page = requests.get(a.url + "/qtrap/v1/requests?limit=1000", timeout=10).json()
        assert sorted(r["id"] for r in page["data"]) == sorted(rid for _, rid in sent)
    rows = _rows(url, f"SELECT id FROM {ledger_pg.TABLE}")
    assert sorted(r[0] for r in rows) == sorted(rid for _, rid in sent)  # none lost, none twice


def test_a_database_restart_loses_no_final_record(tmp_path: Path) -> None:
    fport = free_port()
    with pg_server() as server, fake_backend.running(fport):
        url = server.url(server.create_db())
        with running_proxy(tmp_path, _config(fport, url)) as p:
            before = [_post(p.url, "restart", i + 1) for i in range(5)]
            for rid in before:
                _wait(lambda r=rid: _is_final(p.url, r), "a record before the restart did not become final")

            server.stop(immediate=True)  # as a crash: the server recovers from its WAL when started again
            during = [_post(p.url, "restart", i + 6) for i in range(20)]  # the proxy keeps serving
            _wait(
                lambda: requests.get(p.url + "/health", timeout=10).json()["ledger"]["status"] == "degraded",
                "/health did not report the unreachable ledger",
            )
            health = requests.get(p.url + "/health", timeout=10)
            assert health.status_code == 200 and health.json()["ledger"]["pending"] == 20
            # a record waiting for the ledger is served from memory; what only the ledger can answer: 503
            assert requests.get(f"{p.url}/qtrap/v1/requests/{during[0]}", timeout=10).json()["final"] is False
            for path in ("/qtrap/v1/usage", "/qtrap/v1/requests/not-seen-here"):
                gone = requests.get(p.url + path, timeout=10)
                assert gone.status_code == 503 and gone.json()["error"]["code"] == "ledger_unavailable"
                assert PASSWORD not in gone.text

            server.start()
            for rid in before + during:
                _wait(lambda r=rid: _is_final(p.url, r), f"record {rid} was lost across the restart", 30)
            state = requests.get(p.url + "/health", timeout=10).json()["ledger"]
            assert state["status"] == "ok" and state["pending"] == 0 and state["write_errors"]["dropped"] == 0
            assert state["write_errors"]["commit"] >= 1
            # reads answer again (after at most ledger.py's _READ_RETRY_S of failing fast)
            _wait(
                lambda: requests.get(p.url + "/qtrap/v1/chains/restart", timeout=10).status_code == 200,
                "reads did not recover",
            )
            chain = requests.get(p.url + "/qtrap/v1/chains/restart?limit=100", timeout=10).json()
            assert [h["index"] for h in chain["hops"]] == list(range(1, 26)) and chain["final"]
        rows = _rows(url, f"SELECT id FROM {ledger_pg.TABLE}")
        assert sorted(r[0] for r in rows) == sorted(before + during)


def test_a_ledger_read_waiting_on_the_database_does_not_stall_the_proxy(pg: PgServer, tmp_path: Path) -> None:
    """A records read that the database keeps waiting (here: a lock another session holds on the table)
    runs in a worker thread: the proxy's event loop answers a liveness probe and relays a chat completion
    meanwhile, and the read completes, with the right records, once the database answers."""
    url = pg.url(pg.create_db())
    fport = free_port()
    with fake_backend.running(fport), running_proxy(tmp_path, _config(fport, url)) as p:
        rids = [_post(p.url, "locked", i + 1) for i in range(3)]
        for rid in rids:
            _wait(lambda r=rid: _is_final(p.url, r), f"record {rid} did not become final")
        with (
            psycopg.connect(url) as locker,  # not autocommit: the lock is held until the rollback
            psycopg.connect(url, autocommit=True) as watcher,
            ThreadPoolExecutor(1) as pool,
        ):
            locker.execute(f"LOCK TABLE {ledger_pg.TABLE} IN ACCESS EXCLUSIVE MODE")  # type: ignore[arg-type]

            def waiting() -> bool:  # the proxy's read is queued behind the lock
                sql = f"SELECT count(*) FROM pg_locks WHERE relation = '{ledger_pg.TABLE}'::regclass AND NOT granted"
                row = watcher.execute(sql).fetchone()  # type: ignore[arg-type]
                return row is not None and row[0] > 0

            try:
                listing = pool.submit(requests.get, p.url + "/qtrap/v1/requests?limit=10", timeout=60)
                _wait(waiting, "the records read did not reach the database")
                # the read is pending; the event loop answers meanwhile
                live = requests.get(p.url + "/health/live", timeout=10)
                assert live.status_code == 200 and live.json() == {"status": "ok"}
                relayed = requests.post(p.url + "/v1/chat/completions", json=CHAT, timeout=10)
                assert (
                    relayed.status_code == 200 and relayed.json()["choices"][0]["message"]["content"] == "ok"
                )
                assert not listing.done(), "the records read returned while the table was locked"
            finally:
                locker.rollback()  # the lock is released: the read (and the writer) go on
            page = listing.result(timeout=30)
        assert page.status_code == 200, page.text
        listed = {r["id"]: r for r in page.json()["data"]}
        assert set(rids) <= set(listed) and all(listed[rid]["final"] for rid in rids)
