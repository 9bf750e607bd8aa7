"""``qtrap-proxy``: command line. Thin: validate, then call one entry point."""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

from qtrap_proxy import __version__, keystore
from qtrap_proxy.config import ProxyConfig, load_config
from qtrap_proxy.errors import ConfigError, KeyStoreError, QtrapDomainError, QtrapError
from qtrap_proxy.ledger_pg import redact


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qtrap-proxy",
        description="OpenAI-compatible proxy in front of vLLM/TGI backends that attributes GPU energy to requests.",
    )
    p.add_argument("--version", action="version", version=f"qtrap-proxy {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the proxy", description="Run the proxy (an ASGI server).")
    serve.add_argument("--config", "-c", required=True, metavar="FILE", help="YAML configuration file")
    serve.add_argument("--host", help="bind address (overrides server.host)")
    serve.add_argument("--port", type=int, help="port (overrides server.port; 0 picks a free one)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--access-log", action="store_true", help="log every request (costs throughput)")

    check = sub.add_parser(
        "check-config",
        help="validate a configuration file",
        description="Validate a configuration and summarise it.",
    )
    check.add_argument("--config", "-c", required=True, metavar="FILE")

    grafana = sub.add_parser("grafana", help="Grafana dashboards", description="qtrap's Grafana dashboards.")
    gsub = grafana.add_subparsers(dest="grafana_command", required=True, metavar="ACTION")
    push = gsub.add_parser(
        "push",
        help="upload the dashboards to a Grafana",
        description="Upload qtrap's dashboards (Quantization trap, Requests and hops, Fleet) to a Grafana "
        "through its HTTP API; pushing again updates them in place.",
    )
    push.add_argument("--url", required=True, help="Grafana's base URL, e.g. http://grafana:3000")
    push.add_argument(
        "--token",
        default=os.environ.get("GRAFANA_TOKEN"),
        help="service account token with the Editor role (default: $GRAFANA_TOKEN)",
    )
    push.add_argument(
        "--folder", default="qtrap", help="folder to put them in, created if missing (default: qtrap)"
    )
    push.add_argument(
        "--dir",
        type=Path,
        metavar="DIR",
        help="push the *.json dashboards of DIR instead of the ones shipped with qtrap-proxy",
    )
    push.add_argument(
        "--timeout", type=float, default=10.0, metavar="S", help="per-request timeout (default: 10)"
    )

    keys = sub.add_parser(
        "keys",
        help="client API keys (auth)",
        description="Client API keys for auth.enabled: stored hashed in auth.keys_path; a running proxy "
        "sees a change within auth.refresh_s.",
    )
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = ksub.add_parser(
        "create", help="create a key and print its secret once", description="Create a client key."
    )
    create.add_argument("--name", help="a name for the key (A-Z a-z 0-9 _ . -, 1 to 64): metric label, lists")
    create.add_argument(
        "--pools", help="comma-separated pools the key may use (default: every pool)", default=""
    )
    create.add_argument(
        "--expires", metavar="WHEN", help="30d, 12h, 90m, 2w, 3600s from now, or an ISO 8601 date (UTC)"
    )
    create.add_argument("--json", action="store_true", help="print the key and its secret as JSON")
    listing = ksub.add_parser("list", help="list the keys (never their secrets)", description="List keys.")
    listing.add_argument("--json", action="store_true", help="print JSON")
    revoke = ksub.add_parser(
        "revoke",
        help="revoke a key",
        description="Revoke a key (a running proxy refuses it within refresh_s).",
    )
    revoke.add_argument("key_id", metavar="ID", help="the key's id (key_...)")
    for kp in (create, listing, revoke):
        where = kp.add_mutually_exclusive_group(required=True)
        where.add_argument(
            "--config", "-c", metavar="FILE", help="the proxy's configuration (auth.keys_path)"
        )
        where.add_argument("--keys-path", metavar="FILE", help="the key store itself")
    ksub.add_parser(
        "admin",
        help="print a new random admin key and its SHA-256",
        description="Print a new random admin key (for $QTRAP_ADMIN_KEY) and its SHA-256 "
        "(for auth.admin_key_sha256). Nothing is stored.",
    )

    routing = sub.add_parser(
        "routing", help="routing by cost", description="Routing by cost (pools.<name>.routing: cost)."
    )
    rsub = routing.add_subparsers(dest="routing_command", required=True, metavar="ACTION")
    seed = rsub.add_parser(
        "seed",
        help="print the seed table a loadgen report gives a pool",
        description="Read a loadgen report.json as pools.<name>.cost.seed_report does and print the J/token "
        "per precision and load bucket the cost model would start from.",
    )
    seed.add_argument("report", metavar="REPORT", help="a loadgen report.json")
    seed.add_argument("--pool", required=True, metavar="NAME", help="the pool to seed")
    seed.add_argument(
        "--config", "-c", metavar="FILE", help="the proxy's configuration: keep only the pool's precisions"
    )
    seed.add_argument("--json", action="store_true", help="print JSON")

    records = sub.add_parser(
        "records",
        help="the ledger's records",
        description="Read the records of a ledger (ledger.path or ledger.url) directly, without a running proxy.",
    )
    resub = records.add_subparsers(dest="records_command", required=True, metavar="ACTION")
    export = resub.add_parser(
        "export",
        help="write the final records of a time window as JSON Lines or CSV",
        description="Write the ledger's final records that started in [--since, --until), oldest first, "
        "one per line: JSON Lines (each the record as GET /qtrap/v1/requests/{id} shows it) or CSV (one "
        "column per scalar field, empty for null; the timeline, hops, devices and engine timing are in "
        "the JSON Lines only; cells are written as they are, without spreadsheet-formula escaping). The "
        "ledger is opened read-only and read row by row, so a running proxy may keep writing it. Exit "
        "status 2 with one line on stderr for bad input.",
    )
    where = export.add_mutually_exclusive_group(required=True)
    where.add_argument("--ledger", metavar="PATH", help="the SQLite ledger (ledger.path)")
    where.add_argument(
        "--ledger-url",
        metavar="URL",
        help="the PostgreSQL ledger (ledger.url: postgresql://user@host:port/database); its password in "
        "the URL, or in --password-env's variable, PGPASSWORD or ~/.pgpass",
    )
    export.add_argument(
        "--password-env",
        metavar="NAME",
        default="QTRAP_LEDGER_PASSWORD",
        help="environment variable holding the PostgreSQL password (default: QTRAP_LEDGER_PASSWORD)",
    )
    export.add_argument(
        "--since",
        metavar="WHEN",
        help="Unix seconds or ISO 8601 / RFC 3339 (UTC unless it says; default: all)",
    )
    export.add_argument("--until", metavar="WHEN", help="exclusive, as --since (default: no bound)")
    export.add_argument("--format", choices=["jsonl", "csv"], default="jsonl", help="default: jsonl")
    export.add_argument("--out", metavar="FILE", help="write to FILE instead of standard output")
    for name in ("pool", "precision", "backend", "status", "key", "chain_id", "client_request_id"):
        what = "the client key VALUE (key_...)" if name == "key" else f"{name} VALUE"
        export.add_argument(
            f"--{name.replace('_', '-')}", metavar="VALUE", help=f"only the records of {what}"
        )

    return p


