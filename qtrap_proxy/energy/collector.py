"""The energy metrics: a Prometheus collector over the energy service's device accounts.

Read at scrape time from :meth:`EnergyService.energy_report` (the same figures ``GET /qtrap/v1/energy``
shows), so nothing is updated on the request path. Registered by the composition root (proxy.py) in the
registry of ``metrics.Metrics``.

The device label is ``gpu_device`` (``host:index``, as the backends' ``devices`` name them), not
``device``: dcgm-exporter's ``device`` is the driver's name (``nvidia0``), and a shared label name with
another meaning breaks joins and ``sum by``. Joined with DCGM's series by
``label_join(DCGM_FI_DEV_POWER_USAGE, "gpu_device", ":", "Hostname", "gpu")`` (docs/deploy.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from qtrap_proxy.energy.service import EnergyService


class EnergyCollector(Collector):
    """The energy service's per-device figures and token counters' state, read at scrape time."""

    def __init__(self, service: EnergyService) -> None:
        self.service = service

    def collect(self) -> Iterable[Any]:
        full = self.service.energy_report()
        report = full["devices"]
        measured = CounterMetricFamily(
            "qtrap_gpu_energy",
            "GPU energy measured by the meter (settled intervals)",
            labels=["gpu_device"],
            unit="joules",
        )
        idle = CounterMetricFamily(
            "qtrap_gpu_idle_energy",
            "GPU energy in no request's share (idle bucket)",
            labels=["gpu_device"],
            unit="joules",
        )
        foreign = CounterMetricFamily(
            "qtrap_gpu_foreign_energy",
            "GPU energy of work for requests this proxy did not serve (other replicas, direct clients), "
            "from the backends' token counters",
            labels=["gpu_device"],
            unit="joules",
        )
        conservation = GaugeMetricFamily(
            "qtrap_energy_conservation_error_ratio",
            "|attributed + idle + foreign - measured| / measured",
            labels=["gpu_device"],
        )
        up = GaugeMetricFamily(
            "qtrap_meter_up", "1 if the device's meter answered its last reading", labels=["gpu_device"]
        )
        age = GaugeMetricFamily(
            "qtrap_meter_last_update_age_seconds",
            "Time since the device's counter last moved",
            labels=["gpu_device"],
        )
        power = GaugeMetricFamily(
            "qtrap_gpu_power_watts",
            "GPU power: the mean between the meter's last two counter moves (absent before two moves and "
            "right after a counter reset)",
            labels=["gpu_device"],
        )
        counters_up = GaugeMetricFamily(
            "qtrap_backend_token_counters_up",
            "1 if the backend's token counters answered the last poll (backends with token_counters: true)",
            labels=["backend"],
        )
        for c in full.get("token_counters", []):
            counters_up.add_metric([c["backend"]], 1.0 if c["up"] else 0.0)
        for d in report:
            key = [d["device"]]
            measured.add_metric(key, d["measured_j"])
            idle.add_metric(key, d["idle_j"])
            foreign.add_metric(key, d["foreign_j"])
            conservation.add_metric(key, d["conservation_error_ratio"])
            up.add_metric(key, 1.0 if d["meter_up"] else 0.0)
            if d["last_update_age_s"] is not None:
                age.add_metric(key, d["last_update_age_s"])
            if d["power_w"] is not None:
                power.add_metric(key, d["power_w"])
        yield from (measured, idle, foreign, conservation, up, age, power, counters_up)
