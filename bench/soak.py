"""Soak: hours of streaming load on one qtrap-proxy, sampled, then slow clients and a connection flood.

    .venv/bin/python bench/soak.py [--duration 1800] [--streams 256] [--out DIR]
    .venv/bin/python bench/soak.py --proxy http://127.0.0.1:8080 --proxy-pid PID [--ledger FILE] ...

Starts a qtrap-sim (linear step model, ``--step-ms`` per decode step, so the simulated GPU is cheap and
never the bottleneck) and a qtrap-proxy in front of it (DCGM meter on the simulator's counter, so
energy attribution runs; ledger in the output directory), both on free loopback ports. With ``--proxy``
and ``--proxy-pid`` it drives an already running proxy instead (the limits given below must then be
the ones that proxy was configured with; ``--ledger`` enables the ledger checks).

Phases:

1. soak: ``--streams`` closed-loop chat completions for ``--duration`` seconds (``--nonstream-share``
   of them non-streaming, ``--disconnect-share`` of the streams closed by the client after a few
   chunks). Every ``--sample-s`` the proxy's RSS and open file descriptors (/proc/PID), its in-flight
   requests, ledger pending records and write errors (/metrics), the client's counts and the
   simulator's RSS are sampled.
2. slow clients: ``--slow-headers`` connections trickle a request head one byte per ``--trickle-s``
   (each must get 408 and be closed within server.header_timeout_s of connecting), and
   ``--slow-bodies`` send a head and then trickle a body for ``--body-trickle-s`` and fall silent (each
   must get 408 within server.body_timeout_s of its last byte: the body bound is on silence, not on
   the body's total time), while ``--phase-streams`` normal streams and a probe request every
   ``--probe-every-s`` keep running.
3. connection flood: ``--flood-connections`` clients (default 2 x server.max_connections) send
   streaming requests in a loop for ``--flood-s``: beyond server.max_inflight_requests the proxy sheds
   (503 + Retry-After), beyond server.max_connections uvicorn answers 503 and closes; a refused or
   reset connection counts as refused. Then the load stops and, for up to ``--settle-s``, the proxy's
   fds must return to their idle count before the run and its RSS near the soak's end.

After: every request the client saw complete (or cut on purpose) must have a final record in the
ledger; the proxy is stopped with SIGTERM (exit status 0: ledger flushed) and the ledger must pass
``PRAGMA integrity_check``. The proxy this script starts gets a soft open-file limit of
``--proxy-nofile`` (1024, the usual Linux default; the proxy raises it to 2 x max_connections + 256 =
1280 itself), so the flood meets the limits a default host would have.

Writes soak.json (settings, every sample, per-phase results, verdicts) and soak.md (a summary) into
``--out``, prints the summary, and exits 1 if a verdict fails (2 on a usage or start-up error).
Every verdict states its criterion. Timings depend on the machine; on a shared machine say so.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import resource
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from qtrap_common.localproc import free_port, stop, wait_http

CHAT = "/v1/chat/completions"
HDRS = {"content-type": "application/json"}
EMFILE_RE = re.compile(rb"Too many open files|out of system resource|EMFILE", re.IGNORECASE)


class SoakError(Exception):
    """A usage or start-up problem: printed as one line, exit status 2."""


# -- /proc and /metrics -----------------------------------------------------------------------------


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def sockets(pid: int, port: int) -> dict[str, int]:
    """The process's TCP sockets: ``client`` (local port ``port``), ``upstream`` (the others), ``listen``."""
    inodes: set[str] = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    except OSError:
        return {}
    out = {"client": 0, "upstream": 0, "listen": 0}
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10 or f[9] not in inodes:
                continue
            if f[3] == "0A":  # LISTEN
                out["listen"] += 1
            elif int(f[1].rsplit(":", 1)[1], 16) == port:
                out["client"] += 1
            else:
                out["upstream"] += 1
    return out


