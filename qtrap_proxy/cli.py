"""``qtrap-proxy``: command line. Thin: validate, then call one entry point."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

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

    return p


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
        lines.append(f"pool {pool} (default precision {cfg.default_precision(pool)})")
        lines.extend(f"  {it}" for it in items)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "grafana":
        return _grafana(args)
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
        return serve(cfg, log_level=args.log_level, access_log=args.access_log)
    except ConfigError as e:  # found while building the proxy (e.g. an unwritable ledger path)
        print(f"qtrap-proxy: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
