"""bench/guidellm_join.py on a trimmed real guidellm 0.8.1 report and the proxy's records of that run.

The fixtures come from the run of docs/results/sim-guidellm-2026-12-06: the report keeps three requests
of each benchmark (concurrent@1 and concurrent@8), the records file the records of five of those six
(the last concurrent@8 request's record left out, so it is unmatched) and one record of the run that the
trimmed report does not hold.
"""

from __future__ import annotations

import copy
import csv
import gzip
import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.helpers import ROOT

DATA = Path(__file__).parent / "data"
REPORT = DATA / "guidellm-0.8.1-trimmed.json"
RECORDS = DATA / "records-trimmed.jsonl"

# the records' energy_j (joules) of the five matched requests
C1 = [320.3185262467084, 300.72155094513573, 343.291324735783]
C8 = [50.5243663787008, 52.54347311884578]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("guidellm_join", ROOT / "bench" / "guidellm_join.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["guidellm_join"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


gj = _load()


def _report() -> Any:
    return json.loads(REPORT.read_text())


def _records() -> dict[str, dict[str, Any]]:
    return gj.read_records(RECORDS.read_text().splitlines(), "records")  # type: ignore[no-any-return]


def test_record_id_strips_vllm_prefixes() -> None:
    assert gj.record_id("chatcmpl-abc") == "abc"
    assert gj.record_id("cmpl-abc") == "abc"
    assert gj.record_id("resp_abc") == "abc"
    assert gj.record_id("abc") == "abc"
    assert gj.record_id(None) is None
    assert gj.record_id("") is None


def test_join_counts_and_energy() -> None:
    version, benchmarks = gj.parse_guidellm(_report())
    assert version == "0.8.1"
    assert [b.label for b in benchmarks] == ["concurrent@1", "concurrent@8"]
    records = _records()
    assert len(records) == 6
    joined = gj.join(benchmarks, records)
    rows = gj.summaries(benchmarks, joined)
    assert [s.label for s in rows] == ["concurrent@1", "concurrent@8", "all"]
    c1, c8, whole = rows

    assert (c1.total, c1.matched, c1.unmatched, c1.energy_known) == (3, 3, 0, 3)
    assert c1.energy_j_total == pytest.approx(sum(C1))
    assert c1.energy_j_median == pytest.approx(C1[0])
    # p90 of three values, linear between ranks: 320.32 + 0.8 * (343.29 - 320.32)
    assert c1.energy_j_p90 == pytest.approx(C1[0] + 0.8 * (C1[2] - C1[0]))
    assert c1.completion_tokens == 3 * 128
    assert c1.j_per_output_token == pytest.approx(sum(C1) / 384)
    assert c1.tokens_agree == 3

    assert (c8.total, c8.matched, c8.unmatched, c8.energy_known) == (3, 2, 1, 2)
    assert c8.unmatched_reasons == {"no record with this id": 1}
    assert c8.energy_j_total == pytest.approx(sum(C8))
    assert c8.j_per_output_token == pytest.approx(sum(C8) / 256)

    assert (whole.total, whole.matched, whole.unmatched) == (6, 5, 1)
    assert whole.energy_j_total == pytest.approx(math.fsum(C1 + C8))
    assert whole.idle_energy_j_total == 0.0

    # guidellm's own figures ride along, from its metrics
    assert c1.guidellm["latency_s_p50"] == pytest.approx(0.711064338684082)
    assert c8.guidellm["requests_per_s"] == pytest.approx(8.98, abs=0.01)

    doc = gj.report(version, rows, len(records), whole.matched)
    assert doc["records_not_in_guidellm"] == 1
    assert doc["benchmarks"][2]["energy_j"]["total"] == pytest.approx(math.fsum(C1 + C8))


def test_missing_response_id_errored_and_not_final() -> None:
    doc = _report()
    b = doc["benchmarks"][0]["requests"]
    errored = copy.deepcopy(b["successful"][2])
    errored["response_id"] = None  # failed before any answer: no id
    b["errored"] = [errored]
    del b["successful"][2]
    records = _records()
    first = next(iter(records))
    records[first]["final"] = False  # still provisional: matched, energy not counted
    _, benchmarks = gj.parse_guidellm(doc)
    rows = gj.summaries(benchmarks, gj.join(benchmarks, records))
    c1 = rows[0]
    assert c1.requests == {"successful": 2, "errored": 1, "incomplete": 0}
    assert c1.unmatched_reasons == {"no response id in guidellm's result": 1}
    assert (c1.matched, c1.not_final, c1.energy_known) == (2, 1, 1)
    assert c1.energy_j_total == pytest.approx(C1[1])


def test_cli_writes_json_and_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json, out_csv = tmp_path / "join.json", tmp_path / "join.csv"
    rc = gj.main([str(REPORT), "--records", str(RECORDS), "--json", str(out_json), "--csv", str(out_csv)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| concurrent@1 | 3 | 3 | 0 | 3 |" in text
    assert "concurrent@8: 1 unmatched: no record with this id" in text
    assert "records not in guidellm's results: 1" in text
    doc = json.loads(out_json.read_text())
    assert doc["guidellm_version"] == "0.8.1"
    assert [b["matched"] for b in doc["benchmarks"]] == [3, 2, 5]
    with out_csv.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    assert sum(float(r["energy_j"]) for r in rows if r["energy_j"]) == pytest.approx(math.fsum(C1 + C8))
    assert [r["unmatched_reason"] for r in rows].count("no record with this id") == 1


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: None, "cannot read"),
        (lambda p: p.write_text("{not json"), "not JSON"),
        (lambda p: p.write_text('{"benchmarks": 3}'), "not a guidellm JSON report"),
    ],
)
def test_cli_bad_report(tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: Any, message: str) -> None:
    path = tmp_path / "g.json"
    setup(path)
    assert gj.main([str(path), "--records", str(RECORDS)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("guidellm_join: ") and message in err and err.count("\n") == 1


def test_cli_bad_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "r.jsonl"
    bad.write_text(RECORDS.read_text().splitlines()[0] + "\n{oops\n")
    assert gj.main([str(REPORT), "--records", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: not JSON" in err and err.count("\n") == 1
    assert gj.main([str(REPORT), "--records", str(tmp_path / "none.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_gzip_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report, records = tmp_path / "g.json.gz", tmp_path / "r.jsonl.gz"
    report.write_bytes(gzip.compress(REPORT.read_bytes()))
    records.write_bytes(gzip.compress(RECORDS.read_bytes()))
    assert gj.main([str(report), "--records", str(records)]) == 0
    assert "| all | 6 | 5 | 1 | 5 |" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(b"plain text")
    assert gj.main([str(report), "--records", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not gzip" in err and err.count("\n") == 1
