"""The energy service: samples the meter, feeds device accounts, finalises request records.

One sampling task reads the meter every ``meter.interval_s`` (default 20 ms). A device's
counter only moves at its own update instants (about every 100 ms for an H100), so a
reading is only used when the value changed: those are the interval boundaries the
attribution works on. A meter that fails marks its devices down (``qtrap_meter_up`` 0);
requests that end while their device's meter is down are finalised with energy unknown
and the reason; a meter that recovers resumes. Backends with ``token_counters: true`` have their
own token counters polled every ``meter.counters_interval_s`` (counters.py).

Stopping (:meth:`EnergyService.stop`) is bounded: the sampler keeps reading until every request that
has ended is settled (its last interval closed by a counter update), for at most
``FINAL_READINGS_S``; then the tasks are stopped, requests that ended and are still waiting are
finalised with energy unknown (the reason says why), and so is any request that ends afterwards.

The accounts of requests in flight or waiting for their final figure are the service's own: the
record store reads them through :meth:`EnergyService.account` and :meth:`EnergyService.open_accounts`,
and gets each final one through the ``on_final`` sink. Backends are seen through
:class:`MeteredBackend` (a name and its configuration), so this module needs nothing of the upstream
client. Why energy is unknown is always one of ``reasons.py``'s texts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from qtrap_common.background import STOP_TIMEOUT_S, Background
from qtrap_proxy.config import BackendConfig, ProxyConfig
from qtrap_proxy.energy import reasons
from qtrap_proxy.energy.attribution import DECODE_BATCH_EDGES, DeviceAccount, IntervalObserver, Tracked
from qtrap_proxy.energy.counters import CounterPoller, TokenCounter
from qtrap_proxy.energy.facts import ClockOffset, EngineFacts, header_times, otlp_times
from qtrap_proxy.energy.meters import DcgmMeter, Meter, MeterError, NullMeter, NvmlMeter, device_key
from qtrap_proxy.redact import redact_url
from qtrap_proxy.timeline import Timeline

log = logging.getLogger("qtrap.energy")

FinalSink = Callable[[Tracked], None]

# what became of the engine facts that came: joined to a request; for no request this proxy has open
# (another replica's, one sent to the engine directly, or one already final); a second span for one
# request; a span or headers lacking what placing them needs
FACT_OUTCOMES = ("joined", "unmatched", "duplicate", "unplaceable")
_HEX32 = re.compile(r"[0-9a-f]{32}")


def _fit_report(acc: DeviceAccount) -> dict[str, object] | None:
    """The shared work model's fit on a device: what it has learnt (null before enough intervals)."""
    if acc.work_model != "shared":
        return None
    est = acc.fit.estimate()
    return {
        "intervals": acc.fit.n,
        "shared_power_w": None if est is None else est.shared_power_w,
        "energy_per_prompt_row_j": None if est is None else est.prefill_row_j,  # a prompt token prefilled
        # a decoded token, by the mean batch it was made in (decode_batch_from: each bucket's lowest batch)
        "energy_per_decoded_token_j": None if est is None else list(est.decode_row_j),
        "decode_batch_from": [1, *(math.ceil(e) for e in DECODE_BATCH_EDGES)],
        "energy_per_kv_read_j": None if est is None else est.kv_read_j,
        # busy seconds one KV read and one prefilled row add (their energy at the shared power is theirs)
        "busy_s_per_kv_read": None if est is None else est.kv_read_s,
        "busy_s_per_prompt_row": None if est is None else est.prefill_row_s,
    }


def _request_id_in(engine_request_id: str | None) -> str | None:
    """The proxy's request id inside an engine's request id (vLLM derives its id from X-Request-Id,
    e.g. ``chatcmpl-<id>``), if there is one."""
    if engine_request_id is None:
        return None
    m = _HEX32.search(engine_request_id)
    return None if m is None else m.group(0)


# at shutdown, the longest the meter is read for requests that ended after its last update
FINAL_READINGS_S = 2.0


class MeteredBackend(Protocol):
    """What the service needs of a backend: its name and its configuration (devices, token counters)."""

    @property
    def name(self) -> str: ...

    @property
    def cfg(self) -> BackendConfig: ...


