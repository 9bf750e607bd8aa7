"""``qtrap-proxy records export``: a ledger's final records as JSON Lines or CSV that parse back."""

from __future__ import annotations

import csv
import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from qtrap_proxy.cli import CSV_COLUMNS, main
from qtrap_proxy.ledger import Ledger
from tests.pg import PASSWORD, PgServer

KEY = "key_0123456789ab"


def _rec(rid: str, start: float, **kw: Any) -> dict[str, Any]:
    return {
        "id": rid,
        "client_request_id": None,
        "chain_id": None,
        "hop": None,
        "key_id": None,
        "route": "chat",
        "stream": False,
        "pool": "p",
        "backend": "b",
        "precision": "bf16",
        "status": "ok",
        "http_status": 200,
        "error": None,
        "start_unix_s": start,
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "energy_j": 1.5,
        "energy_null_reason": None,
        "final": True,
        "timeline": {"t_s": [0.1, 0.2], "tokens": [2, 2]},
        "hops": [],
        **kw,
    }


RECORDS = [
    _rec("r1", 1_000.0, client_request_id="client-1", key_id=KEY),
    _rec("r2", 1_001.5, precision="int4", energy_j=None, energy_null_reason="meter down", error='a "quoted",\nline'),
    _rec("r3", 2_000.0),  # outside --until below
    _rec("r0", 999.0),  # outside --since below
]  # fmt: skip


