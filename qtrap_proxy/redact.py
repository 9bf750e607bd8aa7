"""What the proxy says about its backends to whoever can reach it: no credentials, and by default no
addresses either.

A backend URL may carry credentials (``http://user:secret@gpu-node-1:8000``) and its address is internal:
``/health``, the energy report, logs and ``qtrap-proxy check-config`` show URLs with the user information
removed, and the 502/504 answers clients get name the backend, not where it lives, unless the backend's
``expose_address`` is set (HTTP clients' connection errors spell out host and port).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")
_SOCKADDR = re.compile(r"\(\s*'[^']*'\s*,\s*\d+[^)]*\)")  # ('10.0.3.7', 8000) as OSError prints it
_IPV4 = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b")
_HOST_PORT = re.compile(r"\b(?:\[[0-9a-fA-F:.]+\]|[a-zA-Z0-9](?:[a-zA-Z0-9.-]*[a-zA-Z0-9])?):\d{1,5}\b")


def redact_url(url: str) -> str:
    """``url`` without user name and password (``http://***@host:port/path`` when it had them)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return _URL.sub("<url>", url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def redact_urls_in(text: str) -> str:
    """``text`` with the user information of every URL in it removed."""
    return _URL.sub(lambda m: redact_url(m.group(0)), text)


def scrub_addresses(text: str) -> str:
    """``text`` with URLs, ``host:port`` pairs, socket addresses and IPv4 addresses replaced by ``<address>``."""
    text = _SOCKADDR.sub("<address>", _URL.sub("<address>", text))
    return _IPV4.sub("<address>", _HOST_PORT.sub("<address>", text))
