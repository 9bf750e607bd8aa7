"""Metric hygiene: no series whose every label is empty, the device label is gpu_device, and the GPU power
gauge follows the meter's counter."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry

from qtrap_proxy.energy.collector import EnergyCollector
from qtrap_proxy.metrics import Metrics
from qtrap_proxy.timeline import Timeline


def _samples(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for fam in registry.collect() for s in fam.samples]


def test_a_request_refused_before_routing_leaves_no_all_empty_series() -> None:
    m = Metrics(CollectorRegistry())
    tl = Timeline("r", "chat")
    tl.finish("bad_request", 400, "no")
    m.child(tl.pool, tl.backend, tl.precision).finished(tl, was_inflight=False)
    samples = _samples(m.registry)
    assert all(any(v for v in labels.values()) for _, labels, _ in samples if labels), [
        (n, lab) for n, lab, _ in samples if lab and not any(lab.values())
    ]
    counted = [
        v
        for n, labels, v in samples
        if n == "qtrap_requests_total" and labels["status"] == "bad_request" and labels["pool"] == ""
    ]
    assert counted == [1.0]  # still counted, by status
    assert not [n for n, labels, _ in samples if n.startswith("qtrap_inflight") and labels.get("pool") == ""]


def test_a_routed_request_binds_every_child() -> None:
    m = Metrics(CollectorRegistry())
    tl = Timeline("r", "chat")
    tl.prompt_tokens, tl.completion_tokens = 3, 4
    tl.finish("ok", 200)
    m.child("p", "b", "bf16").finished(tl, was_inflight=False)
    tokens = {
        labels["kind"]: v
        for n, labels, v in _samples(m.registry)
        if n == "qtrap_tokens_total" and labels["backend"] == "b"
    }
    assert tokens == {"prompt": 3.0, "completion": 4.0}


class _Service:
    def __init__(self, power: float | None) -> None:
        self.power = power

    def energy_report(self) -> dict[str, Any]:
        d = {
            "device": "h:0",
            "measured_j": 10.0,
            "idle_j": 1.0,
            "foreign_j": 0.0,
            "conservation_error_ratio": 0.0,
            "meter_up": True,
            "last_update_age_s": 0.05,
            "power_w": self.power,
        }
        return {"devices": [d], "token_counters": []}


def test_energy_series_use_gpu_device_and_power_is_reported_when_known() -> None:
    r = CollectorRegistry()
    r.register(EnergyCollector(_Service(312.5)))  # type: ignore[arg-type]
    samples = _samples(r)
    gpu = [(n, labels) for n, labels, _ in samples if n.startswith(("qtrap_gpu", "qtrap_meter"))]
    assert gpu and all(labels == {"gpu_device": "h:0"} for _, labels in gpu)
    assert ("qtrap_gpu_power_watts", {"gpu_device": "h:0"}, 312.5) in samples
    r2 = CollectorRegistry()
    r2.register(EnergyCollector(_Service(None)))  # type: ignore[arg-type]
    assert not [n for n, _, _ in _samples(r2) if n == "qtrap_gpu_power_watts"]  # unknown: absent, not 0
