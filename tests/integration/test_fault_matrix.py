"""The fault matrix (issue 13, item 8): one fault per cell, each under concurrent streaming load through a
real proxy metering a simulated GPU, and nothing final lost.

| cell                  | fault                                                          | after it clears                |
| --------------------- | -------------------------------------------------------------- | ------------------------------ |
| backend-killed        | the backend process SIGKILLed mid-stream, then started again   | the proxy serves again         |
| meter-down            | the DCGM exporter answers 503 for a while                      | energy measured again          |
| ledger-write-failure  | every SQLite commit raises (injected into the ledger)          | the kept records committed     |
| disk-full             | RLIMIT_FSIZE 0 on the proxy process: every file write fails    | the kept records committed     |
| sigterm               | SIGTERM under load (test_shutdown's run, its assertions)       | exit 0 within the bound        |
| sigkill               | SIGKILL under load, then a restart on the same ledger          | every record final before the  |
|                       |                                                                | kill is served again unchanged |
| sigkill-postgresql    | sigkill's cell with the fleet ledger (ledger.url, PostgreSQL)  | as sigkill                     |
| postgresql-crash      | the fleet ledger's PostgreSQL killed (immediate shutdown, as a | the kept records committed     |
|                       | crash) under load, then started again                          | after its recovery             |

Every cell asserts: the proxy did not crash (except where it was killed); every stream a client got a
200 for ended with ``data: [DONE]`` (an error event first where the backend failed); every request the
client saw complete has a final record (for SIGKILL: every record final before the kill is in the
ledger); a SQLite ledger passes ``PRAGMA integrity_check``, and every record parses; energy is never 0 where it
is unknown (null with a reason). test_faults' single-stream backend kill and test_ledger's sequential
SIGKILL are folded in here (their assertions kept); test_shutdown keeps its 20-run SIGTERM regression
and this matrix runs one such run.
"""

from __future__ import annotations

import contextlib
import json
import resource
import signal
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
import requests
import yaml

from qtrap_proxy import ledger_pg
from qtrap_proxy.ledger import Ledger
from tests.helpers import BIN, backend, free_port, server, sim, stop
from tests.integration.inproc import running_proxy
from tests.integration.test_shutdown import _sigterm_under_load, check_clean_sigterm
from tests.pg import pg_server

LedgerAt = Path | str  # a SQLite ledger's file, or a PostgreSQL ledger's URL

CLIENTS = 8
DEVICE = {"host": "qtrap-sim", "index": 0}


# -- load ----------------------------------------------------------------------------------------------------
@dataclass
class Seen:
    """One request as its client saw it."""

    rid: str | None
    status: int | None  # None: no answer (connection refused or reset)
    body: bytes
    error: str | None = None

    @property
    def complete(self) -> bool:
        return self.status == 200 and self.body.endswith(b"data: [DONE]\n\n") and b'"error"' not in self.body


