"""The client's exceptions: one hierarchy, each a :class:`QtrapClientError`.

* :class:`ProxyUnreachable`: no HTTP answer (connection refused or reset, DNS, the client's timeout);
* :class:`ApiError`: the proxy answered with an error status (OpenAI's error shape: ``message``,
  ``type``, ``param``, ``code``); by status :class:`BadRequest` (400), :class:`Unauthorized` (401: no,
  unknown, expired or revoked key), :class:`Forbidden` (403: a client key on an admin route, or another
  key's records), :class:`NotFound` (404);
* :class:`ProtocolError`: a 2xx answer that is not what the admin API answers (not JSON, wrong shape:
  not a qtrap proxy, or one of another version);
* :class:`FinalTimeout`: :meth:`~qtrap_client.QtrapClient.wait_final` ran out of time; it carries the
  last record read (provisional) and is a :class:`TimeoutError` too.
"""

from __future__ import annotations

from typing import Any

from qtrap_common.wire import RequestRecord


class QtrapClientError(Exception):
    """Anything the client raises."""


class ProxyUnreachable(QtrapClientError):
    """The proxy could not be asked (no HTTP answer within the timeout)."""


class ProtocolError(QtrapClientError):
    """The proxy's answer is not what the admin API answers."""


class ApiError(QtrapClientError):
    """The proxy answered with an error status; ``message``, ``type``, ``param`` and ``code`` are those of
    its OpenAI-shaped error body (None where the body had none)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,  # OpenAI's field name
        param: str | None = None,
        code: str | None = None,
        method: str = "GET",
        path: str = "",
    ) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.method = method
        self.path = path


class BadRequest(ApiError):
    """400: a parameter the proxy refused (``param`` names it)."""


class Unauthorized(ApiError):
    """401: no key, or an unknown, expired or revoked one (``api_key=``)."""


class Forbidden(ApiError):
    """403: the key may not do this (a client key on an admin route, or another key's records)."""


class NotFound(ApiError):
    """404: no such request, chain or key (or it belongs to another client key)."""


class FinalTimeout(QtrapClientError, TimeoutError):
    """No final figure within the time given; ``record`` is the last one read (provisional), or None."""

    def __init__(self, what: str, timeout_s: float, record: RequestRecord | None = None) -> None:
        super().__init__(f"{what}: not final within {timeout_s:g} s")
        self.timeout_s = timeout_s
        self.record = record


_BY_STATUS: dict[int, type[ApiError]] = {400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound}


def api_error(status: int, body: Any, method: str, path: str) -> ApiError:
    """The exception for an error answer, from its OpenAI-shaped body when it has one."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        message = str(err.get("message") or f"HTTP {status}")
        fields = {k: (str(err[k]) if err.get(k) is not None else None) for k in ("type", "param", "code")}
    else:
        message = f"HTTP {status}" if not isinstance(err, str) else err
        fields = {"type": None, "param": None, "code": None}
    cls = _BY_STATUS.get(status, ApiError)
    return cls(status, message, method=method, path=path, **fields)
