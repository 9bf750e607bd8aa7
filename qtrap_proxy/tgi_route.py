"""TGI's native routes: ``POST /generate``, ``POST /generate_stream`` and ``POST /`` (compat).

Bodies are relayed unchanged. TGI requests carry no model name, so the pool is
the ``x-qtrap-model`` header (``pool`` or ``pool@precision``), or the only pool
that has TGI backends. Errors use TGI's shape, ``{"error": ..., "error_type": ...}``,
which TGI's own ``text-generation`` client parses.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import orjson

from qtrap_common.asgi import Scope
from qtrap_proxy.cost import Decision
from qtrap_proxy.edge import EdgeRoute
from qtrap_proxy.errors import BadRequest, QtrapError
from qtrap_proxy.limits import ClientHeaders, check_model, parse_json_object
from qtrap_proxy.proxy import Proxy
from qtrap_proxy.relay import Prepared, StreamFilter
from qtrap_proxy.sse import data_of
from qtrap_proxy.timeline import Timeline

_TGI = frozenset({"tgi"})


class TGIStreamFilter(StreamFilter):
    """Every TGI stream event carries exactly one generated token."""

    __slots__ = ("tl",)

    def __init__(self, tl: Timeline) -> None:
        self.tl = tl
        self.upstream_error = None
        tl.tokens_exact = True

    def process(self, events: list[bytes], now: float) -> bytes:
        tokens = 0
        for ev in events:
            payload = data_of(ev)
            if not payload:
                continue
            if payload.startswith(b'{"error"') or b'"error_type"' in payload:
                self.upstream_error = payload[:300].decode("utf-8", "replace")
                continue
            if b'"token"' in payload:
                tokens += 1
        if tokens:
            self.tl.add_chunk(now, tokens)
        return b"\n\n".join(events) + b"\n\n"

    def error_event(self, err: QtrapError) -> bytes:
        # TGI's own type for a generation cut short; its client raises IncompleteGenerationError.
        return (
            b"data:" + orjson.dumps({"error": err.message, "error_type": "incomplete_generation"}) + b"\n\n"
        )


class TGIRoute(EdgeRoute):
    def __init__(self, proxy: Proxy, path: str) -> None:
        super().__init__(proxy)
        self.path = path
        self.route_name = "tgi_" + (path.strip("/") or "compat")

    def error_body(self, err: QtrapError) -> bytes:
        return err.tgi_body()

    def _route(self, headers: ClientHeaders, tl: Timeline) -> Decision:
        router = self.proxy.router
        model = headers.model
        if model is None:
            tgi_pools = sorted({b.pool for b in router.backends if b.kind == "tgi"})
            if len(tgi_pools) != 1:
                raise BadRequest(
                    "set the x-qtrap-model header to choose a pool "
                    f"(pools with TGI backends: {', '.join(tgi_pools) or 'none'})",
                    param="x-qtrap-model",
                )
            model = tgi_pools[0]
        model = check_model(model, "x-qtrap-model")
        return router.route(model, headers.precision, kinds=_TGI, chain_id=tl.chain_id)

    def prepare_checked(self, scope: Scope, body: bytes, tl: Timeline, headers: ClientHeaders) -> Prepared:
        req = parse_json_object(body)
        if not isinstance(req.get("inputs"), str) or not req["inputs"]:
            raise BadRequest("`inputs` is required and must be a non-empty string", param="inputs")
        params = req.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise BadRequest("`parameters` must be an object", param="parameters")
        decision = self._route(headers, tl)
        backend = decision.backend
        tl.routing, tl.route_reason = decision.policy, decision.reason
        stream = self.path == "/generate_stream" or (self.path == "/" and req.get("stream") is True)
        return Prepared(backend, self.path, body, stream, TGIStreamFilter(tl) if stream else None)

    def account_full_body(self, tl: Timeline, body: bytes, headers: Mapping[str, str]) -> None:
        now = time.monotonic()
        pt, gt = headers.get("x-prompt-tokens"), headers.get("x-generated-tokens")
        if pt is not None and pt.isdigit():
            tl.prompt_tokens = int(pt)
        if gt is not None and gt.isdigit():
            tl.completion_tokens = int(gt)
        else:
            try:
                obj = orjson.loads(body)
            except orjson.JSONDecodeError:
                obj = None
            if isinstance(obj, list) and obj:
                obj = obj[0]
            details = obj.get("details") if isinstance(obj, dict) else None
            if isinstance(details, dict) and isinstance(details.get("generated_tokens"), int):
                tl.completion_tokens = details["generated_tokens"]
        if tl.completion_tokens is not None:
            tl.tokens_exact = True
            tl.add_chunk(now, tl.completion_tokens)