class EnergyService(Background):
    task_name = "qtrap-energy-sampler"

    def __init__(
        self,
        config: ProxyConfig,
        backends: Sequence[MeteredBackend],
        on_final: FinalSink,
        meter: Meter | None = None,
    ) -> None:
        mc = config.meter
        self.cfg = mc
        self.on_final = on_final
        self.backend_devices: dict[str, list[str]] = {
            b.name: [device_key(d.host, d.index) for d in b.cfg.devices] for b in backends
        }
        # engine facts (facts.py): which backends send them, the requests waiting for a span (by the span
        # id sent upstream), each engine's clock offset, and what became of the facts that came
        self.facts_mode: dict[str, str] = {b.name: b.cfg.engine_facts for b in backends}
        self.facts_wait_s = min(config.otlp_receiver.wait_s, mc.settle_s)
        self._by_span: dict[str, Tracked] = {}
        self.clocks: dict[str, ClockOffset] = {
            b.name: ClockOffset() for b in backends if b.cfg.engine_facts == "otlp"
        }
        self.facts_outcomes: dict[str, int] = dict.fromkeys(FACT_OUTCOMES, 0)
        keys = sorted({k for ks in self.backend_devices.values() for k in ks})
        self.accounts: dict[str, DeviceAccount] = {
            k: DeviceAccount(
                k,
                policy=mc.policy,
                settle_s=mc.settle_s,
                prefill_weight=mc.prefill_weight,
                idle_power_w=mc.idle_power_w,
                compare_views=mc.compare_views,
                work_model=mc.work_model,
            )
            for k in keys
        }
        self.counters: list[TokenCounter] = []
        for b in backends:
            if not b.cfg.token_counters:
                continue
            counter = TokenCounter(b.name, b.cfg.kind, b.cfg.metrics_url)
            self.counters.append(counter)
            for key in self.backend_devices[b.name]:
                self.accounts[key].counters[b.name] = counter
        self._poller = CounterPoller(self.counters, mc.counters_interval_s) if self.counters else None
        self.meter_up: dict[str, bool] = dict.fromkeys(keys, False)
        self.meter_error: dict[str, str | None] = dict.fromkeys(keys, "no reading yet")
        self.last_change_t: dict[str, float] = {}
        # each device's mean power between its counter's last two moves (W): a delta of the cumulative
        # counter over the time between the moves, never an instantaneous reading
        self.power_w: dict[str, float] = {}
        self._meter = meter
        self._meter_init_error: str | None = None
        self._tracked: dict[str, Tracked] = {}  # in flight or waiting for their final figure
        self.stopped = False  # once stopped, requests that end are finalised at once (energy unknown)
        self._sampled = asyncio.Event()  # set after every sample

    @property
    def kind(self) -> str:
        return self.cfg.kind

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        if self.cfg.kind != "null" and self.accounts:
            if self._poller is not None:
                self._poller.start()
            super().start()

    async def stop(self, timeout_s: float = 2 * STOP_TIMEOUT_S) -> bool:
        """Finalise what can be finalised and stop, within ``timeout_s``; True if nothing overran.

        While the sampler runs it keeps reading (at most ``FINAL_READINGS_S``, half the bound) until
        no request that ended waits for its final figure; then the sampler and the counter poller are
        stopped, every request that ended is finalised (those still waiting with energy unknown and
        ``reasons.STOPPED``) and the meter is closed. Requests still in flight are finalised when they
        end (:meth:`end`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s

        def left(cap: float) -> float:
            return max(0.0, min(cap, deadline - loop.time()))

        if self._task is not None and not self._task.done():
            await self._await_settled(loop.time() + left(min(FINAL_READINGS_S, timeout_s / 2)))
        ok = await super().stop(left(STOP_TIMEOUT_S))
        if self._poller is not None:
            ok = await self._poller.stop(left(STOP_TIMEOUT_S)) and ok
        self.stopped = True
        n = self.finalise_ended(reasons.STOPPED)
        if n:
            log.warning("%d requests finalised with energy unknown: %s", n, reasons.STOPPED)
        if self._meter is not None:
            meter, self._meter = self._meter, None
            try:
                async with asyncio.timeout(left(STOP_TIMEOUT_S)):
                    await meter.close()
            except TimeoutError:
                log.error("closing the %s meter took longer than the shutdown allowed; left open", meter.kind)
                ok = False
        return ok

    def _waiting(self) -> int:
        """Requests that have ended and wait for their final figure from a meter that is up."""
        return sum(
            1
            for tr in self._tracked.values()
            if tr.tl.end is not None and any(self.meter_up.get(k) for k in self.backend_devices_of(tr))
        )

    async def _await_settled(self, until: float) -> None:
        """Let the sampler run until no ended request waits, or until ``until`` (event-loop time)."""
        loop = asyncio.get_running_loop()
        while self._waiting() and self._task is not None and not self._task.done():
            remaining = until - loop.time()
            if remaining <= 0:
                return
            self._sampled.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._sampled.wait()

    def observe_intervals(self, observer: IntervalObserver) -> None:
        """Tell ``observer`` every device's settled busy intervals (attribution.DeviceAccount._observe)."""
        for acc in self.accounts.values():
            acc.observer = observer

    def finalise_ended(self, reason: str) -> int:
        """Finalise every request that has ended and still waits for its final figure, with energy
        unknown for ``reason``; returns how many were."""
        n = 0
        for tr in list(self._tracked.values()):
            if tr.tl.end is not None:
                self._finalise_unknown(tr, reason)
                n += 1
        return n

    def _finalise_unknown(self, tr: Tracked, reason: str) -> None:
        tr.energy_known, tr.unknown_reason = False, tr.unknown_reason or reason
        self._finalise(tr)

    def _build_meter(self) -> Meter:
        if self.cfg.kind == "dcgm":
            return DcgmMeter(self.cfg.urls)
        if self.cfg.kind == "nvml":
            return NvmlMeter({k: int(k.rsplit(":", 1)[1]) for k in self.accounts})
        return NullMeter()

    async def _run(self) -> None:
        interval = self.cfg.interval_s
        if self._poller is not None:
            # the meter's first interval should begin inside the token counters' coverage: an interval
            # that starts before their first sample cannot tell this proxy's work from others' (a gap)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(1.0, 3 * self.cfg.counters_interval_s)):
                    await self._poller.first_round.wait()
        while True:
            t_next = time.monotonic() + interval
            try:
                await self.sample_once()
            except Exception:  # the sampler must survive anything
                log.exception("energy sampler failed")
            self._sampled.set()
            await asyncio.sleep(max(0.0, t_next - time.monotonic()))

    async def sample_once(self) -> None:
        now = time.monotonic()
        readings: dict[str, float] = {}
        error: str | None = None
        try:
            if self._meter is None:
                self._meter = self._build_meter()
            # asyncio.timeout, not wait_for: on 3.11 wait_for drops a cancellation that arrives as the read
            # completes, and the sampler would then never stop
            async with asyncio.timeout(max(1.0, 10 * self.cfg.interval_s)):
                readings = await self._meter.read()
        except (MeterError, TimeoutError) as e:
            error = str(e) or "meter timed out"
            if isinstance(e, MeterError) and self.cfg.kind == "nvml" and "unavailable" in str(e):
                self._meter = None  # retry the initialisation next time
        t = time.monotonic()
        for key, acc in self.accounts.items():
            value = readings.get(key)
            if value is None:
                self.meter_up[key] = False
                self.meter_error[key] = error or f"meter reports no device {key}"
                continue
            if not self.meter_up[key]:
                log.info("meter for %s is up", key)
            self.meter_up[key] = True
            self.meter_error[key] = None
            if acc.last_counter_j is None or value != acc.last_counter_j:
                prev_j, prev_t = acc.last_counter_j, self.last_change_t.get(key)
                acc.on_reading(t, value)
                if prev_j is not None and prev_t is not None and value > prev_j and t > prev_t:
                    self.power_w[key] = (value - prev_j) / (t - prev_t)
                elif prev_j is not None and value < prev_j:  # a counter reset: no figure until it moves again
                    self.power_w.pop(key, None)
                self.last_change_t[key] = t
        self.settle(now)

    # -- requests -------------------------------------------------------------
    def begin(self, tl: Timeline, backend: MeteredBackend, hop_split: bool) -> Tracked:
        """Open the account of a request sent to ``backend``."""
        devices = self.backend_devices.get(backend.name, [])
        tr = Tracked(tl, devices=len(devices), hop_split=hop_split)
        if self.cfg.kind == "null":
            tr.energy_known, tr.unknown_reason = False, reasons.NO_METER
        elif not devices:
            tr.energy_known, tr.unknown_reason = False, reasons.no_devices(backend.name)
        else:
            for key in devices:
                self.accounts[key].track(tr)
            if self.facts_mode.get(backend.name) == "otlp":
                tr.facts_expected, tr.facts_wait_s = True, self.facts_wait_s
                self._by_span[tl.span_id] = tr
        self._tracked[tl.request_id] = tr
        return tr

    # -- engine facts -----------------------------------------------------------
    def on_facts(self, batch: Sequence[EngineFacts]) -> None:
        """Spans from the OTLP receiver: each joins the request whose span id is its parent. A span
        whose parent this proxy never sent (another replica's request, or one sent to the engine
        directly) is counted and left out: that work reaches the device's foreign bucket through the
        backend's token counters, where they are read (docs/design.md)."""
        for f in batch:
            tr = self._by_span.get(f.parent_span_id or "")
            if tr is None:
                rid = _request_id_in(f.request_id)
                tr = self._tracked.get(rid) if rid is not None else None
                if tr is None:
                    self.facts_outcomes["unmatched"] += 1
                    continue
            if tr.engine is not None:
                self.facts_outcomes["duplicate"] += 1
                continue
            tl = tr.tl
            clock = self.clocks.get(tl.backend or "")
            if clock is None:  # a span for a request to a backend not set to engine_facts: otlp
                self.facts_outcomes["unmatched"] += 1
                continue
            times = otlp_times(
                f, tl.start, tl.start_unix_s, tl.end, tl.chunk_t[0] if tl.chunk_t else None, clock
            )
            if times is None:
                self.facts_outcomes["unplaceable"] += 1
                tr.facts_reason = reasons.FACTS_UNPLACEABLE
                tr.facts_expected = False
                continue
            tr.engine = times
            self.facts_outcomes["joined"] += 1

    def on_answer_headers(self, tl: Timeline, headers: Mapping[str, str]) -> None:
        """A non-streaming answer's head: TGI's timing headers, for backends set to engine_facts: headers."""
        if self.facts_mode.get(tl.backend or "") != "headers":
            return
        tr = self._tracked.get(tl.request_id)
        if tr is None or tr.engine is not None or tl.first_byte is None:
            return
        times = header_times(headers, tl.start, tl.first_byte)
        if times is None:
            self.facts_outcomes["unplaceable"] += 1
            tr.facts_reason = reasons.FACTS_NO_HEADERS
            return
        tr.engine = times
        self.facts_outcomes["joined"] += 1

    def end(self, tr: Tracked) -> None:
        """The request has ended (its timeline has an end): finalise now if nothing is to be measured."""
        if self.stopped:  # no reading will come any more
            self._finalise_unknown(tr, reasons.STOPPED)
        elif tr.devices == 0 or (not tr.energy_known and tr.pending_devices == 0):
            self._finalise(tr)

    def reject(self, tl: Timeline, reason: str = reasons.REJECTED) -> Tracked:
        """Account a request that ended without reaching a backend: nothing to measure, so it is final at
        once with energy unknown for ``reason``."""
        tr = Tracked(tl, devices=0, energy_known=False, unknown_reason=reason)
        self._tracked[tl.request_id] = tr
        self.end(tr)
        return tr

    def account(self, request_id: str) -> Tracked | None:
        """The account of a request in flight or waiting for its final figure; None once it is final
        (its record is the record store's then) or if the service never saw it."""
        return self._tracked.get(request_id)

    def open_accounts(self, *, chain_id: str | None = None, key_id: str | None = None) -> Iterator[Tracked]:
        """The accounts not yet final (in flight or waiting for their final figure), those of one chain
        and/or one client key when given."""
        for tr in list(self._tracked.values()):
            if (chain_id is None or tr.tl.chain_id == chain_id) and (
                key_id is None or tr.tl.key_id == key_id
            ):
                yield tr

    def running(self) -> int:
        """Requests that have not ended yet."""
        return sum(1 for tr in self._tracked.values() if tr.tl.end is None)

    def settle(self, now: float) -> None:
        if len(self.accounts) > 1:  # routing by cost: a device never idle borrows the others' idle power
            learnt = sorted(w for a in self.accounts.values() if (w := a.learnt_idle_w()) is not None)
            fallback = learnt[len(learnt) // 2] if learnt else None
            for acc in self.accounts.values():
                acc.idle_fallback_w = fallback
        for key, acc in self.accounts.items():
            for tr in acc.settle(now):
                self._finalise(tr)
            if not self.meter_up[key]:
                # no readings: requests that ended cannot be measured; finalise them as unknown
                stale = [tr for tr in acc.tracked if tr.tl.end is not None and now - tr.tl.end > acc.settle_s]
                for tr in stale:
                    acc.tracked.remove(tr)
                    tr.pending_devices -= 1
                    tr.energy_known = False
                    tr.unknown_reason = reasons.meter_down(key, self.meter_error[key])
                    if tr.final:
                        self._finalise(tr)

    def _finalise(self, tr: Tracked) -> None:
        if self._tracked.pop(tr.tl.request_id, None) is None:
            return
        if tr.facts_expected or tr.engine is not None:
            self._by_span.pop(tr.tl.span_id, None)
        try:
            self.on_final(tr)
        except Exception:
            log.exception("finalising request %s failed", tr.tl.request_id)

    # -- figures --------------------------------------------------------------
    def provisional_j(self, tr: Tracked) -> float | None:
        """Energy so far plus an estimate for the time not yet settled (null when unknown)."""
        if not tr.energy_known or tr.devices == 0:
            return None
        est = tr.energy_j
        end = tr.tl.end if tr.tl.end is not None else time.monotonic()
        for key in self.backend_devices_of(tr):
            acc = self.accounts[key]
            settled = acc.settled_to if acc.settled_to is not None else tr.tl.start
            gap = end - max(settled, tr.tl.start)
            if gap > 0 and acc.busy_power_w is not None:
                inflight = max(1, sum(1 for t in acc.tracked if t.tl.end is None or t.tl.end > settled))
                est += acc.busy_power_w * gap / inflight
        return est

    def backend_devices_of(self, tr: Tracked) -> list[str]:
        return self.backend_devices.get(tr.tl.backend or "", [])

    def energy_report(self) -> dict[str, Any]:
        now = time.monotonic()
        devices = []
        for key, acc in self.accounts.items():
            last = self.last_change_t.get(key)
            devices.append(
                {
                    "device": key,
                    "meter": self.cfg.kind,
                    "meter_up": self.meter_up[key],
                    "meter_error": self.meter_error[key],
                    "last_update_age_s": None if last is None else now - last,
                    "name": getattr(self._meter, "names", {}).get(key),
                    "power_w": self.power_w.get(key),
                    "updates": acc.updates,
                    "update_period_s": _update_period_s(acc),
                    "counter_resets": acc.resets,
                    "measured_j": acc.measured_j,
                    "metered_j": acc.metered_j,
                    "attributed_j": acc.attributed_j,
                    "idle_j": acc.idle_j,
                    "foreign_j": acc.foreign_j,
                    "counted_backends": sorted(acc.counters),
                    "counter_gaps": acc.counter_gaps,
                    "conservation_error_j": acc.conservation_error_j(),
                    "conservation_error_ratio": acc.conservation_error_ratio(),
                    "pending_intervals": len(acc.pending),
                    "requests_in_flight": sum(1 for t in acc.tracked if t.tl.end is None),
                    "work_model": acc.work_model,
                    "work_fit": _fit_report(acc),
                }
            )
        counters = [
            {
                "backend": c.backend,
                "url": redact_url(c.url),
                "up": c.up,
                "error": c.error,
                "polls": c.polls,
                "resets": c.resets,
                "prompt_tokens": c.samples[-1].prompt if c.samples else None,
                "generated_tokens": c.samples[-1].generated if c.samples else None,
            }
            for c in self.counters
        ]
        clocks = []
        for name, clock in self.clocks.items():
            est = clock.estimate()
            clocks.append(
                {
                    "backend": name,
                    "offset_s": None if est is None else est[0],
                    "offset_error_s": None if est is None else est[1],
                    "samples": clock.samples,
                    "restarts": clock.restarts,
                }
            )
        return {
            "meter": self.cfg.kind,
            "policy": self.cfg.policy,
            "interval_s": self.cfg.interval_s,
            "devices": devices,
            "token_counters": counters,
            "engine_facts": {"outcomes": dict(self.facts_outcomes), "clocks": clocks},
        }


def _update_period_s(acc: DeviceAccount) -> float | None:
    """Mean seconds between the counter's changes as the sampler saw them (an H100's NVML counter: about
    0.1 s; never shorter than ``meter.interval_s``), or None before two changes."""
    if acc.updates < 2 or acc.first_t is None or acc.last_update_t is None:
        return None
    return (acc.last_update_t - acc.first_t) / (acc.updates - 1)