def cpu_s(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def nofile_limit(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                soft = line.split()[3]
                return None if soft == "unlimited" else int(soft)
    except OSError:
        return None
    return None


_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[str, Any]:
    """The figures the soak samples from the proxy's Prometheus page."""
    out: dict[str, Any] = {
        "inflight": 0.0,
        "ledger_pending": None,
        "ledger_write_errors": {},
        "refused": {},
        "requests_by_status": {},
    }
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels_text = head.partition("{")
        try:
            v = float(value)
        except ValueError:
            continue
        labels = dict(_LABEL.findall(labels_text))
        if name == "qtrap_inflight_requests":
            out["inflight"] += v
        elif name == "qtrap_ledger_pending_records":
            out["ledger_pending"] = v
        elif name == "qtrap_ledger_write_errors_total":
            out["ledger_write_errors"][labels.get("kind", "")] = v
        elif name == "qtrap_refused_requests_total":
            out["refused"][labels.get("reason", "")] = v
        elif name == "qtrap_requests_total":
            st = labels.get("status", "")
            out["requests_by_status"][st] = out["requests_by_status"].get(st, 0.0) + v
    return out


# -- client-side accounting -------------------------------------------------------------------------


@dataclass
class Tally:
    """One phase's client-side outcomes."""

    ok: int = 0
    disconnected: int = 0  # streams the client cut on purpose
    tokens: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # by kind; designed 503s are not errors
    latency_s: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "disconnected_on_purpose": self.disconnected,
            "tokens": self.tokens,
            "statuses": dict(self.statuses),
            "errors": dict(self.errors),
            "latency": summary(self.latency_s),
        }


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50_s": pct(values, 0.5), "p99_s": pct(values, 0.99), "max_s": max(values)}


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (t seconds, y) in y per hour."""
    if len(points) < 3:
        return None
    n = len(points)
    mt = sum(t for t, _ in points) / n
    my = sum(y for _, y in points) / n
    den = sum((t - mt) ** 2 for t, _ in points)
    if den == 0:
        return None
    return sum((t - mt) * (y - my) for t, y in points) / den * 3600


def classify_503(resp: aiohttp.ClientResponse) -> str:
    """'shed' (the proxy's load shedding: Retry-After) or 'conn_limit' (uvicorn's limit_concurrency)."""
    return "shed" if resp.headers.get("retry-after") is not None else "conn_limit"


# -- the soak ---------------------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace, url: str, proxy_pid: int, sim_pid: int | None) -> None:
        self.a = args
        self.url = url
        self.pid = proxy_pid
        self.sim_pid = sim_pid
        self.rng = random.Random(args.seed)
        self.t0 = time.monotonic()
        self.phase = "idle"
        self.tallies: dict[str, Tally] = {}
        self.probes: dict[str, Tally] = {}
        self.completed_ids: list[str] = []  # answered 200 and read to the end
        self.cut_ids: list[str] = []  # cut by the client on purpose
        self.samples: list[dict[str, Any]] = []
        self.results: dict[str, Any] = {}
        self.stop_load = asyncio.Event()
        self.last_metrics: dict[str, Any] = {}
        self.seq = 0

    def now(self) -> float:
        return time.monotonic() - self.t0

    def tally(self) -> Tally:
        return self.tallies.setdefault(self.phase, Tally())

    def body(self, stream: bool, max_tokens: int) -> bytes:
        self.seq += 1
        return json.dumps(
            {
                "model": self.a.model,
                "messages": [{"role": "user", "content": f"soak request {self.seq}: count slowly"}],
                "max_tokens": max_tokens,
                "ignore_eos": True,
                "stream": stream,
            }
        ).encode()

    # -- one normal request -------------------------------------------------------------------------
    async def request(self, s: aiohttp.ClientSession, t: Tally, *, probe: bool = False) -> None:
        rng = self.rng
        stream = not probe and rng.random() >= self.a.nonstream_share
        cut = stream and rng.random() < self.a.disconnect_share
        max_tokens = 8 if probe else rng.randint(self.a.min_tokens, self.a.max_tokens)
        t_start = time.monotonic()
        try:
            async with s.post(self.url + CHAT, data=self.body(stream, max_tokens), headers=HDRS) as r:
                rid = r.headers.get("x-qtrap-request-id")
                t.statuses[str(r.status)] += 1
                if r.status != 200:
                    await r.read()
                    if r.status == 503:
                        t.errors[f"503_{classify_503(r)}"] += 1
                    else:
                        t.errors[f"http_{r.status}"] += 1
                    return
                if cut:
                    chunks = 0
                    async for data in r.content.iter_any():
                        chunks += data.count(b"data: {")
                        if chunks >= 3:
                            break
                    r.close()  # drops the connection mid-stream
                    t.disconnected += 1
                    if rid:
                        self.cut_ids.append(rid)
                    return
                if stream:
                    tail = b""
                    n = 0
                    async for data in r.content.iter_any():
                        n += data.count(b"data: {")
                        tail = (tail + data)[-64:]
                    if b"data: [DONE]" not in tail:
                        t.errors["stream_incomplete"] += 1
                        return
                    t.tokens += max(0, n - 1)  # the role chunk carries no token
                else:
                    doc = await r.json()
                    if not doc.get("choices"):
                        t.errors["bad_body"] += 1
                        return
                    t.tokens += int((doc.get("usage") or {}).get("completion_tokens") or 0)
        except TimeoutError:
            t.errors["timeout"] += 1
            return
        except aiohttp.ClientConnectorError:
            t.errors["connect_refused"] += 1
            return
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, ConnectionResetError):
            t.errors["connection_reset"] += 1
            return
        except aiohttp.ClientError as e:
            t.errors[f"client_{type(e).__name__}"] += 1
            return
        t.ok += 1
        t.latency_s.append(time.monotonic() - t_start)
        if rid:
            self.completed_ids.append(rid)
        elif not probe:
            t.errors["no_request_id"] += 1

    async def closed_loop(self, s: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.request(s, self.tally())

    async def probe_loop(self, s: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.request(s, self.probes.setdefault(self.phase, Tally()), probe=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.a.probe_every_s)

    # -- sampling -----------------------------------------------------------------------------------
    async def sample(self, s: aiohttp.ClientSession) -> dict[str, Any]:
        row: dict[str, Any] = {
            "t_s": round(self.now(), 2),
            "phase": self.phase,
            "proxy_rss_mb": rss_mb(self.pid),
            "proxy_fds": open_fds(self.pid),
            "proxy_sockets": sockets(self.pid, self.a.port),
            "proxy_cpu_s": cpu_s(self.pid),
            "sim_rss_mb": rss_mb(self.sim_pid) if self.sim_pid else None,
        }
        try:
            async with s.get(self.url + "/metrics", timeout=aiohttp.ClientTimeout(total=10)) as r:
                text = await r.text()
                if r.status != 200:
                    raise aiohttp.ClientResponseError(r.request_info, (), status=r.status)
            m = parse_metrics(text)
            self.last_metrics = m
            row.update(
                inflight=m["inflight"],
                ledger_pending=m["ledger_pending"],
                ledger_write_errors=sum(m["ledger_write_errors"].values()),
                refused=m["refused"],
                proxy_requests_by_status=m["requests_by_status"],
            )
        except aiohttp.ClientResponseError as e:
            row["metrics_error"] = f"http_{e.status}"
        except (aiohttp.ClientError, TimeoutError) as e:
            row["metrics_error"] = type(e).__name__
        t = self.tallies.get(self.phase)
        row["client_ok"] = sum(x.ok for x in self.tallies.values())
        row["client_errors"] = sum(sum(x.errors.values()) for x in self.tallies.values())
        row["client_tokens_phase"] = t.tokens if t else 0
        self.samples.append(row)
        return row

    async def sampler(self, s: aiohttp.ClientSession, done: asyncio.Event) -> None:
        ui = Display(self)
        with ui:
            while not done.is_set():
                row = await self.sample(s)
                ui.update(row)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), self.a.sample_s)

    # -- phases -------------------------------------------------------------------------------------
    def session(self, limit: int = 0) -> aiohttp.ClientSession:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.a.request_timeout_s, sock_read=30)
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit), timeout=timeout)

    async def run(self) -> None:
        self.results["proxy_nofile_limit"] = nofile_limit(self.pid)
        self.results["idle_before"] = {"rss_mb": rss_mb(self.pid), "fds": open_fds(self.pid)}
        done = asyncio.Event()
        async with self.session() as ms:
            sampler = asyncio.create_task(self.sampler(ms, done))
            try:
                await self.phase_soak()
                await self.phase_slow_clients()
                await self.phase_flood()
                await self.settle(ms)
                await self.ledger_wait(ms)
            finally:
                done.set()
                await sampler

    async def phase_soak(self) -> None:
        a = self.a
        self.phase = "soak"
        stop_ev = asyncio.Event()
        async with self.session() as s:
            workers = [asyncio.create_task(self.closed_loop(s, stop_ev)) for _ in range(a.streams)]
            probe = asyncio.create_task(self.probe_loop(s, stop_ev))
            t_start = time.monotonic()
            await asyncio.sleep(a.duration)
            wall = time.monotonic() - t_start
            stop_ev.set()
            await asyncio.gather(*workers, probe)
        t = self.tallies["soak"]
        self.results["soak"] = {
            **t.as_dict(),
            "wall_s": wall,
            "requests_per_s": (t.ok + t.disconnected) / wall,
            "tokens_per_s": t.tokens / wall,
            "probe": self.probes.get("soak", Tally()).as_dict(),
            "end": {"rss_mb": rss_mb(self.pid), "fds": open_fds(self.pid)},
        }

    async def phase_slow_clients(self) -> None:
        a = self.a
        self.phase = "slow_clients"
        stop_ev = asyncio.Event()
        async with self.session() as s:
            workers = [asyncio.create_task(self.closed_loop(s, stop_ev)) for _ in range(a.phase_streams)]
            probe = asyncio.create_task(self.probe_loop(s, stop_ev))
            heads = [asyncio.create_task(self.slow_head(i)) for i in range(a.slow_headers)]
            bodies = [asyncio.create_task(self.slow_body(i)) for i in range(a.slow_bodies)]
            await asyncio.sleep(1.0)
            peak_fds = open_fds(self.pid)
            head_res = await asyncio.gather(*heads)
            body_res = await asyncio.gather(*bodies)
            stop_ev.set()
            await asyncio.gather(*workers, probe)
        self.results["slow_clients"] = {
            "normal": self.tallies.get("slow_clients", Tally()).as_dict(),
            "probe": self.probes.get("slow_clients", Tally()).as_dict(),
            "proxy_fds_during": peak_fds,
            "heads": slow_summary(head_res),
            "bodies": slow_summary(body_res),
            "head_samples": head_res[:5],
            "body_samples": body_res[:5],
        }

    async def slow_head(self, i: int) -> dict[str, Any]:
        """Trickle a request head one byte per trickle_s; time until the proxy answers and closes."""
        await asyncio.sleep(i * 0.002)  # spread the connects a little
        head = (
            f"POST {CHAT} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            "x-slow: " + "a" * 4096
        ).encode()
        return await self._slow(head, b"", trickle_head=True)

    async def slow_body(self, i: int) -> dict[str, Any]:
        """Send a head, trickle a body for body_trickle_s, then fall silent."""
        await asyncio.sleep(i * 0.002)
        head = (
            f"POST {CHAT} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            "content-length: 100000\r\n\r\n"
        ).encode()
        return await self._slow(head, b"{" + b" " * 99_999, trickle_head=False)

    async def _slow(self, head: bytes, body: bytes, *, trickle_head: bool) -> dict[str, Any]:
        a = self.a
        res: dict[str, Any] = {"kind": "head" if trickle_head else "body"}
        t_conn = time.monotonic()
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", a.port), a.request_timeout_s
            )
        except (OSError, TimeoutError) as e:
            res["outcome"] = f"connect_failed:{type(e).__name__}"
            return res
        last_byte = time.monotonic()

        async def trickle() -> None:
            nonlocal last_byte
            try:
                if trickle_head:
                    for b in head:
                        writer.write(bytes([b]))
                        await writer.drain()
                        last_byte = time.monotonic()
                        await asyncio.sleep(a.trickle_s)
                else:
                    writer.write(head)
                    await writer.drain()
                    until = time.monotonic() + a.body_trickle_s
                    k = 0
                    while time.monotonic() < until:
                        writer.write(body[k : k + 1])
                        await writer.drain()
                        last_byte = time.monotonic()
                        k += 1
                        await asyncio.sleep(a.trickle_s)
                    await asyncio.sleep(3600)  # silent from here on
            except (ConnectionError, OSError):
                pass

        task = asyncio.create_task(trickle())
        data = b""
        limit = (a.header_timeout_s if trickle_head else a.body_trickle_s + a.body_timeout_s) + 30
        try:
            async with asyncio.timeout(limit):
                while True:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    data += chunk
            res["outcome"] = "closed"
        except TimeoutError:
            res["outcome"] = "still_open"
        except (ConnectionError, OSError):
            res["outcome"] = "reset"
        t_end = time.monotonic()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        status = data.split(b" ", 2)[1].decode(errors="replace") if data.startswith(b"HTTP/1.1 ") else None
        res.update(
            status=status,
            since_connect_s=round(t_end - t_conn, 3),
            since_last_byte_s=round(t_end - last_byte, 3),
        )
        bound = a.header_timeout_s if trickle_head else a.body_timeout_s
        waited = res["since_connect_s"] if trickle_head else res["since_last_byte_s"]
        # "reset": the 408 came and the socket was closed while this client still wrote (an RST)
        res["ok"] = (
            status == "408" and res["outcome"] in ("closed", "reset") and waited <= bound + a.timeout_slack_s
        )
        return res

    async def phase_flood(self) -> None:
        a = self.a
        self.phase = "flood"
        flood = Tally()
        stop_ev = asyncio.Event()
        flood_stop = asyncio.Event()
        pre = {"rss_mb": rss_mb(self.pid), "fds": open_fds(self.pid)}
        peak = {"fds": 0, "rss_mb": 0.0}

        async def watch() -> None:
            while not flood_stop.is_set():
                peak["fds"] = max(peak["fds"], open_fds(self.pid) or 0)
                peak["rss_mb"] = max(peak["rss_mb"], rss_mb(self.pid) or 0.0)
                await asyncio.sleep(0.2)

        async def flooder(s: aiohttp.ClientSession, i: int) -> None:
            await asyncio.sleep(i * 0.001)
            body = json.dumps(
                {
                    "model": a.model,
                    "messages": [{"role": "user", "content": f"flood {i}"}],
                    "max_tokens": a.flood_tokens,
                    "ignore_eos": True,
                    "stream": True,
                }
            ).encode()
            while not flood_stop.is_set():
                t_start = time.monotonic()
                try:
                    async with s.post(self.url + CHAT, data=body, headers=HDRS) as r:
                        flood.statuses[str(r.status)] += 1
                        await r.read()
                        if r.status == 200:
                            flood.ok += 1
                            flood.latency_s.append(time.monotonic() - t_start)
                            continue
                        kind = classify_503(r) if r.status == 503 else f"http_{r.status}"
                        flood.errors[kind] += 1
                except TimeoutError:
                    flood.errors["timeout"] += 1
                except aiohttp.ClientConnectorError:
                    flood.errors["refused"] += 1
                except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionResetError):
                    flood.errors["reset"] += 1
                except aiohttp.ClientError as e:
                    flood.errors[f"client_{type(e).__name__}"] += 1
                await asyncio.sleep(a.flood_pause_s)

        async with self.session() as s, self.session() as fs:
            workers = [asyncio.create_task(self.closed_loop(s, stop_ev)) for _ in range(a.phase_streams)]
            probe = asyncio.create_task(self.probe_loop(s, stop_ev))
            watcher = asyncio.create_task(watch())
            flooders = [asyncio.create_task(flooder(fs, i)) for i in range(a.flood_connections)]
            await asyncio.sleep(a.flood_s)
            flood_stop.set()
            await asyncio.gather(*flooders, watcher)
            stop_ev.set()
            await asyncio.gather(*workers, probe)
        # the flood's connections are closed; a batch of normal requests must succeed again
        self.phase = "after_flood"
        async with self.session() as s:
            after = Tally()
            for _ in range(a.recovery_requests):
                await self.request(s, after)
        self.results["flood"] = {
            "flood": flood.as_dict(),
            "normal": self.tallies.get("flood", Tally()).as_dict(),
            "probe": self.probes.get("flood", Tally()).as_dict(),
            "before": pre,
            "peak": peak,
            "recovery": after.as_dict(),
        }

    async def settle(self, ms: aiohttp.ClientSession) -> None:
        """Load off: wait until the fds are back to the idle count (or settle_s passes)."""
        self.phase = "settle"
        base = self.results["idle_before"]["fds"] or 0
        t_start = time.monotonic()
        own_back: float | None = None  # when the fds other than upstream pool sockets were back
        fds = open_fds(self.pid)
        socks = sockets(self.pid, self.a.port)
        while True:
            fds = open_fds(self.pid)
            socks = sockets(self.pid, self.a.port)
            if fds is None:
                break
            if own_back is None and fds - socks.get("upstream", 0) <= base + self.a.fd_tolerance:
                own_back = time.monotonic() - t_start
            if fds <= base + self.a.fd_tolerance or time.monotonic() - t_start >= self.a.settle_s:
                break
            await asyncio.sleep(1.0)
        self.results["after"] = {
            "rss_mb": rss_mb(self.pid),
            "fds": fds,
            "sockets": socks,
            "fds_without_upstream": None if fds is None else fds - socks.get("upstream", 0),
            "waited_s": round(time.monotonic() - t_start, 1),
            "without_upstream_back_after_s": None if own_back is None else round(own_back, 1),
        }

    async def ledger_wait(self, ms: aiohttp.ClientSession) -> None:
        """Until the proxy's ledger has nothing pending (or ledger_wait_s passes)."""
        t_end = time.monotonic() + self.a.ledger_wait_s
        while time.monotonic() < t_end:
            row = await self.sample(ms)
            if row.get("ledger_pending") in (0, 0.0, None):
                break
            await asyncio.sleep(1.0)


def slow_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    key = "since_connect_s" if rows and rows[0]["kind"] == "head" else "since_last_byte_s"
    waits = [r[key] for r in rows if key in r]
    return {
        "n": len(rows),
        "got_408_and_closed_in_time": sum(1 for r in rows if r.get("ok")),
        "statuses": dict(Counter(str(r.get("status")) for r in rows)),
        "outcomes": dict(Counter(r.get("outcome") for r in rows)),
        f"{key}_min": min(waits) if waits else None,
        f"{key}_max": max(waits) if waits else None,
    }


class Display:
    """rich progress on a terminal; a plain line every ``--print-every-s`` otherwise (nohup, pipes)."""

    def __init__(self, soak: Soak) -> None:
        self.soak = soak
        self.progress: Any = None
        self.task: Any = None
        self.last_print = -1e9
        try:
            from rich.console import Console

            self.terminal = Console().is_terminal
        except ImportError:
            self.terminal = False

    def __enter__(self) -> Display:
        if self.terminal:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), transient=False
            )
            self.progress.start()
            self.task = self.progress.add_task("soak", total=self.soak.a.duration)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()

    def update(self, row: dict[str, Any]) -> None:
        line = (
            f"[{row['t_s']:7.0f} s {row['phase']:<12}] proxy RSS {fmt(row['proxy_rss_mb'], '.1f')} MB, "
            f"fds {row['proxy_fds']}, in flight {fmt(row.get('inflight'), '.0f')}, "
            f"ledger pending {fmt(row.get('ledger_pending'), '.0f')}, ok {row['client_ok']:,}, "
            f"errors {row['client_errors']}, sim RSS {fmt(row['sim_rss_mb'], '.1f')} MB"
        )
        if self.progress is not None:
            done = min(self.soak.a.duration, row["t_s"]) if row["phase"] == "soak" else self.soak.a.duration
            self.progress.update(self.task, completed=done, description=line)
        elif row["t_s"] - self.last_print >= self.soak.a.print_every_s or row["phase"] != "soak":
            self.last_print = row["t_s"]
            print(line, flush=True)


def fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


# -- verdicts ---------------------------------------------------------------------------------------


@dataclass
class Verdict:
    name: str
    criterion: str
    observed: str
    passed: bool | None  # None: not judged (stated why in observed)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "criterion": self.criterion,
            "observed": self.observed,
            "pass": self.passed,
        }


def ledger_check(path: Path, ids: list[str], cut: list[str]) -> dict[str, Any]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        rows = {
            rid: (final, status)
            for rid, final, status in conn.execute(
                "SELECT id, json_extract(record, '$.final'), json_extract(record, '$.status') FROM requests"
            )
        }
    finally:
        conn.close()
    missing = [i for i in ids if i not in rows]
    not_final = [i for i in ids if i in rows and not rows[i][0]]
    cut_missing = [i for i in cut if i not in rows]
    cut_status = Counter(str(rows[i][1]) for i in cut if i in rows)
    return {
        "integrity_check": integrity,
        "records": len(rows),
        "completed_requests": len(ids),
        "missing": len(missing),
        "missing_examples": missing[:5],
        "not_final": len(not_final),
        "statuses": dict(Counter(str(s) for _, s in rows.values())),
        "cut_requests": len(cut),
        "cut_missing": len(cut_missing),
        "cut_statuses": dict(cut_status),
    }


def verdicts(a: argparse.Namespace, soak: Soak, extra: dict[str, Any]) -> list[Verdict]:
    r = soak.results
    out: list[Verdict] = []
    s1 = r["soak"]
    steady = [
        (x["t_s"], x["proxy_rss_mb"])
        for x in soak.samples
        if x["phase"] == "soak" and x["t_s"] >= a.warmup_s and x["proxy_rss_mb"] is not None
    ]
    span = steady[-1][0] - steady[0][0] if len(steady) > 1 else 0.0
    slope = slope_per_hour(steady)
    r["rss_slope_mb_per_h"] = slope
    r["rss_slope_span_s"] = span
    crit = (
        f"proxy RSS slope over the soak after the {a.warmup_s:g} s warm-up <= {a.max_rss_slope_mb_h:g} MB/h"
    )
    if slope is None or span < a.min_slope_span_s:
        out.append(
            Verdict(
                "rss_slope", crit, f"not judged: steady part {span:.0f} s < {a.min_slope_span_s:g} s", None
            )
        )
    else:
        out.append(
            Verdict("rss_slope", crit, f"{slope:+.1f} MB/h over {span:.0f} s", slope <= a.max_rss_slope_mb_h)
        )
    errs1 = s1["errors"]
    out.append(
        Verdict(
            "soak_requests",
            "during the soak every request ended 200 with a complete answer (planned client cuts aside): "
            "no 5xx, no 503 below the limits, no timeouts or resets",
            f"{s1['ok']:,} ok, {s1['disconnected_on_purpose']:,} cut on purpose, errors {errs1 or 'none'}",
            not errs1 and s1["ok"] > 0,
        )
    )
    sc = r["slow_clients"]
    h, b = sc["heads"], sc["bodies"]
    out.append(
        Verdict(
            "slow_heads",
            f"every slow head got 408 and was closed within header_timeout_s {a.header_timeout_s:g} s "
            f"+ {a.timeout_slack_s:g} s of connecting",
            f"{h['got_408_and_closed_in_time']}/{h['n']}; statuses {h['statuses']}; "
            f"closed after {fmt(h.get('since_connect_s_min'), '.2f')}-{fmt(h.get('since_connect_s_max'), '.2f')} s",
            h["n"] == 0 or h["got_408_and_closed_in_time"] == h["n"],
        )
    )
    out.append(
        Verdict(
            "slow_bodies",
            f"every silent body got 408 and was closed within body_timeout_s {a.body_timeout_s:g} s "
            f"+ {a.timeout_slack_s:g} s of its last byte",
            f"{b['got_408_and_closed_in_time']}/{b['n']}; statuses {b['statuses']}; closed "
            f"{fmt(b.get('since_last_byte_s_min'), '.2f')}-{fmt(b.get('since_last_byte_s_max'), '.2f')} s "
            "after the last byte",
            b["n"] == 0 or b["got_408_and_closed_in_time"] == b["n"],
        )
    )
    n2, p2 = sc["normal"], sc["probe"]
    p2max = p2["latency"].get("max_s")
    out.append(
        Verdict(
            "slow_clients_normal_traffic",
            f"during the slow clients every normal request succeeded and every probe took <= {a.probe_max_s:g} s",
            f"{n2['ok']:,} ok, errors {n2['errors'] or 'none'}; probes {p2['ok']} ok, "
            f"max {fmt(p2max, '.3f')} s, errors {p2['errors'] or 'none'}",
            not n2["errors"] and not p2["errors"] and p2max is not None and p2max <= a.probe_max_s,
        )
    )
    fl = r["flood"]
    f = fl["flood"]
    designed = {"shed", "conn_limit", "refused", "reset"}
    bad = {k: v for k, v in f["errors"].items() if k not in designed}
    normal_bad = {
        k: v
        for k, v in {**fl["normal"]["errors"], **fl["probe"]["errors"]}.items()
        if not k.startswith("503_")
    }
    out.append(
        Verdict(
            "flood_outcomes",
            f"{a.flood_connections} flooding clients (max_connections {a.max_connections}, max_inflight_requests "
            f"{a.max_inflight}): every request ended 200, 503 with Retry-After (shed), uvicorn's 503 "
            "(connection limit) or a refused/reset connection; no other status, no timeout; normal traffic "
            "alongside saw nothing but 200 or 503",
            f"flood statuses {f['statuses']}, outcomes besides 200 {f['errors']}; normal/probe errors "
            f"{normal_bad or 'none'}; proxy fds peak {fl['peak']['fds']} (limit {r.get('proxy_nofile_limit')})",
            not bad and not normal_bad and f["ok"] > 0,
        )
    )
    limit = r.get("proxy_nofile_limit")
    emfile = extra.get("emfile_log_lines")
    out.append(
        Verdict(
            "flood_fds",
            "the proxy never ran out of file descriptors: peak fds below its limit and no EMFILE "
            "('Too many open files') in its log",
            f"peak {fl['peak']['fds']} of {limit}; EMFILE log lines: {fmt(emfile, 'd')}",
            (limit is None or fl["peak"]["fds"] < limit) and not emfile,
        )
    )
    rec = fl["recovery"]
    out.append(
        Verdict(
            "recovery",
            f"after the flood {a.recovery_requests} normal requests in a row all succeed",
            f"{rec['ok']} ok, {rec['disconnected_on_purpose']} cut on purpose, errors {rec['errors'] or 'none'}",
            not rec["errors"] and rec["ok"] + rec["disconnected_on_purpose"] == a.recovery_requests,
        )
    )
    base_fds = r["idle_before"]["fds"]
    after = r["after"]
    own = after["fds_without_upstream"]
    out.append(
        Verdict(
            "fds_return",
            f"once the load ends, the proxy's fds other than idle upstream pool sockets (which aiohttp keeps "
            f"for its 60 s keep-alive) are back to its idle count before the run + {a.fd_tolerance} within "
            f"{a.settle_s:g} s",
            f"idle before {base_fds}; without upstream sockets back after "
            f"{fmt(after['without_upstream_back_after_s'], 'g')} s; all fds {after['fds']} "
            f"({after['sockets']}) {after['waited_s']} s after the load",
            own is not None and base_fds is not None and own <= base_fds + a.fd_tolerance,
        )
    )
    rss_end_soak = s1["end"]["rss_mb"]
    out.append(
        Verdict(
            "rss_return",
            f"after slow clients, flood and settling the proxy's RSS <= its RSS at the soak's end + {a.max_rss_growth_mb:g} MB",
            f"soak end {fmt(rss_end_soak, '.1f')} MB, flood peak {fl['peak']['rss_mb']:.1f} MB, "
            f"after {fmt(after['rss_mb'], '.1f')} MB",
            after["rss_mb"] is not None
            and rss_end_soak is not None
            and after["rss_mb"] <= rss_end_soak + a.max_rss_growth_mb,
        )
    )
    m = soak.last_metrics
    werr = m.get("ledger_write_errors") or {}
    out.append(
        Verdict(
            "ledger_metrics",
            "at the end the ledger has no write errors and no pending records (/metrics)",
            f"write errors {werr or 'none'}, pending {fmt(m.get('ledger_pending'), '.0f')}",
            not any(werr.values()) and m.get("ledger_pending") in (0, 0.0),
        )
    )
    led = extra.get("ledger")
    if led is None:
        out.append(
            Verdict(
                "ledger_final", "every completed request has a final record", "not judged: no ledger", None
            )
        )
    else:
        out.append(
            Verdict(
                "ledger_final",
                "every request the client saw complete, and every stream it cut, has a final record in the ledger",
                f"{led['completed_requests']:,} completed: {led['missing']} missing, {led['not_final']} not final; "
                f"{led['cut_requests']:,} cut: {led['cut_missing']} missing (statuses {led['cut_statuses']})",
                led["missing"] == 0 and led["not_final"] == 0 and led["cut_missing"] == 0,
            )
        )
        out.append(
            Verdict(
                "ledger_integrity",
                "PRAGMA integrity_check on the ledger says ok",
                str(led["integrity_check"]),
                led["integrity_check"] == "ok",
            )
        )
    if "proxy_exit" in extra:
        out.append(
            Verdict(
                "proxy_exit",
                "the proxy was alive to the end and exits 0 on SIGTERM (ledger flushed)",
                f"exit status {extra['proxy_exit']}",
                extra["proxy_exit"] == 0,
            )
        )
    return out