def _records_export(args: argparse.Namespace) -> int:
    """``qtrap-proxy records export``: one line on stderr and status 2 for bad input."""
    from qtrap_proxy.ledger import export, export_url
    from qtrap_proxy.query import FILTER_PARAMS, parse_filter

    given = {name: getattr(args, name) for name in FILTER_PARAMS if getattr(args, name, None) is not None}
    out = None
    try:
        try:
            filt = parse_filter(given)
        except QtrapError as e:
            flag = (e.param or "filter").replace("_", "-")
            raise ConfigError(f"--{flag}: {e.message}") from e
        if args.ledger_url is not None:
            rows = export_url(args.ledger_url, filt, args.password_env)
        else:
            rows = export(args.ledger, filt)
        out = sys.stdout if args.out is None else open(args.out, "w", encoding="utf-8", newline="")  # noqa: SIM115
        n = write_records(rows, out, args.format)
    except ConfigError as e:
        print(f"qtrap-proxy: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if isinstance(e, BrokenPipeError):  # `| head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        print(f"qtrap-proxy: --out: {e}", file=sys.stderr)
        return 2
    finally:
        if out is not None and out is not sys.stdout:
            out.close()
    if args.out is not None:
        print(f"{n} records written to {args.out}", file=sys.stderr)
    return 0


# the CSV columns: the record's scalar fields (start_utc: start_unix_s in RFC 3339)
CSV_COLUMNS = (
    "id", "client_request_id", "chain_id", "hop", "key_id", "route", "stream", "pool", "backend", "precision",
    "status", "http_status", "error", "start_unix_s", "start_utc", "prompt_tokens", "completion_tokens",
    "ttft_s", "e2e_s", "chunks", "tokens_exact", "meter", "final", "energy_j", "idle_energy_j", "j_per_token",
    "error_bound_j", "energy_null_reason", "facts", "facts_reason", "energy_proxy_view_j",
)  # fmt: skip


def write_records(rows: Iterable[Mapping[str, Any]], out: TextIO, fmt: str) -> int:
    """Write records as JSON Lines or CSV; the number written."""
    n = 0
    if fmt == "jsonl":
        for rec in rows:
            out.write(json.dumps(rec, separators=(",", ":"), ensure_ascii=False) + "\n")
            n += 1
        return n
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for rec in rows:
        start = rec.get("start_unix_s")
        cells = {**rec, "start_utc": _rfc3339(start) if isinstance(start, int | float) else None}
        writer.writerow(["" if cells.get(c) is None else _cell(cells[c]) for c in CSV_COLUMNS])
        n += 1
    return n


def _cell(v: Any) -> Any:
    return ("true" if v else "false") if isinstance(v, bool) else v


def _rfc3339(unix_s: float) -> str:
    return dt.datetime.fromtimestamp(unix_s, dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _routing_seed(args: argparse.Namespace) -> int:
    """``qtrap-proxy routing seed``: one line on stderr and status 2 for bad input."""
    from qtrap_proxy.cost import seed_table
    from qtrap_proxy.costseed import bucket_label, read_seed

    try:
        precisions: list[str] | None = None
        if args.config is not None:
            cfg = load_config(args.config)
            precisions = sorted({b.precision for b in cfg.backends if b.pool == args.pool})
            if not precisions:
                pools = sorted({b.pool for b in cfg.backends})
                raise ConfigError(f"--pool: {args.pool!r} is not served (pools: {', '.join(pools)})")
        seed = read_seed(args.report)
        table = seed_table(seed, precisions)
        if not table:
            raise ConfigError(
                f"{args.report}: no level at a precision pool {args.pool} serves ({', '.join(precisions or [])})"
            )
    except ConfigError as e:
        print(f"qtrap-proxy: {e}", file=sys.stderr)
        return 2
    rows = [
        {
            "precision": p,
            "load": bucket_label(b),
            "j_per_token": mean,
            "stderr": se,
            "levels": n,
        }
        for (p, b), (mean, se, n) in table.items()
    ]
    if args.json:
        print(json.dumps({"pool": args.pool, "report": seed.path, "model": seed.model, "seed": rows}))
        return 0
    print(
        f"pool {args.pool}: seed from {seed.path} (run on model {seed.model or '?'}; "
        f"{len(seed.levels)} levels, {seed.skipped} without J/token skipped)"
    )
    print(f"{'PRECISION':<10} {'LOAD':>7} {'J/TOKEN':>10} {'STDERR':>10} {'LEVELS':>6}")
    for r in rows:
        print(
            f"{r['precision']:<10} {r['load']:>7} {r['j_per_token']:>10.4g} {r['stderr']:>10.3g} {r['levels']:>6}"
        )
    return 0


def _keys(args: argparse.Namespace) -> int:
    """``qtrap-proxy keys ACTION``: one line on stderr and status 2 for any bad input or store problem."""
    try:
        if args.keys_command == "admin":
            secret = keystore.new_secret(keystore.ADMIN_PREFIX)
            print(f"QTRAP_ADMIN_KEY={secret}")
            print(f"admin_key_sha256: {keystore.hash_secret(secret)}")
            return 0
        pools: list[str] | None = None
        if args.config is not None:
            cfg = load_config(args.config)
            path = cfg.keys_path
            pools = sorted({b.pool for b in cfg.backends})
        else:
            path = args.keys_path
        if args.keys_command == "create":
            return _keys_create(args, path, pools)
        store = keystore.KeyStore(path, create=False)
        if args.keys_command == "list":
            return _keys_list(store, args.json)
        key, changed = store.revoke(keystore.check_key_id(args.key_id))
        when = _when(key.revoked_unix_s)
        print(f"{key.id} revoked at {when}" if changed else f"{key.id} was already revoked at {when}")
        return 0
    except QtrapDomainError as e:  # a bad key id, name, pools or expiry, the store, the configuration
        print(f"qtrap-proxy: {e}", file=sys.stderr)
        return 2


def _keys_create(args: argparse.Namespace, path: str, served: list[str] | None) -> int:
    name = None if args.name is None else keystore.check_name(args.name)
    pools = keystore.check_pools(p.strip() for p in args.pools.split(",") if p.strip())
    unknown = [p for p in pools if served is not None and p not in served]
    if unknown:
        raise KeyStoreError(f"--pools: {', '.join(unknown)} not served (pools: {', '.join(served or [])})")
    expires = None if args.expires is None else keystore.parse_expiry(args.expires)
    key, secret = keystore.KeyStore(path).create(name, pools, expires)
    if args.json:
        print(json.dumps({**key.public(), "secret": secret}))
        return 0
    print(
        f"created {key.id} (name {key.name or '-'}, pools {','.join(key.pools) or 'all'}, "
        f"expires {_when(key.expires_unix_s) if key.expires_unix_s else 'never'}) in {path}"
    )
    print(secret)
    print("the secret is shown only now: the store keeps its SHA-256", file=sys.stderr)
    return 0


def _keys_list(store: keystore.KeyStore, as_json: bool) -> int:
    now = time.time()
    keys = [k.public(now) for k in store.all_keys()]
    if as_json:
        print(json.dumps({"keys": keys}))
        return 0
    rows = [("ID", "NAME", "POOLS", "STATE", "CREATED", "EXPIRES", "REVOKED")]
    rows += [
        (
            k["id"],
            k["name"] or "-",
            ",".join(k["pools"]) or "all",
            k["state"],
            _when(k["created_unix_s"]),
            _when(k["expires_unix_s"]),
            _when(k["revoked_unix_s"]),
        )
        for k in keys
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def _when(unix_s: float | None) -> str:
    if unix_s is None:
        return "-"
    return dt.datetime.fromtimestamp(unix_s, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _grafana(args: argparse.Namespace) -> int:
    from qtrap_proxy.grafana.push import PushError, push

    if not args.token:
        print("qtrap-proxy: grafana push needs --token (or GRAFANA_TOKEN)", file=sys.stderr)
        return 2
    try:
        lines = push(args.url, args.token, folder=args.folder, directory=args.dir, timeout_s=args.timeout)
    except PushError as e:
        print(f"qtrap-proxy: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


def _summary(cfg: ProxyConfig) -> str:
    lines = []
    pools: dict[str, list[str]] = {}
    for b in cfg.backends:
        pools.setdefault(b.pool, []).append(f"{b.precision}:{b.name} ({b.kind} {b.display_url})")
    for pool, items in pools.items():
        pc = cfg.pools.get(pool)
        routing = "" if pc is None or pc.routing == "round_robin" else f", routing {pc.routing}"
        lines.append(f"pool {pool} (default precision {cfg.default_precision(pool)}{routing})")
        lines.extend(f"  {it}" for it in items)
    lc = cfg.ledger
    if lc.url is not None:
        lines.append(f"ledger: PostgreSQL {redact(lc.url)} (password, unless in the URL: ${lc.password_env})")
    else:
        lines.append(f"ledger: SQLite {lc.path}")
    a = cfg.auth
    if a.enabled:
        admin = "auth.admin_key_sha256" if a.admin_key_sha256 else f"${a.admin_key_env}"
        lines.append(f"auth: on (keys {cfg.keys_path}, admin key from {admin})")
    else:
        lines.append("auth: off (no API keys asked for)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "grafana":
        return _grafana(args)
    if args.command == "keys":
        return _keys(args)
    if args.command == "routing":
        return _routing_seed(args)
    if args.command == "records":
        return _records_export(args)
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"qtrap-proxy: {e}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        if cfg.auth.enabled:
            from qtrap_proxy.auth import admin_digest

            try:
                admin_digest(cfg.auth)
            except ConfigError as e:
                print(f"qtrap-proxy: {e}", file=sys.stderr)
                return 2
        print(_summary(cfg))
        return 0
    if args.host is not None:
        cfg.server.host = args.host
    if args.port is not None:
        cfg.server.port = args.port
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from qtrap_proxy.server import serve

    try:
        return serve(cfg, log_level=args.log_level, access_log=args.access_log)
    except ConfigError as e:  # found while building the proxy (e.g. an unwritable ledger path)
        print(f"qtrap-proxy: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
