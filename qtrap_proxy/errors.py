"""The proxy's exceptions, in two families.

Everything that can go wrong while serving a request is raised as a subclass of
:class:`QtrapError`; the HTTP edge (``openai_route``/``tgi_route``) turns it into a
status code and an error body. Nothing below the edge knows about HTTP bodies.

What goes wrong outside a request (the configuration, the key store, the energy meter)
is a :class:`QtrapDomainError`: it carries no HTTP status, since no client is ever
answered with it; the CLI prints it, start-up refuses to run, background work logs it.
"""

from __future__ import annotations

from typing import Any

import orjson


class QtrapError(Exception):
    """Base class. ``status`` is the HTTP status the edge answers with."""

    status: int = 500
    type: str = "internal_error"
    code: str | None = None
    label: str = "upstream_error"  # the ``status`` label of qtrap_requests_total

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def openai_body(self) -> bytes:
        """The error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""
        return openai_error_body(self.message, self.type, self.param, self.code)

    def tgi_body(self) -> bytes:
        """The error in TGI's native shape: ``{"error": "...", "error_type": "..."}``."""
        return orjson.dumps({"error": self.message, "error_type": self.type})


def openai_error_body(message: str, type_: str, param: str | None = None, code: Any = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


class QtrapDomainError(Exception):
    """Base class of the errors raised outside a request (no HTTP status: never answered to a client)."""


class ConfigError(QtrapDomainError):
    """The configuration file or environment is invalid (raised at start-up, never per request)."""


class BadRequest(QtrapError):
    status = 400
    label = "bad_request"
    type = "invalid_request_error"


class NotFound(QtrapError):
    status = 404
    label = "not_found"
    type = "invalid_request_error"
    code = "model_not_found"


class Unauthorized(QtrapError):
    """No API key, or one that is unknown, expired or revoked (``auth.enabled``); answered with
    ``WWW-Authenticate: Bearer``."""

    status = 401
    label = "unauthorized"
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(QtrapError):
    """A valid key that may not do this: a pool outside its allow-list, a client key on an admin
    route, the admin key on a serving route, or scoring a chain another key owns."""

    status = 403
    label = "forbidden"
    type = "invalid_request_error"
    code = "permission_denied"


class KeyStoreError(QtrapDomainError):
    """The key store (``auth.keys_path``) cannot be opened, read or written, or a key's id, name, pools
    or expiry is invalid (the CLI and start-up; never per request)."""


class PayloadTooLarge(QtrapError):
    status = 413
    label = "too_large"
    type = "invalid_request_error"
    code = "request_too_large"


class RequestTimeout(QtrapError):
    """The client stalled while sending its request's body (nginx's 408); its connection is closed."""

    status = 408
    label = "client_disconnected"  # qtrap_requests_total: the client never completed its request
    type = "invalid_request_error"
    code = "request_timeout"


class InternalError(QtrapError):
    """A bug: something other than a QtrapError escaped a route's validation. Answered in the route's error
    shape with the request id, and accounted, like any other failed request (never a bare 500)."""

    status = 500
    label = "internal_error"
    type = "internal_error"
    code = "internal_error"


class LedgerUnavailable(QtrapError):
    """The ledger's database cannot answer a read now (a PostgreSQL ledger that is down or restarting);
    records in flight and those waiting to be written are still served from memory."""

    status = 503
    label = "internal_error"  # never a request's status: raised by the admin API's reads only
    type = "server_error"
    code = "ledger_unavailable"


class ClientGone(QtrapError):
    """The client disconnected before its request was complete (nginx's 499: nobody reads the answer)."""

    status = 499
    type = "client_closed_request"
    label = "client_disconnected"


class UpstreamError(QtrapError):
    """A backend could not be used. ``backend`` names it for logs and metrics; ``reason`` is the cause as
    clients and ``/health`` may see it (no credentials, no address unless the backend exposes it) and
    ``detail`` the cause for the proxy's log (no credentials). Raised by the transports
    (``qtrap_proxy/transport.py``), which map their HTTP library's failures to these once."""

    def __init__(
        self, message: str, *, backend: str, reason: str | None = None, detail: str | None = None
    ) -> None:
        super().__init__(message)
        self.backend = backend
        self.reason = message if reason is None else reason
        self.detail = self.reason if detail is None else detail


class UpstreamConnectError(UpstreamError):
    status = 502
    label = "upstream_unreachable"
    type = "upstream_error"
    code = "upstream_unreachable"


class UpstreamTimeout(UpstreamError):
    status = 504
    label = "upstream_timeout"
    type = "upstream_error"
    code = "upstream_timeout"


class UpstreamBroken(UpstreamError):
    """The backend went away after the response had started (mid-stream)."""

    status = 502
    label = "stream_broken"
    type = "upstream_error"
    code = "upstream_stream_broken"