# -- report -----------------------------------------------------------------------------------------


def markdown(a: argparse.Namespace, soak: Soak, vs: list[Verdict], extra: dict[str, Any]) -> str:
    r = soak.results
    s1 = r["soak"]
    soak_rows = [x for x in soak.samples if x["phase"] == "soak"]
    warm = next((x for x in soak_rows if x["t_s"] >= a.warmup_s), soak_rows[-1] if soak_rows else None)
    fds = [x["proxy_fds"] for x in soak_rows if x["proxy_fds"] is not None]
    inflight = [x["inflight"] for x in soak_rows if x.get("inflight") is not None]
    sim = [x["sim_rss_mb"] for x in soak_rows if x.get("sim_rss_mb") is not None]
    pend = [x["ledger_pending"] for x in soak_rows if x.get("ledger_pending") is not None]
    cpu = [x["proxy_cpu_s"] for x in soak_rows if x.get("proxy_cpu_s") is not None]
    start = soak_rows[0] if soak_rows else None
    slope = r.get("rss_slope_mb_per_h")
    lines = [
        f"# qtrap soak: {a.duration:g} s at {a.streams} streams",
        "",
        f"Machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; {extra.get('mode')}.",
        f"Bench limits: max_connections {a.max_connections}, max_inflight_requests {a.max_inflight}, "
        f"header_timeout_s {a.header_timeout_s:g}, body_timeout_s {a.body_timeout_s:g}, "
        f"shed_retry_after_s {a.retry_after_s}; proxy open-file limit {r.get('proxy_nofile_limit')}.",
        "",
        "## Soak",
        "",
        "| figure | value |",
        "| --- | --- |",
        f"| requests completed (200, read to the end) | {s1['ok']:,} |",
        f"| streams cut by the client on purpose | {s1['disconnected_on_purpose']:,} |",
        f"| throughput | {s1['requests_per_s']:.1f} requests/s, {s1['tokens_per_s']:,.0f} tokens/s |",
        f"| request latency p50 / p99 / max | {lat(s1['latency'])} |",
        f"| probe (non-streaming, 8 tokens) p50 / p99 / max | {lat(s1['probe']['latency'])} |",
        f"| errors by kind | {s1['errors'] or 'none'} |",
        f"| proxy RSS at start / after warm-up ({a.warmup_s:g} s) / soak end | "
        f"{fmt(start and start['proxy_rss_mb'], '.1f')} / {fmt(warm and warm['proxy_rss_mb'], '.1f')} / "
        f"{fmt(s1['end']['rss_mb'], '.1f')} MB |",
        f"| proxy RSS slope after warm-up (least squares) | {fmt(slope, '+.2f')} MB/h over "
        f"{r.get('rss_slope_span_s', 0):.0f} s |",
        f"| proxy fds min / max / soak end | {min(fds, default='-')} / {max(fds, default='-')} / "
        f"{s1['end']['fds']} (idle before the run: {r['idle_before']['fds']}) |",
        f"| in flight (proxy's gauge) min / mean / max | {fmt(min(inflight, default=None), '.0f')} / "
        f"{fmt(sum(inflight) / len(inflight) if inflight else None, '.1f')} / "
        f"{fmt(max(inflight, default=None), '.0f')} |",
        f"| ledger pending records max | {fmt(max(pend, default=None), '.0f')} |",
        f"| proxy CPU | {fmt((cpu[-1] - cpu[0]) / max(1e-9, soak_rows[-1]['t_s'] - soak_rows[0]['t_s']) if len(cpu) > 1 else None, '.2f')} cores |",
        f"| simulator RSS start / end | {fmt(sim[0] if sim else None, '.1f')} / {fmt(sim[-1] if sim else None, '.1f')} MB |",
        "",
        "## Slow clients",
        "",
    ]
    sc = r["slow_clients"]
    for key, what in (("heads", "slow heads"), ("bodies", "silent bodies")):
        d = sc[key]
        lines.append(
            f"* {what}: {d['n']}, {d['got_408_and_closed_in_time']} answered 408 and closed in time; "
            f"statuses {d['statuses']}, outcomes {d['outcomes']}; "
            + ", ".join(f"{k} {v}" for k, v in d.items() if k.endswith(("_min", "_max")))
        )
    lines += [
        f"* normal traffic alongside ({a.phase_streams} streams): {sc['normal']['ok']:,} ok, "
        f"latency {lat(sc['normal']['latency'])}, errors {sc['normal']['errors'] or 'none'}; "
        f"probes {lat(sc['probe']['latency'])}; proxy fds during the phase {sc['proxy_fds_during']}",
        "",
        "## Connection flood",
        "",
    ]
    fl = r["flood"]
    f = fl["flood"]
    lines += [
        f"* {a.flood_connections} flooding clients for {a.flood_s:g} s: statuses {f['statuses']}, "
        f"outcomes besides 200 {f['errors'] or 'none'}; 200s took {lat(f['latency'])}",
        f"* normal traffic alongside: {fl['normal']['ok']:,} ok, statuses {fl['normal']['statuses']}; probes "
        f"statuses {fl['probe']['statuses']}",
        f"* proxy before / peak / after settling: RSS {fmt(fl['before']['rss_mb'], '.1f')} / "
        f"{fl['peak']['rss_mb']:.1f} / {fmt(r['after']['rss_mb'], '.1f')} MB, fds {fl['before']['fds']} / "
        f"{fl['peak']['fds']} / {r['after']['fds']} ({r['after']['waited_s']} s after the load; without upstream "
        f"pool sockets back after {fmt(r['after']['without_upstream_back_after_s'], 'g')} s)",
        f"* after the flood: {fl['recovery']['ok']} of {a.recovery_requests} normal requests ok",
        "",
    ]
    led = extra.get("ledger")
    if led is not None:
        lines += [
            "## Ledger",
            "",
            f"* {led['records']:,} records, statuses {led['statuses']}; integrity_check: {led['integrity_check']}",
            "",
        ]
    lines += ["## Verdicts", "", "| verdict | criterion | observed | result |", "| --- | --- | --- | --- |"]
    for v in vs:
        res = "n/a" if v.passed is None else ("PASS" if v.passed else "**FAIL**")
        lines.append(f"| {v.name} | {v.criterion} | {v.observed} | {res} |")
    return "\n".join(lines) + "\n"


