"""Energy meters: cumulative joules per device, read at a moment.

One small interface (``Meter.read() -> {device: joules}``), three implementations:

* ``NvmlMeter``: nvidia-ml-py on the proxy's own host. ``nvmlDeviceGetTotalEnergyConsumption``
  (mJ since driver load) on Volta and later; on older GPUs power (``nvmlDeviceGetPowerUsage``)
  integrated over the sampling cadence.
* ``DcgmMeter``: scrapes ``DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION`` (mJ) from dcgm-exporter
  URLs, one per node: the multi-node path. A device is (the exporter's ``Hostname`` label,
  its ``gpu`` label); qtrap_sim serves the same format.
* ``NullMeter``: energy unknown; records say so.

Device keys are ``"host:index"``, as in the backends' ``devices`` configuration.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from typing import Any, Protocol

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from qtrap_proxy.errors import QtrapDomainError


class MeterError(QtrapDomainError):
    """The meter could not be read (NVML failing, an exporter unreachable, ...)."""


def device_key(host: str, index: int) -> str:
    return f"{host}:{index}"


class Meter(Protocol):
    kind: str
    names: dict[str, str]  # device key -> the GPU's name (NVML's, dcgm-exporter's modelName), where known

    async def read(self) -> dict[str, float]:
        """Cumulative joules per device key, now. Raises MeterError."""
        ...

    async def close(self) -> None: ...


class NullMeter:
    kind = "null"

    def __init__(self) -> None:
        self.names: dict[str, str] = {}

    async def read(self) -> dict[str, float]:
        return {}

    async def close(self) -> None:
        return None


class NvmlMeter:
    kind = "nvml"

    def __init__(self, devices: dict[str, int], nvml: Any = None) -> None:
        """``devices``: device key -> NVML index on this host. ``nvml``: the pynvml module (injectable)."""
        try:
            if nvml is None:
                nvml = importlib.import_module("pynvml")  # nvidia-ml-py
            nvml.nvmlInit()
        except Exception as e:  # ImportError, NVMLError_LibraryNotFound, ...
            raise MeterError(f"NVML unavailable: {e or type(e).__name__}") from e
        self.nvml = nvml
        self.names: dict[str, str] = {}
        self._handles: dict[str, Any] = {}
        self._integrated: dict[str, tuple[float, float]] = {}  # key -> (joules, last time) for pre-Volta GPUs
        for key, index in devices.items():
            try:
                self._handles[key] = nvml.nvmlDeviceGetHandleByIndex(index)
            except Exception as e:
                raise MeterError(f"NVML has no GPU {index} ({key}): {e}") from e
            try:
                name = nvml.nvmlDeviceGetName(self._handles[key])
                self.names[key] = name.decode() if isinstance(name, bytes) else str(name)
            except Exception:  # a name is context, never a reason to stop metering
                pass

    async def read(self) -> dict[str, float]:
        # nvmlDeviceGetTotalEnergyConsumption takes milliseconds (about 3 ms on an H100 test machine, more
        # when other processes read too): a worker thread keeps it off the event loop that relays streams
        return await asyncio.to_thread(self._read)

    def _read(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, h in self._handles.items():
            try:
                out[key] = float(self.nvml.nvmlDeviceGetTotalEnergyConsumption(h)) / 1000.0
            except Exception as e:
                if not _not_supported(self.nvml, e):
                    raise MeterError(f"NVML read failed for {key}: {e}") from e
                out[key] = self._integrate(key, h)
        return out

    def _integrate(self, key: str, handle: Any) -> float:
        now = time.monotonic()
        try:
            watts = float(self.nvml.nvmlDeviceGetPowerUsage(handle)) / 1000.0
        except Exception as e:
            raise MeterError(f"NVML power read failed for {key}: {e}") from e
        joules, last = self._integrated.get(key, (0.0, now))
        joules += watts * (now - last)
        self._integrated[key] = (joules, now)
        return joules

    async def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except Exception:
            pass


def _not_supported(nvml: Any, e: Exception) -> bool:
    cls = getattr(nvml, "NVMLError_NotSupported", None)
    return cls is not None and isinstance(e, cls)


class DcgmMeter:
    kind = "dcgm"
    METRIC = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"

    def __init__(self, urls: list[str], timeout_s: float = 2.0) -> None:
        if not urls:
            raise MeterError("meter.urls: the dcgm meter needs at least one exporter URL")
        self.urls = urls
        self.names: dict[str, str] = {}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def read(self) -> dict[str, float]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        results = await asyncio.gather(*(self._scrape(u) for u in self.urls), return_exceptions=True)
        out: dict[str, float] = {}
        errors = []
        for url, r in zip(self.urls, results, strict=True):
            if isinstance(r, BaseException):
                errors.append(f"{url}: {type(r).__name__}: {r}")
            else:
                out.update(r)
        if errors and not out:
            raise MeterError("DCGM exporter unreachable: " + "; ".join(errors))
        return out

    async def _scrape(self, url: str) -> dict[str, float]:
        assert self._session is not None
        async with self._session.get(url) as resp:
            if resp.status != 200:
                raise MeterError(f"HTTP {resp.status}")
            text = await resp.text()
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(text):
            if fam.name != self.METRIC:
                continue
            for s in fam.samples:
                host = s.labels.get("Hostname", "localhost")
                key = device_key(host, int(s.labels.get("gpu", "0")))
                out[key] = float(s.value) / 1000.0
                if s.labels.get("modelName"):
                    self.names[key] = s.labels["modelName"]
        return out

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