@pytest.fixture(scope="module")
def ledger_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("export") / "ledger.sqlite")
    led = Ledger(path, batch_s=0.005)
    done: set[str] = set()
    led.start(lambda recs: done.update(r["id"] for r in recs))
    for r in RECORDS:
        led.put(r)
    deadline = time.monotonic() + 10
    while len(done) < len(RECORDS):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    led.close()
    return path


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["records", "export", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_jsonl_to_stdout_parses_back_to_the_records_of_the_window_oldest_first(
    ledger_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _digest(ledger_path)
    code, out, err = _run(
        capsys, "--ledger", ledger_path, "--since", "1000", "--until", "1970-01-01T00:30:00Z"
    )
    assert code == 0 and err == ""
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines == [RECORDS[0], RECORDS[1]]  # 1970-01-01T00:30:00Z is 1800 s
    assert _digest(ledger_path) == before  # read-only: the file is untouched
    code, out, _ = _run(capsys, "--ledger", ledger_path)
    assert [json.loads(line)["id"] for line in out.splitlines()] == ["r0", "r1", "r2", "r3"]
    code, out, _ = _run(capsys, "--ledger", ledger_path, "--precision", "int4")
    assert [json.loads(line)["id"] for line in out.splitlines()] == ["r2"]
    code, out, _ = _run(capsys, "--ledger", ledger_path, "--key", KEY)
    assert [json.loads(line)["id"] for line in out.splitlines()] == ["r1"]
    code, out, _ = _run(capsys, "--ledger", ledger_path, "--client-request-id", "client-1")
    assert [json.loads(line)["id"] for line in out.splitlines()] == ["r1"]


def test_csv_to_a_file_parses_back_with_nulls_empty(
    ledger_path: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "out.csv"
    code, out, err = _run(
        capsys,
        "--ledger",
        ledger_path,
        "--since",
        "1000",
        "--until",
        "1800",
        "--format",
        "csv",
        "--out",
        str(out_file),
    )
    assert code == 0 and out == "" and err.strip() == f"2 records written to {out_file}"
    with out_file.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ["r1", "r2"] and list(rows[0]) == list(CSV_COLUMNS)
    r1, r2 = rows
    assert (r1["client_request_id"], r1["key_id"], r1["energy_j"], r1["stream"], r1["final"]) == (
        "client-1", KEY, "1.5", "false", "true",
    )  # fmt: skip
    assert float(r1["start_unix_s"]) == 1000.0 and r1["start_utc"] == "1970-01-01T00:16:40.000000Z"
    assert r1["chain_id"] == "" and r1["hop"] == ""  # null: an empty cell
    assert (
        r2["energy_j"] == ""
        and r2["energy_null_reason"] == "meter down"
        and r2["error"] == 'a "quoted",\nline'
    )


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--since", "yesterday"], "--since"),
        (["--until", "-5"], "--until"),
        (["--since", "200", "--until", "100"], "after until"),
        (["--key", "alice"], "--key"),
        (["--status", "fine"], "--status"),
        (["--pool", "a\x00b"], "--pool"),
        (["--client-request-id", "x" * 129], "--client-request-id"),
        (["--chain-id", ""], "--chain-id"),
    ],
)
def test_bad_input_is_one_line_and_status_2(
    ledger_path: str, argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(capsys, "--ledger", ledger_path, *argv)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and says in err, err


def test_a_missing_or_foreign_file_or_an_unwritable_out_is_status_2(
    ledger_path: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(capsys, "--ledger", str(tmp_path / "nope.sqlite"))
    assert code == 2 and "is not a file" in err and len(err.splitlines()) == 1
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not sqlite at all" * 100)
    code, _, err = _run(capsys, "--ledger", str(junk))
    assert code == 2 and "cannot read" in err and len(err.splitlines()) == 1
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    code, _, err = _run(capsys, "--ledger", str(other))
    assert code == 2 and "not a qtrap ledger" in err
    code, _, err = _run(capsys, "--ledger", ledger_path, "--out", str(tmp_path / "no" / "dir" / "f.jsonl"))
    assert code == 2 and "--out" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit) as e:  # argparse: an unknown format
        main(["records", "export", "--ledger", ledger_path, "--format", "xml"])
    assert e.value.code == 2


def test_a_ledger_from_before_the_client_request_id_column_exports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE requests (id TEXT PRIMARY KEY, chain_id TEXT, hop INTEGER, start_unix_s REAL NOT NULL, "
        "record TEXT NOT NULL)"
    )
    rec = {"id": "old", "start_unix_s": 5.0, "key_id": KEY}
    conn.execute("INSERT INTO requests VALUES ('old', NULL, NULL, 5.0, ?)", (json.dumps(rec),))
    conn.commit()
    conn.close()
    code, out, _ = _run(capsys, "--ledger", str(path), "--key", KEY)  # no key_id column: read from the record
    assert code == 0 and [json.loads(line) for line in out.splitlines()] == [rec]
    code, out, _ = _run(capsys, "--ledger", str(path), "--format", "csv")
    assert code == 0 and [r["id"] for r in csv.DictReader(out.splitlines())] == ["old"]


# ------------------------------------------------------------------ the fleet ledger (ledger.url)


@pytest.fixture(scope="module")
def ledger_url(pg: PgServer) -> str:
    """RECORDS in a PostgreSQL ledger; its URL without the password (given by the environment)."""
    db = pg.create_db()
    led = Ledger("unused", batch_s=0.005, url=pg.url(db))
    done: set[str] = set()
    led.start(lambda recs: done.update(r["id"] for r in recs))
    for r in RECORDS:
        led.put(r)
    deadline = time.monotonic() + 10
    while len(done) < len(RECORDS):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    led.close()
    return pg.url(db, password=False)


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--since", "1000", "--until", "1970-01-01T00:30:00Z"],
        ["--precision", "int4"],
        ["--key", KEY],
        ["--client-request-id", "client-1"],
        ["--status", "ok", "--pool", "p"],
        ["--format", "csv"],
    ],
)
def test_a_postgresql_ledger_exports_what_the_sqlite_one_does(
    ledger_path: str,
    ledger_url: str,
    argv: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("QTRAP_LEDGER_PASSWORD", PASSWORD)
    code, from_sqlite, _ = _run(capsys, "--ledger", ledger_path, *argv)
    assert code == 0
    code, from_pg, err = _run(capsys, "--ledger-url", ledger_url, *argv)
    assert code == 0 and err == "" and from_pg == from_sqlite and from_pg


def test_a_postgresql_ledger_that_cannot_be_read_is_status_2_without_the_password(
    pg: PgServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("QTRAP_LEDGER_PASSWORD", raising=False)
    monkeypatch.delenv("PGPASSWORD", raising=False)
    wrong = pg.url().replace(PASSWORD, "not-the-password")
    code, out, err = _run(capsys, "--ledger-url", wrong)
    assert code == 2 and out == "" and "password authentication failed" in err
    assert "not-the-password" not in err and len(err.splitlines()) == 1
    code, _, err = _run(capsys, "--ledger-url", pg.url(pg.create_db()))  # no ledger in it
    assert code == 2 and "holds no qtrap ledger" in err and PASSWORD not in err
    code, _, err = _run(capsys, "--ledger-url", "mysql://x@y/z")
    assert code == 2 and "postgresql://" in err
    with pytest.raises(SystemExit):  # one of --ledger and --ledger-url
        main(["records", "export", "--ledger", "a", "--ledger-url", pg.url()])