def lat(d: dict[str, Any]) -> str:
    if not d.get("n"):
        return "-"
    return f"{d['p50_s'] * 1e3:.0f} / {d['p99_s'] * 1e3:.0f} / {d['max_s'] * 1e3:.0f} ms"


# -- processes --------------------------------------------------------------------------------------


@contextlib.contextmanager
def spawn(
    cmd: list[str], ready_url: str, log: Path, nofile: int | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A child server (own process group), optionally with a lower soft open-file limit; stopped at the end."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with log.open("wb") as out:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(nofile, hard), hard))
        try:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        wait_http(ready_url, proc, 60, log)
        yield proc
    finally:
        stop(proc)


def proxy_config(a: argparse.Namespace, out: Path, sim_port: int) -> dict[str, Any]:
    return {
        "server": {
            "port": a.port,
            "max_connections": a.max_connections,
            "max_inflight_requests": a.max_inflight,
            "header_timeout_s": a.header_timeout_s,
            "body_timeout_s": a.body_timeout_s,
            "shed_retry_after_s": a.retry_after_s,
        },
        "ledger": {"path": str(out / "ledger.sqlite")},
        "backends": [
            {
                "name": "sim",
                "pool": a.model,
                "precision": "bf16",
                "kind": "vllm",
                "url": f"http://127.0.0.1:{sim_port}",
                "model": a.model,
                "devices": [{"host": "qtrap-sim", "index": 0}],
            }
        ],
        "meter": {"kind": "dcgm", "urls": [f"http://127.0.0.1:{sim_port}/dcgm/metrics"]},
    }


def run_all(a: argparse.Namespace, out: Path) -> int:
    extra: dict[str, Any] = {}
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if a.proxy:
        if not a.proxy_pid:
            raise SoakError("--proxy needs --proxy-pid (the proxy's process id, for RSS and fds)")
        if not Path(f"/proc/{a.proxy_pid}").exists():
            raise SoakError(f"--proxy-pid {a.proxy_pid}: no such process")
        url = a.proxy.rstrip("/")
        m = re.match(r"https?://[^/:]+:(\d+)", url)
        if not m:
            raise SoakError(f"--proxy {a.proxy!r}: expected http://HOST:PORT")
        a.port = int(m.group(1))
        try:
            wait_http(url + "/v1/models", None, 10)
        except TimeoutError as e:
            raise SoakError(f"--proxy {url}: does not answer ({e})") from None
        extra["mode"] = f"an already running proxy at {url} (pid {a.proxy_pid})"
        soak = Soak(a, url, a.proxy_pid, a.sim_pid)
        asyncio.run(soak.run())
        if a.ledger:
            extra["ledger"] = ledger_check(Path(a.ledger), soak.completed_ids, soak.cut_ids)
    else:
        sim_port = free_port()
        a.port = free_port()
        (out / "proxy.yaml").write_text(yaml.safe_dump(proxy_config(a, out, sim_port)))
        py = sys.executable
        sim_cmd = [
            py, "-m", "qtrap_sim", "--port", str(sim_port), "--model", a.model, "--step-ms", str(a.step_ms),
            "--max-num-seqs", str(a.sim_max_seqs), "--log-level", "warning",
        ]  # fmt: skip
        proxy_cmd = [
            py,
            "-m",
            "qtrap_proxy",
            "serve",
            "--config",
            str(out / "proxy.yaml"),
            "--log-level",
            "warning",
        ]
        url = f"http://127.0.0.1:{a.port}"
        extra["mode"] = (
            f"qtrap-sim (linear model, {a.step_ms:g} ms per step, max_num_seqs {a.sim_max_seqs}) and qtrap-proxy "
            "(DCGM meter on the simulator's counter) started by the script"
        )
        with (
            spawn(sim_cmd, f"http://127.0.0.1:{sim_port}/health", out / "sim.log") as sim,
            spawn(proxy_cmd, url + "/v1/models", out / "proxy.log", nofile=a.proxy_nofile) as proxy,
        ):
            soak = Soak(a, url, proxy.pid, sim.pid)
            asyncio.run(soak.run())
            alive = proxy.poll() is None
            stop(proxy, signal.SIGTERM, grace_s=60)
            extra["proxy_exit"] = proxy.returncode if alive else f"died early ({proxy.returncode})"
        extra["emfile_log_lines"] = len(EMFILE_RE.findall((out / "proxy.log").read_bytes()))
        extra["ledger"] = ledger_check(out / "ledger.sqlite", soak.completed_ids, soak.cut_ids)
    vs = verdicts(a, soak, extra)
    doc = {
        "settings": {k: v for k, v in vars(a).items() if k != "out"},
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "load_avg_at_end": os.getloadavg(),
        },
        "mode": extra.get("mode"),
        "results": soak.results,
        "ledger": extra.get("ledger"),
        "emfile_log_lines": extra.get("emfile_log_lines"),
        "proxy_exit": extra.get("proxy_exit"),
        "verdicts": [v.as_dict() for v in vs],
        "passed": all(v.passed is not False for v in vs),
        "samples": soak.samples,
    }
    (out / "soak.json").write_text(json.dumps(doc, indent=1, default=str))
    md = markdown(a, soak, vs, extra)
    (out / "soak.md").write_text(md)
    print(md, flush=True)
    print(f"written: {out / 'soak.json'}, {out / 'soak.md'}", flush=True)
    return 0 if doc["passed"] else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="bench/soak.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = ap.add_argument_group("what to soak")
    g.add_argument(
        "--proxy", help="URL of an already running proxy (default: start qtrap-sim and qtrap-proxy)"
    )
    g.add_argument("--proxy-pid", type=int, help="with --proxy: its process id (RSS, fds from /proc)")
    g.add_argument("--sim-pid", type=int, help="with --proxy: a backend's process id to sample too")
    g.add_argument("--ledger", help="with --proxy: its ledger file, for the ledger checks")
    g.add_argument("--model", default="qwen3-8b", help="model / pool name in requests (default: qwen3-8b)")
    g.add_argument(
        "--step-ms",
        type=float,
        default=20.0,
        help="simulator's decode step (default 20 ms: 50 tokens/s per stream)",
    )
    g.add_argument(
        "--sim-max-seqs",
        type=int,
        default=1024,
        help="simulator's largest batch (default 1024: it never queues)",
    )
    g.add_argument(
        "--proxy-nofile",
        type=int,
        default=1024,
        help="soft open-file limit the started proxy begins with (default 1024)",
    )
    g = ap.add_argument_group("phase 1: soak")
    g.add_argument("--duration", type=float, default=1800.0, help="seconds of soak (default 1800)")
    g.add_argument("--streams", type=int, default=256, help="concurrent closed-loop clients (default 256)")
    g.add_argument(
        "--nonstream-share", type=float, default=0.1, help="share of non-streaming requests (default 0.1)"
    )
    g.add_argument(
        "--disconnect-share",
        type=float,
        default=0.02,
        help="share of streams the client cuts after 3 chunks (default 0.02)",
    )
    g.add_argument(
        "--min-tokens", type=int, default=16, help="completion tokens per request, least (default 16)"
    )
    g.add_argument(
        "--max-tokens", type=int, default=128, help="completion tokens per request, most (default 128)"
    )
    g.add_argument("--sample-s", type=float, default=10.0, help="sampling period (default 10 s)")
    g.add_argument(
        "--warmup-s",
        type=float,
        help="start of the steady part for the RSS slope (default: min(300, duration/5))",
    )
    g.add_argument(
        "--probe-every-s",
        type=float,
        default=1.0,
        help="one non-streaming probe request this often (default 1 s)",
    )
    g = ap.add_argument_group("phase 2: slow clients")
    g.add_argument("--slow-headers", type=int, default=200, help="connections trickling a head (default 200)")
    g.add_argument(
        "--slow-bodies", type=int, default=50, help="connections trickling a body, then silent (default 50)"
    )
    g.add_argument("--trickle-s", type=float, default=1.0, help="seconds between trickled bytes (default 1)")
    g.add_argument(
        "--body-trickle-s",
        type=float,
        help="seconds a body trickles before it falls silent (default 2 x body timeout)",
    )
    g.add_argument(
        "--phase-streams", type=int, default=32, help="normal streams during phases 2 and 3 (default 32)"
    )
    g.add_argument(
        "--probe-max-s",
        type=float,
        default=5.0,
        help="longest a probe may take during the slow clients (default 5 s)",
    )
    g = ap.add_argument_group("phase 3: connection flood")
    g.add_argument("--flood-connections", type=int, help="flooding clients (default 2 x --max-connections)")
    g.add_argument("--flood-s", type=float, default=20.0, help="seconds of flood (default 20)")
    g.add_argument("--flood-tokens", type=int, default=32, help="tokens per flood request (default 32)")
    g.add_argument(
        "--flood-pause-s",
        type=float,
        default=0.05,
        help="a flooding client's pause between requests (default 0.05)",
    )
    g.add_argument(
        "--recovery-requests", type=int, default=20, help="normal requests after the flood (default 20)"
    )
    g.add_argument(
        "--settle-s",
        type=float,
        default=90.0,
        help="longest wait for the fds to return after the load (default 90 s: the upstream keep-alive is 60 s)",
    )
    g.add_argument(
        "--ledger-wait-s",
        type=float,
        default=60.0,
        help="longest wait for the ledger to commit everything (default 60 s)",
    )
    g = ap.add_argument_group("the proxy's limits (set in the started proxy; must match a --proxy's config)")
    g.add_argument("--max-connections", type=int, default=512, help="server.max_connections (default 512)")
    g.add_argument("--max-inflight", type=int, default=384, help="server.max_inflight_requests (default 384)")
    g.add_argument("--header-timeout-s", type=float, default=5.0, help="server.header_timeout_s (default 5)")
    g.add_argument("--body-timeout-s", type=float, default=5.0, help="server.body_timeout_s (default 5)")
    g.add_argument("--retry-after-s", type=int, default=1, help="server.shed_retry_after_s (default 1)")
    g = ap.add_argument_group("verdicts")
    g.add_argument(
        "--max-rss-slope-mb-h",
        type=float,
        default=20.0,
        help="largest RSS slope after warm-up (default 20 MB/h)",
    )
    g.add_argument(
        "--min-slope-span-s",
        type=float,
        default=300.0,
        help="the slope is judged only over at least this steady span (default 300 s)",
    )
    g.add_argument(
        "--max-rss-growth-mb",
        type=float,
        default=32.0,
        help="RSS after the flood above the soak's end, at most (default 32 MB)",
    )
    g.add_argument(
        "--fd-tolerance",
        type=int,
        default=8,
        help="fds after the load above the idle count, at most (default 8)",
    )
    g.add_argument(
        "--timeout-slack-s",
        type=float,
        default=2.0,
        help="slack on the 408 deadlines on a loaded machine (default 2 s)",
    )
    g.add_argument(
        "--request-timeout-s",
        type=float,
        default=30.0,
        help="client connect timeout (default 30 s); reads time out after 30 s of silence",
    )
    g = ap.add_argument_group("output")
    g.add_argument("--out", help="directory for soak.json, soak.md and the logs (default: a new temp dir)")
    g.add_argument(
        "--print-every-s",
        type=float,
        default=60.0,
        help="progress line period when not on a terminal (default 60 s)",
    )
    g.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    if a.warmup_s is None:
        a.warmup_s = min(300.0, a.duration / 5)
    if a.body_trickle_s is None:
        a.body_trickle_s = 2 * a.body_timeout_s
    if a.flood_connections is None:
        a.flood_connections = 2 * a.max_connections
    a.port = 0
    for name in ("duration", "sample_s", "trickle_s", "step_ms", "flood_s"):
        if getattr(a, name) <= 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if a.streams < 1 or a.min_tokens < 1 or a.max_tokens < a.min_tokens:
        ap.error("--streams and --min-tokens must be >= 1 and --max-tokens >= --min-tokens")
    if a.streams + 2 > a.max_inflight:
        ap.error(
            f"--streams {a.streams} must stay below --max-inflight {a.max_inflight} (the soak is meant not to shed)"
        )
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="qtrap-soak-"))
    try:
        out.mkdir(parents=True, exist_ok=True)
        return run_all(a, out)
    except SoakError as e:
        print(f"soak: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, TimeoutError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"soak: {type(e).__name__}: {first} (logs in {out})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("soak: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
