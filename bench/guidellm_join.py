"""Join a guidellm run's requests to their qtrap-proxy records by id, and sum their energy.

    python bench/guidellm_join.py GUIDELLM.json --records RECORDS.jsonl [--json OUT] [--csv OUT]
    python bench/guidellm_join.py GUIDELLM.json --proxy http://127.0.0.1:8080 [--api-key KEY]

GUIDELLM.json is what ``guidellm run ... --output kind=json,path=GUIDELLM.json`` wrote (guidellm 0.8).
RECORDS.jsonl is ``qtrap-proxy records export --ledger LEDGER --out RECORDS.jsonl`` (works after the
proxy has stopped); either file may be gzip-compressed (``.gz``). ``--proxy`` reads the same records
from a running proxy instead (``GET /qtrap/v1/requests``, every page, over the run's time span).

The join key: guidellm keeps each answer's ``id`` as the request's ``response_id``. The proxy sends its
own request id upstream as ``X-Request-Id``, and vLLM names its answer after it: ``chatcmpl-<id>``
(chat), ``cmpl-<id>`` (completions); qtrap-sim does the same, and ``resp_<id>`` on /v1/responses. The
id without that prefix is the record's ``id``. Backends that name their answers otherwise (TGI's OpenAI
route, OpenAI) leave every request unmatched, and the output says so.

Prints one row per guidellm benchmark and one for the whole run: guidellm's requests, how many matched a
record, the attributed energy per request (median, p90), the total, joules per output token (the matched
records' energy over their completion tokens), and guidellm's own latency figures beside them.
``--json`` writes the same figures; ``--csv`` one row per guidellm request with its record's figures.
Bad input is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ID_PREFIXES = ("chatcmpl-", "cmpl-", "resp_")  # vLLM's answer ids: the prefix and the X-Request-Id
STATUSES = ("successful", "errored", "incomplete")  # guidellm's request groups


class JoinError(Exception):
    """Bad input: one line for the user."""


@dataclass(frozen=True, slots=True)
class GuidellmRequest:
    benchmark: str
    status: str  # successful, errored, incomplete
    request_id: str
    response_id: str | None
    output_tokens: int | None
    latency_s: float | None
    ttft_ms: float | None
    start_unix_s: float | None
    end_unix_s: float | None


@dataclass(frozen=True, slots=True)
class Benchmark:
    label: str  # e.g. concurrent@8, as guidellm prints it
    requests: list[GuidellmRequest]
    figures: dict[str, float | None]  # guidellm's own: latency, TTFT, ITL, throughput


@dataclass(slots=True)
class Joined:
    request: GuidellmRequest
    record: Mapping[str, Any] | None
    reason: str | None = None  # why unmatched


@dataclass(slots=True)
class Summary:
    label: str
    requests: dict[str, int] = field(default_factory=dict)  # per guidellm status
    matched: int = 0
    unmatched: int = 0
    unmatched_reasons: dict[str, int] = field(default_factory=dict)
    not_final: int = 0
    energy_known: int = 0
    energy_j_median: float | None = None
    energy_j_p90: float | None = None
    energy_j_mean: float | None = None
    energy_j_total: float = 0.0
    idle_energy_j_total: float = 0.0
    completion_tokens: int = 0  # of the records with known energy
    j_per_output_token: float | None = None
    tokens_agree: int = 0  # matched requests whose output tokens guidellm and the record agree on
    guidellm: dict[str, float | None] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.requests.values())


def record_id(response_id: str | None) -> str | None:
    """The proxy's request id inside an answer's id, else the id as it is."""
    if not response_id:
        return None
    for prefix in ID_PREFIXES:
        if response_id.startswith(prefix):
            return response_id[len(prefix) :]
    return response_id


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _label(config: Mapping[str, Any], index: int) -> str:
    strategy = config.get("strategy") or {}
    kind = str(strategy.get("type_") or f"benchmark{index + 1}")
    for key in ("streams", "rate", "max_concurrency"):
        if isinstance(strategy.get(key), int | float) and kind not in ("synchronous", "throughput"):
            value = strategy[key]
            return f"{kind}@{value:g}" if isinstance(value, float) else f"{kind}@{value}"
    return kind


def _metric(metrics: Mapping[str, Any], name: str, stat: str) -> float | None:
    m = (metrics.get(name) or {}).get("successful") or {}
    if stat in ("mean", "median"):
        return _num(m.get(stat))
    return _num((m.get("percentiles") or {}).get(stat))


GUIDELLM_FIGURES = (  # (output name, guidellm metric, statistic)
    ("latency_s_p50", "request_latency", "median"),
    ("latency_s_p90", "request_latency", "p90"),
    ("ttft_ms_p50", "time_to_first_token_ms", "median"),
    ("ttft_ms_p90", "time_to_first_token_ms", "p90"),
    ("itl_ms_p50", "inter_token_latency_ms", "median"),
    ("output_tokens_per_s", "output_tokens_per_second", "mean"),
    ("requests_per_s", "requests_per_second", "mean"),
)


def parse_guidellm(doc: Any) -> tuple[str | None, list[Benchmark]]:
    """guidellm's version and its benchmarks from its JSON report."""
    if not isinstance(doc, dict) or not isinstance(doc.get("benchmarks"), list):
        raise JoinError("not a guidellm JSON report (no benchmarks list)")
    version = (doc.get("metadata") or {}).get("guidellm_version")
    out: list[Benchmark] = []
    for i, b in enumerate(doc["benchmarks"]):
        if not isinstance(b, dict) or not isinstance(b.get("requests"), dict):
            raise JoinError(f"benchmark {i + 1}: no requests object (guidellm 0.8's report shape)")
        label = _label(b.get("config") or {}, i)
        reqs: list[GuidellmRequest] = []
        for status in STATUSES:
            for r in b["requests"].get(status) or []:
                if not isinstance(r, dict) or not isinstance(r.get("request_id"), str):
                    raise JoinError(f"benchmark {label}: a {status} request without a request_id")
                out_tokens = _num(r.get("output_tokens"))
                reqs.append(
                    GuidellmRequest(
                        benchmark=label,
                        status=status,
                        request_id=r["request_id"],
                        response_id=r.get("response_id") if isinstance(r.get("response_id"), str) else None,
                        output_tokens=int(out_tokens) if out_tokens is not None else None,
                        latency_s=_num(r.get("request_latency")),
                        ttft_ms=_num(r.get("time_to_first_token_ms")),
                        start_unix_s=_num(r.get("request_start_time")),
                        end_unix_s=_num(r.get("request_end_time")),
                    )
                )
        metrics = b.get("metrics") or {}
        figures = {name: _metric(metrics, metric, stat) for name, metric, stat in GUIDELLM_FIGURES}
        out.append(Benchmark(label, reqs, figures))
    return (version if isinstance(version, str) else None), out


