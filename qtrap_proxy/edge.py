"""The client edge of the relay routes: ``x-qtrap-*`` headers are checked before anything reads them.

The relay (``relay.py``) reads ``x-qtrap-chain-id`` and ``x-qtrap-hop`` itself,
before the route's ``prepare``. So that no unchecked value gets that far (a
superscript digit or a 5,000-digit hop made ``int()`` raise, a hop of 10**30
reached SQLite), a request's headers are checked here first, against
``limits.py``: a request with a bad header reaches the relay without its
``x-qtrap-*`` headers and ``prepare`` raises the 400, so it is answered and
accounted like any other bad request.

With ``auth.enabled`` a key whose pool allow-list does not hold the resolved pool is refused here
(403), before anything is sent upstream: one place for every relay route.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

from qtrap_common.asgi import Receive, Scope, Send
from qtrap_proxy.auth import principal_of
from qtrap_proxy.errors import BadRequest, Forbidden, QtrapError
from qtrap_proxy.limits import HEADER_PREFIX, ClientHeaders, parse_qtrap_headers
from qtrap_proxy.proxy import AnswerEnergy
from qtrap_proxy.relay import Prepared, RelayRoute
from qtrap_proxy.timeline import Timeline
from qtrap_proxy.upstream import Backend
from qtrap_proxy.usage import add_to_usage, usage_members

_KEY = "qtrap.headers"  # the checked headers (or the error) in the request's scope


class EdgeRoute(RelayRoute):
    """A relay route whose ``x-qtrap-*`` headers are checked before the relay sees them."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            scope[_KEY] = parse_qtrap_headers(scope["headers"])
        except BadRequest as e:
            headers = [(k, v) for k, v in scope["headers"] if not k.startswith(HEADER_PREFIX)]
            scope = {**scope, "headers": headers, _KEY: e}
        await super().__call__(scope, receive, send)

    def prepare(self, scope: Scope, body: bytes, tl: Timeline) -> Prepared:
        checked = scope.get(_KEY)
        if isinstance(checked, BadRequest):
            raise checked
        if not isinstance(checked, ClientHeaders):  # called without __call__ (tests)
            checked = parse_qtrap_headers(scope["headers"])
        tl.chain_id, tl.hop = checked.chain_id, checked.hop
        prep = self.prepare_checked(scope, body, tl, checked)
        who = principal_of(scope)
        if who is not None and not who.may_use(prep.backend.pool):
            raise Forbidden(f"this API key may not use pool {prep.backend.pool!r}", param="model")
        return prep

    @abstractmethod
    def prepare_checked(self, scope: Scope, body: bytes, tl: Timeline, headers: ClientHeaders) -> Prepared:
        """Validate the body and choose a backend (the headers are checked already)."""


class OpenAIEdgeRoute(EdgeRoute):
    """An OpenAI route (chat and text completions, embeddings, responses): errors in OpenAI's shape, the
    request routed and its ``model`` rewritten to the backend's, the energy added to the answer's usage."""

    def error_body(self, err: QtrapError) -> bytes:
        return err.openai_body()

    def route_to(
        self,
        req: dict[str, Any],
        model: str,
        headers: ClientHeaders,
        tl: Timeline,
        kinds: frozenset[str] | None = None,
    ) -> Backend:
        """Route the request (pins, the pool's policy), say why on the timeline, and point the body's
        ``model`` at the chosen backend's upstream id."""
        decision = self.proxy.router.route(model, headers.precision, kinds, chain_id=tl.chain_id)
        tl.routing, tl.route_reason = decision.policy, decision.reason
        req["model"] = decision.backend.cfg.model
        return decision.backend

    def answer_body(self, tl: Timeline, body: bytes, energy: AnswerEnergy) -> bytes:
        out = add_to_usage(body, usage_members(tl, energy))
        return body if out is None else out