@dataclass
class Load:
    """Streaming chat clients in a loop until stopped."""

    url: str
    max_tokens: int = 30
    chain: str | None = None  # each request a hop of this chain
    seen: list[Seen] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def client(self, i: int) -> None:
        n = 0
        with requests.Session() as s:
            while not self.stopping.is_set():
                n += 1
                body = {
                    "model": "qwen3-8b",
                    "stream": True,
                    "max_tokens": self.max_tokens + i,
                    "messages": [{"role": "user", "content": f"count to {i}"}],
                }
                headers = (
                    {"x-qtrap-chain-id": self.chain, "x-qtrap-hop": str(i * 1000 + n)} if self.chain else {}
                )
                try:
                    with s.post(
                        self.url + "/v1/chat/completions", json=body, headers=headers, stream=True, timeout=30
                    ) as r:
                        got = Seen(r.headers.get("x-qtrap-request-id"), r.status_code, b"")
                        try:
                            got.body = b"".join(r.iter_content(None))
                        except requests.RequestException as e:
                            got.error = f"{type(e).__name__}: {e}"
                except requests.RequestException as e:
                    got = Seen(None, None, b"", f"{type(e).__name__}: {e}")
                    time.sleep(0.02)
                with self.lock:
                    self.seen.append(got)

    def __enter__(self) -> Load:
        self.threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(CLIENTS)]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(60)

    def wait_completed(self, n: int, timeout_s: float = 30) -> None:
        """Until ``n`` more requests completed than now (the load is really running)."""
        target = len(self.completed()) + n
        deadline = time.monotonic() + timeout_s
        while len(self.completed()) < target:
            assert time.monotonic() < deadline, f"load stalled: {self.summary()}"
            time.sleep(0.02)

    def completed(self) -> list[str]:
        with self.lock:
            return [s.rid for s in self.seen if s.complete and s.rid]

    def summary(self) -> str:
        with self.lock:
            statuses = [s.status for s in self.seen]
        return f"{len(statuses)} requests, {statuses.count(200)} 200s, {len(self.completed())} complete"

    def assert_streams_terminated(self) -> None:
        """Every stream a client got a 200 for ended with `data: [DONE]` (an error event before it, if broken)."""
        with self.lock:
            bad = [s for s in self.seen if s.status == 200 and not s.body.endswith(b"data: [DONE]\n\n")]
        assert not bad, f"{len(bad)} streams without `data: [DONE]`, e.g. {bad[0]!r}"[:2000]