def read_records(lines: Iterable[str], source: str) -> dict[str, dict[str, Any]]:
    """Records by id from JSON Lines (``qtrap-proxy records export``)."""
    records: dict[str, dict[str, Any]] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise JoinError(f"{source}:{n}: not JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
            raise JoinError(f"{source}:{n}: not a qtrap record (no id)")
        records[rec["id"]] = rec
    return records


def join(benchmarks: Sequence[Benchmark], records: Mapping[str, Mapping[str, Any]]) -> list[Joined]:
    joined: list[Joined] = []
    seen: set[str] = set()
    for b in benchmarks:
        for r in b.requests:
            rid = record_id(r.response_id)
            if rid is None:
                joined.append(Joined(r, None, "no response id in guidellm's result"))
            elif rid in seen:
                joined.append(Joined(r, None, "record already joined to another request"))
            elif rid not in records:
                joined.append(Joined(r, None, "no record with this id"))
            else:
                seen.add(rid)
                joined.append(Joined(r, records[rid]))
    return joined


def _quantile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarise(label: str, rows: Sequence[Joined], guidellm: dict[str, float | None]) -> Summary:
    s = Summary(label, guidellm=dict(guidellm))
    for status in STATUSES:
        s.requests[status] = sum(1 for j in rows if j.request.status == status)
    energies: list[float] = []
    for j in rows:
        if j.record is None:
            s.unmatched += 1
            reason = j.reason or "unmatched"
            s.unmatched_reasons[reason] = s.unmatched_reasons.get(reason, 0) + 1
            continue
        s.matched += 1
        rec = j.record
        tokens = rec.get("completion_tokens")
        if j.request.output_tokens is not None and tokens == j.request.output_tokens:
            s.tokens_agree += 1
        if not rec.get("final"):
            s.not_final += 1
            continue
        energy = _num(rec.get("energy_j"))
        if energy is None:
            continue
        energies.append(energy)
        s.idle_energy_j_total += _num(rec.get("idle_energy_j")) or 0.0
        s.completion_tokens += int(tokens) if isinstance(tokens, int) else 0
    s.energy_known = len(energies)
    if energies:
        s.energy_j_median = statistics.median(energies)
        s.energy_j_p90 = _quantile(energies, 0.9)
        s.energy_j_mean = statistics.fmean(energies)
        s.energy_j_total = math.fsum(energies)
        if s.completion_tokens:
            s.j_per_output_token = s.energy_j_total / s.completion_tokens
    return s


def summaries(benchmarks: Sequence[Benchmark], joined: Sequence[Joined]) -> list[Summary]:
    out = [
        summarise(b.label, [j for j in joined if j.request.benchmark == b.label], b.figures)
        for b in benchmarks
    ]
    if len(benchmarks) > 1:
        out.append(summarise("all", joined, {}))
    return out


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def table(rows: Sequence[Summary]) -> str:
    head = (
        "| benchmark | requests | matched | unmatched | energy known | J/request median | J/request p90 "
        "| energy J | J/output token | latency p50 s | TTFT p50 ms | ITL p50 ms | output tok/s | req/s |"
    )
    lines = [head, "|" + " --- |" * head.count(" | ") + " --- |"]
    for s in rows:
        g = s.guidellm
        lines.append(
            f"| {s.label} | {s.total} | {s.matched} | {s.unmatched} | {s.energy_known} "
            f"| {_fmt(s.energy_j_median)} | {_fmt(s.energy_j_p90)} | {_fmt(s.energy_j_total)} "
            f"| {_fmt(s.j_per_output_token, 3)} | {_fmt(g.get('latency_s_p50'), 3)} "
            f"| {_fmt(g.get('ttft_ms_p50'))} | {_fmt(g.get('itl_ms_p50'), 2)} "
            f"| {_fmt(g.get('output_tokens_per_s'))} | {_fmt(g.get('requests_per_s'), 2)} |"
        )
    return "\n".join(lines)


def report(
    version: str | None,
    rows: Sequence[Summary],
    records_total: int,
    records_joined: int,
) -> dict[str, Any]:
    return {
        "guidellm_version": version,
        "join_key": "record id = guidellm response_id without its " + "/".join(ID_PREFIXES) + " prefix",
        "records": records_total,
        "records_not_in_guidellm": records_total - records_joined,
        "benchmarks": [
            {
                "label": s.label,
                "requests": {**s.requests, "total": s.total},
                "matched": s.matched,
                "unmatched": s.unmatched,
                "unmatched_reasons": s.unmatched_reasons,
                "not_final": s.not_final,
                "energy_known": s.energy_known,
                "energy_j": {
                    "median": s.energy_j_median,
                    "p90": s.energy_j_p90,
                    "mean": s.energy_j_mean,
                    "total": s.energy_j_total,
                },
                "idle_energy_j_total": s.idle_energy_j_total,
                "completion_tokens": s.completion_tokens,
                "j_per_output_token": s.j_per_output_token,
                "output_tokens_agree": s.tokens_agree,
                "guidellm": s.guidellm,
            }
            for s in rows
        ],
    }


CSV_FIELDS = (
    "benchmark",
    "status",
    "guidellm_request_id",
    "response_id",
    "record_id",
    "unmatched_reason",
    "record_status",
    "final",
    "energy_j",
    "idle_energy_j",
    "prompt_tokens",
    "completion_tokens",
    "guidellm_output_tokens",
    "guidellm_latency_s",
    "guidellm_ttft_ms",
    "record_e2e_s",
    "record_ttft_s",
)


def write_csv(path: Path, joined: Sequence[Joined]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for j in joined:
            r, rec = j.request, j.record or {}
            w.writerow(
                [
                    r.benchmark,
                    r.status,
                    r.request_id,
                    r.response_id or "",
                    rec.get("id", ""),
                    j.reason or "",
                    rec.get("status", ""),
                    "" if not rec else str(bool(rec.get("final"))).lower(),
                    *("" if rec.get(k) is None else rec[k] for k in ("energy_j", "idle_energy_j")),
                    *("" if rec.get(k) is None else rec[k] for k in ("prompt_tokens", "completion_tokens")),
                    "" if r.output_tokens is None else r.output_tokens,
                    "" if r.latency_s is None else r.latency_s,
                    "" if r.ttft_ms is None else r.ttft_ms,
                    *("" if rec.get(k) is None else rec[k] for k in ("e2e_s", "ttft_s")),
                ]
            )


def records_from_proxy(
    url: str, api_key: str | None, benchmarks: Sequence[Benchmark]
) -> dict[str, dict[str, Any]]:
    """Every record over the run's time span (a minute either side) from a running proxy."""
    from qtrap_client import QtrapSyncClient
    from qtrap_client.errors import QtrapClientError

    starts = [r.start_unix_s for b in benchmarks for r in b.requests if r.start_unix_s is not None]
    ends = [r.end_unix_s for b in benchmarks for r in b.requests if r.end_unix_s is not None]
    if not starts:
        raise JoinError("guidellm's report has no request start times to bound the records query")
    since, until = min(starts) - 60.0, max(ends or starts) + 60.0
    try:
        with QtrapSyncClient(url, api_key=api_key) as q:
            out: dict[str, dict[str, Any]] = {}
            for r in q.iter_requests(since=since, until=until):
                rec = dict(r)
                out[str(rec["id"])] = rec
            return out
    except QtrapClientError as e:
        raise JoinError(f"{url}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _open_text(path: Path) -> IO[str]:
    """A file, or a gzip-compressed one (``.gz``), as text."""
    return gzip.open(path, "rt") if path.suffix == ".gz" else path.open()


def load_json(path: Path) -> Any:
    try:
        with _open_text(path) as f:
            return json.load(f)
    except OSError as e:
        raise JoinError(f"cannot read {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, EOFError, gzip.BadGzipFile) as e:
        raise JoinError(f"{path}: not JSON ({e})") from None


def load_records(path: Path) -> dict[str, dict[str, Any]]:
    try:
        with _open_text(path) as f:
            return read_records(f, str(path))
    except gzip.BadGzipFile as e:
        raise JoinError(f"{path}: not gzip ({e})") from None
    except OSError as e:
        raise JoinError(f"cannot read {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, EOFError) as e:
        raise JoinError(f"{path}: not text ({e})") from None


def run(args: argparse.Namespace) -> str:
    version, benchmarks = parse_guidellm(load_json(args.guidellm_json))
    if args.records is not None:
        records = load_records(args.records)
    else:
        records = records_from_proxy(args.proxy, args.api_key, benchmarks)
    joined = join(benchmarks, records)
    rows = summaries(benchmarks, joined)
    matched = sum(1 for j in joined if j.record is not None)
    doc = report(version, rows, len(records), matched)
    text = [
        f"guidellm {version or '(version not in the report)'}: {len(joined)} requests in "
        f"{len(benchmarks)} benchmark(s); {len(records)} records; joined on {doc['join_key']}",
        "",
        table(rows),
        "",
    ]
    for s in rows:
        for reason, n in sorted(s.unmatched_reasons.items()):
            if s.label != "all" or len(rows) == 1:
                text.append(f"{s.label}: {n} unmatched: {reason}")
        if s.not_final:
            text.append(f"{s.label}: {s.not_final} matched records not final yet (energy not counted)")
    whole = rows[-1]
    text.append(
        f"output tokens: guidellm and the record agree on {whole.tokens_agree} of {whole.matched} matched"
    )
    text.append(f"records not in guidellm's results: {doc['records_not_in_guidellm']}")
    if args.json is not None:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    if args.csv is not None:
        write_csv(args.csv, joined)
    return "\n".join(text)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="guidellm_join", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("guidellm_json", type=Path, help="guidellm's JSON report (--output kind=json,path=...)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--records", type=Path, help="the proxy's records: qtrap-proxy records export (JSON Lines)"
    )
    src.add_argument("--proxy", help="a running proxy's base URL, to read the records from instead")
    ap.add_argument("--api-key", help="--proxy with auth on: the admin key")
    ap.add_argument("--json", type=Path, help="write the figures here as JSON")
    ap.add_argument("--csv", type=Path, help="write one row per guidellm request with its record's figures")
    args = ap.parse_args(argv)
    try:
        print(run(args))
    except JoinError as e:
        print(f"guidellm_join: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"guidellm_join: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
