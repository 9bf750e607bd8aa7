"""The HTTP edge of everything but the relay: the admin API, health, the model list, metrics, the spec.

``GET /v1/models``, ``GET /health``, ``GET /metrics``, ``GET /openapi.json`` and the ``/qtrap/v1/*``
routes (the records query and a request's record, usage sums, a chain and its score, the energy report,
the backends and their engines, the cost routing table, the keys and a key's usage).
Handlers check what the client sent (``limits.py``), ask the proxy's parts (the record store, the
energy service, the key ring, the backends' probes) and answer in OpenAI's error shape; a client key
(auth.py's ``Principal``) sees only what it owns, and another key's records are not found either; the
records query and usage sums are limited to its own records, and naming another key there is a 403.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from qtrap_common import wire
from qtrap_proxy.asgi import read_body
from qtrap_proxy.auth import Principal, principal_of
from qtrap_proxy.errors import BadRequest, Forbidden, LedgerUnavailable, QtrapError, openai_error_body
from qtrap_proxy.keystore import KEY_ID
from qtrap_proxy.limits import (
    MAX_ADMIN_BODY_BYTES,
    bounded,
    check_hops,
    check_id,
    parse_json_object,
    parse_page,
    parse_time,
)
from qtrap_proxy.openapi import build_openapi
from qtrap_proxy.probes import engine_info
from qtrap_proxy.proxy import Proxy
from qtrap_proxy.query import RecordFilter, parse_record_query, parse_usage_query


def routes(proxy: Proxy) -> list[Route]:
    """The routes of this edge, bound to ``proxy``'s parts."""
    records = proxy.records

    async def models(request: Request) -> JSONResponse:
        return JSONResponse(model_list(proxy, principal_of(request.scope)))

    async def model(request: Request) -> Response:
        mid = request.path_params["model_id"]
        for entry in model_list(proxy, principal_of(request.scope))["data"]:
            if entry["id"] == mid:
                return JSONResponse(entry)
        # a pool a client key may not use is not found either
        return Response(
            openai_error_body(
                f"The model {bounded(repr(mid), 256)} does not exist.",
                "not_found_error",
                "model",
                "model_not_found",
            ),
            status_code=404,
            media_type="application/json",
        )

    async def health(_: Request) -> JSONResponse:
        code, body = await health_report(proxy)
        return JSONResponse(body, status_code=code)

    async def live(_: Request) -> JSONResponse:
        # the process is up and its event loop answers: nothing else is asked (a liveness probe that
        # failed on a backend or the ledger would restart a proxy that a restart cannot mend)
        return JSONResponse({"status": "ok"})

    async def ready(_: Request) -> JSONResponse:
        code, body = await ready_report(proxy)
        return JSONResponse(body, status_code=code)

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(proxy.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def request_record(request: Request) -> Response:
        try:
            rid = check_id(request.path_params["request_id"], "request id")
        except QtrapError as e:
            return _qtrap_error(e)
        rec = await records.record(rid)
        who = principal_of(request.scope)
        if rec is None or (who is not None and not who.may_see(rec.get("key_id"))):
            # another key's record is not found either: a key cannot tell others' ids from unknown ones
            return _error(404, f"no record of request {rid!r}", "not_found_error")
        return JSONResponse(rec)

    async def chain_record(request: Request) -> Response:
        try:
            cid = check_id(request.path_params["chain_id"], "chain id")
            offset, limit = parse_page(request.query_params.get("offset"), request.query_params.get("limit"))
        except QtrapError as e:
            return _qtrap_error(e)
        rec = await records.chain_page(cid, offset, limit, principal_of(request.scope))
        if rec is None:
            return _error(404, f"no record of chain {cid!r}", "not_found_error")
        return JSONResponse(rec)

    async def chain_score(request: Request) -> Response:
        try:
            cid = check_id(request.path_params["chain_id"], "chain id")
            raw = await read_body(request.scope, request.receive, MAX_ADMIN_BODY_BYTES)
            body = parse_json_object(raw)
            if not isinstance(body.get("correct"), bool):
                raise BadRequest("'correct' must be true or false", param="correct")
            hops = body.get("hops")
            if hops is not None:
                hops = check_hops(hops, "hops")
            res = await records.score_chain(cid, body["correct"], hops, principal_of(request.scope))
        except QtrapError as e:
            return _qtrap_error(e)
        if res is None:
            return _error(404, f"no record of chain {cid!r}", "not_found_error")
        return JSONResponse(res)

    async def energy(_: Request) -> JSONResponse:
        return JSONResponse({**proxy.energy.energy_report(), "carbon": proxy.carbon.state()})

    async def routing(_: Request) -> JSONResponse:
        return JSONResponse(routing_report(proxy))

    async def backends(_: Request) -> JSONResponse:
        return JSONResponse(await backends_report(proxy))

    async def keys(_: Request) -> Response:
        if proxy.key_ring is None:
            return _error(
                404, "authentication is off (auth.enabled: false): there are no keys", "not_found_error"
            )
        now = time.time()
        return JSONResponse({"keys": [k.public(now) for k in proxy.key_ring.all_keys()]})

    async def key_usage(request: Request) -> Response:
        raw = request.path_params["key_id"]
        who = principal_of(request.scope)
        if proxy.key_ring is None or who is None:
            return _error(
                404, "authentication is off (auth.enabled: false): there are no keys", "not_found_error"
            )
        if not KEY_ID.fullmatch(raw) or not who.may_see(raw):  # another key's usage is not found either
            return _error(404, f"no key {bounded(repr(raw), 80)}", "not_found_error")
        try:
            q = request.query_params
            since = parse_time(q["since"], "since") if "since" in q else 0.0
            until = parse_time(q["until"], "until") if "until" in q else time.time() + 1.0
        except QtrapError as e:
            return _qtrap_error(e)
        usage = await records.key_usage(raw, since, until)
        if usage is None:
            return _error(404, f"no key {raw}", "not_found_error")
        return JSONResponse(usage)

    async def list_requests(request: Request) -> Response:
        try:
            query = parse_record_query(request.query_params.multi_items())
            query = replace(query, filter=_owned(query.filter, principal_of(request.scope)))
        except QtrapError as e:
            return _qtrap_error(e)
        return JSONResponse(await records.list_records(query))

    async def usage(request: Request) -> Response:
        try:
            filt, group_by = parse_usage_query(request.query_params.multi_items())
            filt = _owned(filt, principal_of(request.scope))
        except QtrapError as e:
            return _qtrap_error(e)
        return JSONResponse(await records.usage(filt, group_by))

    spec = orjson.dumps(build_openapi(proxy.config.server))

    async def openapi(_: Request) -> Response:
        return Response(spec, media_type="application/json")

    return [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/health/live", live, methods=["GET"]),
        Route("/health/ready", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route(wire.REQUESTS_PATH, list_requests, methods=["GET"]),
        Route(wire.REQUEST_PATH, request_record, methods=["GET"]),
        Route(wire.USAGE_PATH, usage, methods=["GET"]),
        Route(wire.CHAIN_PATH, chain_record, methods=["GET"]),
        Route(wire.CHAIN_SCORE_PATH, chain_score, methods=["POST"]),
        Route(wire.ENERGY_PATH, energy, methods=["GET"]),
        Route(wire.ROUTING_PATH, routing, methods=["GET"]),
        Route(wire.BACKENDS_PATH, backends, methods=["GET"]),
        Route(wire.KEYS_PATH, keys, methods=["GET"]),
        Route(wire.KEY_USAGE_PATH, key_usage, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]


async def http_error(_: Request, exc: Exception) -> Response:
    """Starlette's own 404 and 405 (no such path, method not allowed) in OpenAI's error shape."""
    assert isinstance(exc, HTTPException)
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    response = _error(exc.status_code, str(exc.detail), kind)
    response.headers.update(exc.headers or {})  # a 405 carries Allow
    return response


async def ledger_error(_: Request, exc: Exception) -> Response:
    """A read the ledger's database cannot answer now (a PostgreSQL ledger down or restarting): 503."""
    assert isinstance(exc, LedgerUnavailable)
    return _qtrap_error(exc)


async def health_report(proxy: Proxy) -> tuple[int, dict[str, Any]]:
    """The backends' probes (at most ``server.health_cache_s`` old) and the ledger's state (now)."""
    results = await proxy.probes.results()
    pools_up: dict[str, bool] = {}
    out = []
    for b, h in zip(proxy.backends, results, strict=True):
        proxy.metrics.backend_up.labels(b.name).set(1 if h.ok else 0)
        pools_up[b.pool] = pools_up.get(b.pool, False) or h.ok
        out.append(
            {
                "name": b.name,
                "pool": b.pool,
                "precision": b.precision,
                "kind": b.kind,
                "url": b.cfg.display_url,
                "ok": h.ok,
                "http_status": h.status,
                "latency_s": h.latency_s,
                "error": h.error,
            }
        )
    ledger = proxy.ledger.state()
    if all(h.ok for h in results) and ledger["status"] == "ok":
        status = "ok"
    elif all(pools_up.values()):
        status = "degraded"  # a backend down, or records not being persisted: still serving
    else:
        status = "down"
    code = 503 if status == "down" else 200  # only the pools take the proxy out of a load balancer
    return code, {"status": status, "pools": pools_up, "backends": out, "ledger": ledger}


async def backends_report(proxy: Proxy) -> dict[str, Any]:
    """Each backend as configured (pool, precision, kind, URL without credentials, model, devices) and what
    its engine says it is (``probes.engine_info``: name, version, served model, context length), asked
    now, within ``server.health_timeout_s``."""
    timeout = proxy.config.server.health_timeout_s
    infos = await asyncio.gather(*(engine_info(b, timeout) for b in proxy.backends))
    return {
        "backends": [
            {
                "name": b.name,
                "pool": b.pool,
                "precision": b.precision,
                "kind": b.kind,
                "url": b.cfg.display_url,
                "model": b.cfg.model,
                "devices": [f"{d.host}:{d.index}" for d in b.cfg.devices],
                **info,
            }
            for b, info in zip(proxy.backends, infos, strict=True)
        ]
    }


async def ready_report(proxy: Proxy) -> tuple[int, dict[str, Any]]:
    """Readiness: 200 when every pool has a backend whose probe passed and the ledger is writable (its
    writer runs and its last commit succeeded: status ``ok``), else 503 with ``reasons``. The probes are
    ``GET /health``'s (at most ``server.health_cache_s`` old)."""
    _, report = await health_report(proxy)
    reasons = [
        f"pool {pool}: no backend passed its health probe" for pool, up in report["pools"].items() if not up
    ]
    ledger = report["ledger"]
    if ledger["status"] != "ok":
        reasons.append(f"ledger {ledger['status']}: {ledger.get('reason') or 'not committing'}")
    return (503 if reasons else 200), {
        "status": "not_ready" if reasons else "ready",
        "reasons": reasons,
        "pools": report["pools"],
        "ledger": ledger["status"],
    }


def routing_report(proxy: Proxy) -> dict[str, Any]:
    """Each pool's routing; for each ``routing: cost`` pool its cost table (cost.py ``CostPolicy.table``)."""
    cost = proxy.cost
    return {
        "pools": [] if cost is None else cost.table(),
        "round_robin_pools": sorted(p for p in proxy.router.pools if cost is None or not cost.handles(p)),
    }


def model_list(proxy: Proxy, who: Principal | None = None) -> dict[str, Any]:
    """The pools and ``pool@precision`` ids, in OpenAI's list format (a client key: its pools only).

    ``root`` is the upstream model id (vLLM's meaning: what the weights are; guidellm finds the tokenizer
    by it): for a pool, its default precision's first backend's ``model``; for ``pool@precision``, that
    precision's first backend's. ``parent`` of a ``pool@precision`` entry is its pool."""
    created = proxy.started_unix_s
    router = proxy.router
    data = []
    for pool, precisions in router.pools.items():
        if who is not None and not who.may_use(pool):
            continue
        default = precisions.get(router.default_precision[pool]) or next(iter(precisions.values()))
        data.append(
            {
                "id": pool,
                "object": "model",
                "created": created,
                "owned_by": "qtrap",
                "root": default[0].cfg.model,
                "parent": None,
            }
        )
        for precision, backends in precisions.items():
            data.append(
                {
                    "id": f"{pool}@{precision}",
                    "object": "model",
                    "created": created,
                    "owned_by": "qtrap",
                    "root": backends[0].cfg.model,
                    "parent": pool,
                }
            )
    return {"object": "list", "data": data}


def _owned(filt: RecordFilter, who: Principal | None) -> RecordFilter:
    """A client key's query limited to its own records; ``key=`` naming another key is refused (403: a
    client key may not read, nor learn anything of, another key's records). Auth off, or the admin
    key: as asked."""
    if who is None or who.key is None:
        return filt
    if filt.key_id is not None and filt.key_id != who.key.id:
        raise Forbidden(
            "a client key sees only its own records: key must be its own id or left out", param="key"
        )
    return filt.restricted_to(who.key.id)


def _qtrap_error(e: QtrapError) -> Response:
    return Response(e.openai_body(), status_code=e.status, media_type="application/json")


def _error(status: int, message: str, kind: str) -> Response:
    return Response(
        openai_error_body(message, kind, None, status), status_code=status, media_type="application/json"
    )