# -- checks --------------------------------------------------------------------------------------------------
def wait_until(what: str, cond: Callable[[], bool], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def finals(url: str, rids: list[str], timeout_s: float = 30) -> dict[str, dict[str, Any]]:
    """Every request's final record from the admin API (waits until each is final)."""
    out: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    pending = list(dict.fromkeys(rids))
    with requests.Session() as s:
        while pending:
            for rid in list(pending):
                r = s.get(f"{url}/qtrap/v1/requests/{rid}", timeout=10)
                assert r.status_code == 200, f"no record of completed request {rid}: {r.status_code} {r.text}"
                rec = r.json()
                if rec["final"]:
                    out[rid] = rec
                    pending.remove(rid)
            assert time.monotonic() < deadline, f"{len(pending)} records not final, e.g. {pending[0]}"
            time.sleep(0.05)
    return out


def check_record(rec: dict[str, Any]) -> None:
    assert rec["final"] is True, rec
    if rec["energy_j"] is None:
        assert rec["energy_null_reason"], rec  # unknown energy says why
    elif rec.get("completion_tokens"):
        assert rec["energy_j"] > 0, rec  # never a silent 0 for work that was done


def ledger_records(path: LedgerAt) -> dict[str, dict[str, Any]]:
    """The ledger's records (read-only): a SQLite file passes integrity_check, every record parses."""
    if isinstance(path, str):
        with psycopg.connect(path) as pg:
            rows = pg.execute(f"SELECT id, chain_id, hop, record FROM {ledger_pg.TABLE}").fetchall()
    else:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            rows = conn.execute("SELECT id, chain_id, hop, record FROM requests").fetchall()
        finally:
            conn.close()
    out = {}
    for rid, chain_id, hop, text in rows:
        rec = json.loads(text)
        assert rec["id"] == rid and rec.get("chain_id") == chain_id and rec.get("hop") == hop, rec
        assert "ledger_error" not in rec, rec
        check_record(rec)
        out[rid] = rec
    return out


def settle_and_check(url: str, ledger: LedgerAt, load: Load) -> dict[str, dict[str, Any]]:
    """After the fault cleared: streams terminated, every completed request final and durable, the proxy
    healthy, the ledger sound."""
    load.assert_streams_terminated()
    completed = load.completed()
    assert completed, load.summary()
    recs = finals(url, completed)
    for rec in recs.values():
        check_record(rec)
        assert rec["status"] == "ok", rec
    wait_until(
        "the proxy is healthy", lambda: requests.get(url + "/health", timeout=10).json()["status"] == "ok"
    )
    stored = ledger_records(ledger)
    assert set(completed) <= set(stored)
    for rid in completed:
        assert stored[rid] == recs[rid]
    return recs


def proxy_config(port: int, sim_port: int, ledger: LedgerAt, meter_url: str | None = None) -> dict[str, Any]:
    where = {"url": ledger} if isinstance(ledger, str) else {"path": str(ledger)}
    return {
        "server": {"port": port, "shutdown_timeout_s": 5},
        "backends": [backend("sim", sim_port, devices=[DEVICE])],
        "meter": {
            "kind": "dcgm",
            "urls": [meter_url or f"http://127.0.0.1:{sim_port}/dcgm/metrics"],
            "settle_s": 0.2,
        },
        "ledger": {**where, "batch_s": 0.02},
    }


@contextlib.contextmanager
def proxy_process(tmp: Path, cfg: dict[str, Any]) -> Iterator[Any]:
    path = tmp / f"proxy-{cfg['server']['port']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [str(BIN / "qtrap-proxy"), "serve", "--config", str(path), "--log-level", "warning"]
    with server(cmd, f"http://127.0.0.1:{cfg['server']['port']}/health") as proc:
        yield proc


# -- the cells -----------------------------------------------------------------------------------------------
def backend_killed(tmp: Path) -> None:
    sim_port, port = free_port(), free_port()
    ledger = tmp / "ledger.sqlite"
    url = f"http://127.0.0.1:{port}"
    with contextlib.ExitStack() as stack:
        victim = stack.enter_context(sim(sim_port, "--step-ms", "5"))
        proxy = stack.enter_context(proxy_process(tmp, proxy_config(port, sim_port, ledger)))
        with Load(url, max_tokens=150) as load:
            load.wait_completed(CLIENTS)
            stop(victim, signal.SIGKILL)  # mid-stream: 8 streams of 150+ tokens at 5 ms a token
            stack.enter_context(sim(sim_port, "--step-ms", "5"))  # the fault clears: it is back on its port
            load.wait_completed(CLIENTS)
        broken = [s for s in load.seen if s.status == 200 and b'"upstream_error"' in s.body]
        assert broken, f"no stream was broken off by the kill: {load.summary()}"
        for s in broken:  # test_faults' assertions: an error event, then [DONE]
            events = [e for e in s.body.split(b"\n\n") if e]
            assert events[-1] == b"data: [DONE]" and b'"upstream_error"' in events[-2], s
        assert proxy.poll() is None, "the proxy died"
        recs = settle_and_check(url, ledger, load)
        cut = finals(url, [s.rid for s in broken if s.rid])
        assert {r["status"] for r in cut.values()} <= {"stream_broken", "upstream_timeout"}, cut
        for rec in cut.values():
            check_record(rec)
        assert any(r["energy_j"] for r in recs.values()), "no energy measured before or after the fault"


class FlakyExporter:
    """A DCGM exporter in front of the simulator's that answers 503 while ``down`` is set."""

    def __init__(self, upstream: str) -> None:
        self.down = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if outer.down.is_set():
                    self.send_error(503, "exporter down (fault matrix)")
                    return
                try:
                    with urllib.request.urlopen(upstream, timeout=5) as r:
                        body = r.read()
                except (urllib.error.URLError, OSError):
                    self.send_error(502)
                    return
                self.send_response(200)
                self.send_header("content-type", "text/plain")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/metrics"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FlakyExporter:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def meter_down(tmp: Path) -> None:
    sim_port, port = free_port(), free_port()
    ledger = tmp / "ledger.sqlite"
    url = f"http://127.0.0.1:{port}"

    def meter_up() -> bool:
        return bool(requests.get(url + "/qtrap/v1/energy", timeout=10).json()["devices"][0]["meter_up"])

    exporter = FlakyExporter(f"http://127.0.0.1:{sim_port}/dcgm/metrics")
    with (
        sim(sim_port, "--step-ms", "5"),
        exporter,
        proxy_process(tmp, proxy_config(port, sim_port, ledger, exporter.url)) as proxy,
    ):
        with Load(url) as load:
            load.wait_completed(CLIENTS)
            exporter.down.set()
            wait_until("the proxy sees the meter down", lambda: not meter_up())
            start = len(load.completed())

            def unknown_seen() -> bool:  # the outage outlasted settle_s for a request that ended in it
                load.wait_completed(1)
                for rid in load.completed()[start:]:
                    rec = requests.get(f"{url}/qtrap/v1/requests/{rid}", timeout=10).json()
                    if rec["final"] and rec["energy_j"] is None:
                        return True
                return False

            wait_until("a request that ended while the meter was down is final, energy unknown", unknown_seen)
            exporter.down.clear()
            wait_until("the meter is back", meter_up)
            load.wait_completed(2 * CLIENTS)
        assert proxy.poll() is None, "the proxy died"
        recs = settle_and_check(url, ledger, load)
        unknown = [r for r in recs.values() if r["energy_j"] is None]
        assert unknown and all("meter down" in r["energy_null_reason"] for r in unknown), unknown[:2]
        # measured again once the meter is back: the last requests have energy
        last = recs[load.completed()[-1]]
        assert last["energy_j"] and last["energy_j"] > 0, last


def _ledger_fault(url: str, inject: Callable[[], None], clear: Callable[[], None], load: Load) -> None:
    """Commits fail for a while under load: /health says degraded (still 200), then recovers."""

    def ledger_status() -> str:
        r = requests.get(url + "/health", timeout=10)
        assert r.status_code == 200, r.text  # a ledger problem never takes the proxy out of service
        return str(r.json()["ledger"]["status"])

    load.wait_completed(CLIENTS)
    inject()
    try:
        wait_until("the ledger reports failing commits", lambda: ledger_status() == "degraded")
        load.wait_completed(CLIENTS)  # requests complete (and turn final, not yet durable) meanwhile
    finally:
        clear()
    wait_until("the ledger recovers", lambda: ledger_status() == "ok")
    load.wait_completed(CLIENTS)


def ledger_write_failure(tmp: Path) -> None:
    sim_port = free_port()
    with sim(sim_port, "--step-ms", "5"):
        cfg = proxy_config(0, sim_port, tmp / "ledger.sqlite")
        with running_proxy(tmp, cfg) as p, pytest.MonkeyPatch.context() as mp:

            def refuse(self: Ledger, conn: sqlite3.Connection, rows: list[Any]) -> None:
                raise sqlite3.OperationalError("disk I/O error (injected by the fault matrix)")

            with Load(p.url) as load:
                _ledger_fault(p.url, lambda: mp.setattr(Ledger, "_write", refuse), mp.undo, load)
            settle_and_check(p.url, tmp / "ledger.sqlite", load)
            errors = p.proxy.ledger.write_errors
            assert errors["commit"] > 0 and errors["dropped"] == 0 and errors["writer"] == 0, errors


def disk_full(tmp: Path) -> None:
    """RLIMIT_FSIZE 0 (prlimit on the proxy process; no root needed): every write to a file fails with
    EFBIG, as on a full disk, SQLite's WAL appends included; then the limit is lifted."""
    sim_port, port = free_port(), free_port()
    ledger = tmp / "ledger.sqlite"
    url = f"http://127.0.0.1:{port}"
    with sim(sim_port, "--step-ms", "5"), proxy_process(tmp, proxy_config(port, sim_port, ledger)) as proxy:
        soft, hard = resource.prlimit(proxy.pid, resource.RLIMIT_FSIZE)
        with Load(url) as load:
            _ledger_fault(
                url,
                lambda: resource.prlimit(proxy.pid, resource.RLIMIT_FSIZE, (0, hard)),
                lambda: resource.prlimit(proxy.pid, resource.RLIMIT_FSIZE, (soft, hard)),
                load,
            )
        assert proxy.poll() is None, "the proxy died"
        settle_and_check(url, ledger, load)
        state = requests.get(url + "/health", timeout=10).json()["ledger"]
        assert state["write_errors"]["commit"] > 0 and state["write_errors"]["dropped"] == 0, state


def sigterm(tmp: Path) -> None:
    sim_port = free_port()
    with sim(sim_port, "--model", "qwen3-8b", "--step-ms", "5"):
        out = _sigterm_under_load(tmp, sim_port, 0)
    check_clean_sigterm(out, 0)
    stored = ledger_records(out.ledger)
    assert set(out.completed) <= set(stored)


def sigkill(tmp: Path, ledger: LedgerAt | None = None) -> None:
    sim_port, port = free_port(), free_port()
    ledger = ledger or tmp / "ledger.sqlite"
    url = f"http://127.0.0.1:{port}"
    cfg = proxy_config(port, sim_port, ledger)
    with sim(sim_port, "--step-ms", "5"):
        with proxy_process(tmp, cfg) as proc:
            # test_ledger's sequential chain: 12 hops, streamed and not, all final before the kill
            chain_ids = []
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
                assert r.status_code == 200
                chain_ids.append(r.headers["x-qtrap-request-id"])
            before = finals(url, chain_ids)
            with Load(url, max_tokens=20, chain="load") as load:
                load.wait_completed(3 * CLIENTS)
                # records that turn final while the load runs, as the admin API served them
                before.update(finals(url, load.completed()))
                load.wait_completed(CLIENTS)
                stop(proc, signal.SIGKILL)  # mid-load: streams in flight, records being committed
        assert len(before) >= 12 + 3 * CLIENTS
        stored = ledger_records(ledger)
        missing = [rid for rid in before if rid not in stored]
        assert not missing, f"{len(missing)} records final before the SIGKILL are not in the ledger"
        for rid, rec in before.items():
            assert stored[rid] == rec
        with proxy_process(tmp, cfg):
            with requests.Session() as s:
                for rid, rec in before.items():
                    assert s.get(f"{url}/qtrap/v1/requests/{rid}", timeout=10).json() == rec
                chain = s.get(f"{url}/qtrap/v1/chains/c1", timeout=10).json()
                assert chain["requests"] == 12 and chain["final"]
                assert s.get(f"{url}/qtrap/v1/requests/unknown-id", timeout=10).status_code == 404
            # the restarted proxy serves (and records) normally
            with Load(url) as again:
                again.wait_completed(CLIENTS)
            settle_and_check(url, ledger, again)


def sigkill_postgresql(tmp: Path) -> None:
    with pg_server() as db:
        sigkill(tmp, db.url(db.create_db()))


def postgresql_crash(tmp: Path) -> None:
    """The fleet ledger's database crashes under load and comes back: records kept, then committed."""
    sim_port, port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    with pg_server() as db, sim(sim_port, "--step-ms", "5"):
        ledger = db.url(db.create_db())
        with proxy_process(tmp, proxy_config(port, sim_port, ledger)) as proxy:
            with Load(url) as load:
                _ledger_fault(url, lambda: db.stop(immediate=True), db.start, load)
            assert proxy.poll() is None, "the proxy died"
            settle_and_check(url, ledger, load)
            state = requests.get(url + "/health", timeout=10).json()["ledger"]
            assert state["write_errors"]["commit"] > 0 and state["write_errors"]["dropped"] == 0, state


CELLS: dict[str, Callable[[Path], None]] = {
    "backend-killed": backend_killed,
    "meter-down": meter_down,
    "ledger-write-failure": ledger_write_failure,
    "disk-full": disk_full,
    "sigterm": sigterm,
    "sigkill": sigkill,
    "sigkill-postgresql": sigkill_postgresql,
    "postgresql-crash": postgresql_crash,
}


@pytest.mark.parametrize("cell", list(CELLS))
def test_fault_matrix(cell: str, tmp_path: Path) -> None:
    CELLS[cell](tmp_path)
