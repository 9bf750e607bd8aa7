"""Every reason a figure of energy is unknown, in one place.

Energy never reads 0 when it is unknown: the figure is null and a reason says why (a record's
``energy_null_reason``, a chain summary's and a key's usage ``energy_null_reason``). The texts are part of
what clients read (tests and loadgen's reports quote them), so they are written here once and only
referred to elsewhere.
"""

from __future__ import annotations

from typing import Final

# -- a request's record (Tracked.unknown_reason -> the record's energy_null_reason) ----------------------
NO_METER: Final = "no energy meter configured (meter.kind: null)"
REJECTED: Final = "request rejected before it reached a backend"
STOPPED: Final = "proxy stopped before the final reading"
# at answer time (the `usage.qtrap` object of an OpenAI answer): measured, but no reading covers it yet
NOT_MEASURED_YET: Final = (
    "no meter reading has covered this request yet; its final figure will be in its record (record_url)"
)


def no_devices(backend: str) -> str:
    """The request's backend lists no devices to meter."""
    return f"backend {backend} lists no devices"


def meter_down(device: str, error: str | None) -> str:
    """The device's meter gave no reading for longer than the request may wait for its final figure."""
    return f"meter down for {device}: {error}"


def first_reading_late(device: str) -> str:
    """The request started before the device's first reading: its beginning was never measured."""
    return f"the meter's first reading on {device} came after the request started"


# -- why a record's work was placed by the proxy's own view though the engine's facts were expected ----
FACTS_NEVER_CAME: Final = "the engine's span for this request did not arrive within otlp_receiver.wait_s"
FACTS_TOO_LATE: Final = (
    "an interval of this request was split (meter.settle_s) before the engine's span arrived"
)
FACTS_NO_HEADERS: Final = "the backend's answer carries no x-inference-time header"
FACTS_UNPLACEABLE: Final = (
    "the engine's span lacks the times needed to place it (start, first token, prefill)"
)


# -- aggregates over records ----------------------------------------------------------------------------
CHAIN_HOP_UNKNOWN: Final = "energy of at least one hop is unknown"
KEY_NONE_MEASURED: Final = (
    "no request of this key in the window has a measured energy figure (each record's "
    "energy_null_reason says why)"
)


# -- why a record's carbon or cost figure is unknown (carbon.py) -----------------------------------------
NOT_FINAL_YET: Final = "computed from the final energy figure, when the record is final"
CARBON_OFF: Final = "no carbon intensity configured (carbon.intensity_g_per_kwh, carbon.file or carbon.url)"
PRICING_OFF: Final = "no electricity price configured (pricing.price_per_kwh)"
CARBON_NOT_FETCHED: Final = "carbon.url has not answered with an intensity yet"
CARBON_BEFORE_SERIES: Final = "the carbon intensity series starts after the request's time"
CO2E_NONE_KNOWN: Final = (
    "no request in the window has a known CO2e figure (each record's co2e_null_reason says why)"
)
COST_NONE_KNOWN: Final = "no request in the window has a known cost (each record's cost_null_reason says why)"
COST_CURRENCIES: Final = (
    "the requests' costs are in more than one currency (pricing.currency changed): see cost_by_currency"
)


def energy_unknown(reason: str | None) -> str:
    """A figure computed from the energy, which is unknown."""
    return f"energy unknown: {reason or 'no reason given'}"


def carbon_stale(age_s: float, max_age_s: float) -> str:
    """The latest intensity point before the request is older than carbon.max_age_s."""
    return f"the latest carbon intensity before the request's time is {age_s:.0f} s old (carbon.max_age_s: {max_age_s:g})"
