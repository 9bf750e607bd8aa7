"""URLs without credentials, messages without addresses (qtrap_proxy/redact.py)."""

from __future__ import annotations

from qtrap_proxy.redact import redact_url, redact_urls_in, scrub_addresses


def test_user_information_is_removed_from_urls() -> None:
    assert redact_url("http://user:pw@gpu-node-1:8000/v1") == "http://***@gpu-node-1:8000/v1"
    assert redact_url("https://token@host/x?y=1") == "https://***@host/x?y=1"
    assert redact_url("http://[::1]:9400/metrics") == "http://[::1]:9400/metrics"
    assert redact_url("http://u:p@[::1]:9400/metrics") == "http://***@[::1]:9400/metrics"
    assert redact_url("http://gpu-node-1:8000") == "http://gpu-node-1:8000"
    assert redact_urls_in("GET http://a:b@h:1/m failed") == "GET http://***@h:1/m failed"


def test_addresses_are_scrubbed_from_messages() -> None:
    m = "ClientConnectorError: Cannot connect to host 10.0.3.7:8000 ssl:default [Connection refused]"
    assert (
        scrub_addresses(m)
        == "ClientConnectorError: Cannot connect to host <address> ssl:default [Connection refused]"
    )
    assert "gpu-node-1" not in scrub_addresses("http://u:p@gpu-node-1:8000/v1 refused")
    assert scrub_addresses("no address here: 3 tokens") == "no address here: 3 tokens"
    m = "Multiple exceptions: [Errno 111] Connect call failed ('127.0.0.1', 56977), failed ('::1', 56977, 0, 0)"
    assert "127.0.0.1" not in scrub_addresses(m) and "56977" not in scrub_addresses(m)
