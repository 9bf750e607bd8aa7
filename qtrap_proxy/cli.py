"""``qtrap-proxy``: command line. Thin: validate, then call one entry point."""

from __future__ import annotations

import argparse
import logging
import sys

from qtrap_proxy import __version__
from qtrap_proxy.config import ProxyConfig, load_config
from qtrap_proxy.errors import ConfigError


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

    return p


def _summary(cfg: ProxyConfig) -> str:
    lines = []
    pools: dict[str, list[str]] = {}
    for b in cfg.backends:
        pools.setdefault(b.pool, []).append(f"{b.precision}:{b.name} ({b.kind} {b.url})")
    for pool, items in pools.items():
        lines.append(f"pool {pool} (default precision {cfg.default_precision(pool)})")
        lines.extend(f"  {it}" for it in items)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"qtrap-proxy: {e}", file=sys.stderr)
        return 2
    if args.command == "check-config":
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
        serve(cfg, log_level=args.log_level, access_log=args.access_log)
    except ConfigError as e:  # found while building the proxy (e.g. an unwritable ledger path)
        print(f"qtrap-proxy: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
