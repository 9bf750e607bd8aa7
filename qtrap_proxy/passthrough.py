"""vLLM's ``POST /tokenize`` and ``POST /detokenize``, passed through to a vLLM backend of the pool.

These run on the engine's CPU, not its GPU: no record, no energy, not in ``qtrap_requests_total``. The
model is resolved as on the serving routes (a pool, ``pool@precision``, an upstream id; without
``model`` the only pool, if there is one) and rewritten to the backend's upstream id; the answer is
relayed with the backend's status and body, plus ``x-qtrap-backend`` and ``x-qtrap-precision`` (no
``x-qtrap-request-id``: there is no record). Errors
in OpenAI's shape; the backend unreachable or silent: 502 / 504. With auth on a client key must be
allowed the pool (403), and its Authorization never goes upstream (the gate has removed it).
"""

from __future__ import annotations

from qtrap_common.asgi import Receive, Scope, Send, header, relay_headers, send_full
from qtrap_proxy.asgi import read_body
from qtrap_proxy.auth import principal_of
from qtrap_proxy.errors import BadRequest, Forbidden, QtrapError
from qtrap_proxy.limits import check_model, dump_json_object, parse_json_object, parse_qtrap_headers
from qtrap_proxy.proxy import H_BACKEND, H_PRECISION, Proxy
from qtrap_proxy.timeline import new_request_id

_VLLM = frozenset({"vllm"})
_JSON = b"application/json"


class PassthroughRoute:
    """A raw ASGI endpoint relaying one vLLM utility route (``path``) to a vLLM backend."""

    def __init__(self, proxy: Proxy, path: str) -> None:
        self.proxy = proxy
        self.path = path
        self.forward = frozenset(name.encode() for name in proxy.config.server.forward_headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        proxy = self.proxy
        # names the call in the backend's log (X-Request-Id); never sent to the client: no record has it
        rid = new_request_id()
        try:
            body = parse_json_object(await read_body(scope, receive, proxy.config.server.max_body_bytes))
            headers = parse_qtrap_headers(scope["headers"])
            model = body.get("model")
            if model is None:
                pools = list(proxy.router.pools)
                if len(pools) != 1:
                    raise BadRequest(
                        "`model` is required when the proxy serves more than one pool", param="model"
                    )
                model = pools[0]
            model = check_model(model, "model")
            pool, precision = proxy.router.resolve(model, headers.precision, _VLLM)
            who = principal_of(scope)
            if who is not None and not who.may_use(pool):
                raise Forbidden(f"this API key may not use pool {pool!r}", param="model")
            backend = proxy.router.choose(pool, precision, _VLLM)
            body["model"] = backend.cfg.model
            forwarded = [
                (k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k in self.forward
            ]
            own = [(H_BACKEND, backend.name.encode()), (H_PRECISION, backend.precision.encode())]
            client_auth = None if who is not None else header(scope, b"authorization")
            async with backend.post(
                self.path, dump_json_object(body), rid, client_auth, forwarded=forwarded
            ) as resp:
                data = await resp.read()
                await send_full(send, resp.status, data, relay_headers(resp.raw_headers) + own, None)
        except QtrapError as e:
            await send_full(send, e.status, e.openai_body(), [], _JSON)
        except OSError:  # the client went away
            pass
