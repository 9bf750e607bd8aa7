"""Meters against stand-ins: an NVML module double and a DCGM exporter text."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml

from qtrap_proxy.cli import main
from qtrap_proxy.energy.meters import MeterError, NvmlMeter


class FakeNVML:
    class NVMLError_NotSupported(Exception):
        pass

    def __init__(self, energy_mj: list[int] | None, power_mw: int = 250_000) -> None:
        self.energy = energy_mj
        self.power = power_mw
        self.inited = False

    def nvmlInit(self) -> None:
        self.inited = True

    def nvmlShutdown(self) -> None:
        self.inited = False

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        if i > 1:
            raise RuntimeError("Invalid Argument")
        return i

    def nvmlDeviceGetTotalEnergyConsumption(self, h: Any) -> int:
        if self.energy is None:
            raise self.NVMLError_NotSupported("Not Supported")
        return self.energy.pop(0)

    def nvmlDeviceGetPowerUsage(self, h: Any) -> int:
        return self.power


def test_nvml_energy_counter_in_joules() -> None:
    m = NvmlMeter({"h:0": 0}, nvml=FakeNVML([1_500, 2_750]))
    assert asyncio.run(m.read()) == {"h:0": 1.5}
    assert asyncio.run(m.read()) == {"h:0": 2.75}


def test_nvml_pre_volta_integrates_power() -> None:
    m = NvmlMeter({"h:0": 0}, nvml=FakeNVML(None, power_mw=200_000))
    first = asyncio.run(m.read())["h:0"]
    import time

    time.sleep(0.05)
    second = asyncio.run(m.read())["h:0"]
    assert first == 0.0 and second == pytest.approx(200 * 0.05, rel=0.5)


def test_nvml_errors_are_meter_errors() -> None:
    with pytest.raises(MeterError, match="NVML has no GPU 5"):
        NvmlMeter({"h:5": 5}, nvml=FakeNVML([0]))

    class Broken(FakeNVML):
        def nvmlInit(self) -> None:
            raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    with pytest.raises(MeterError, match="NVML unavailable"):
        NvmlMeter({"h:0": 0}, nvml=Broken([0]))


def test_dcgm_meter_needs_urls_and_serve_reports_bad_ledger(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = {
        "backends": [
            {"name": "a", "pool": "p", "precision": "bf16", "url": "http://127.0.0.1:9", "model": "m"}
        ],
        "meter": {"kind": "dcgm"},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["check-config", "--config", str(path)]) == 2
    assert "meter.urls" in capsys.readouterr().err
    (tmp_path / "f").write_text("")
    cfg["meter"] = {"kind": "null"}
    cfg["ledger"] = {"path": str(tmp_path / "f" / "l.sqlite")}
    path.write_text(yaml.safe_dump(cfg))
    assert main(["serve", "--config", str(path), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "ledger.path" in err and "\n" not in err
