"""Load generator capacity: loadgen's own scheduling delay at 2,000 concurrent streams.

Starts the instant backend (bench/instant_backend.py with ``--stamp``: every content
chunk carries the backend's ``time.monotonic()`` at the moment it sent it) as a child
process and drives it with loadgen's own closed loop: ``run_level`` with a
``ChatClient`` on an aiohttp session with an unlimited connector, as the ``loadgen``
command runs it, over synthetic problems replayed as chains of dependent requests
(``--hops requests``). A stream carries ``--chunks`` tokens on average (uniformly 1 to
2 x chunks - 1, so that the closed loop's requests do not all end together)
``--chunk-ms`` apart, so each request lasts long enough that all ``--concurrency``
workers have a stream open at once. ``--phase random`` (default) starts each stream's
chunks at a random point of the interval; ``--phase step`` sends every stream's chunk
on the same clock tick, as a batching engine does once per decode step.
CLOCK_MONOTONIC is shared by the processes of one machine, so the backend's stamps
and loadgen's timestamps compare directly.

Measured from the moment every worker has had its first request answered (the
level's start, when all workers connect at once, is over) to the end of loadgen's
steady-state window (``--duration`` seconds after it opens); the level is then cut
short instead of drained:

* scheduling delay (the headline): for every request but a worker's first, the time
  from the backend writing the last bytes of the worker's previous response to
  loadgen handing the next request to aiohttp (``Exchange.t_send``). It is the
  time loadgen takes to close the loop: its event loop noticing the bytes, parsing
  the end of the stream, scoring or building the next hop's prompt and starting the
  request. The loopback hop (tens of microseconds) and any delay in the backend's
  own write after the stamp are in it too, so it is an upper bound;
* of which t_end -> next t_send: the part after loadgen has seen the end of the
  response (the chain logic between two requests);
* token observation lag: ``Exchange.t_first`` minus the first chunk's send stamp,
  i.e. how late loadgen timestamps the first token it is sent (the error in its TTFT);
* event-loop lag: a probe task sleeps 1 ms at a time and records how late it wakes.
  It samples once per loop iteration, so a long iteration counts once however long
  it is (the delays above count every request); the idle figure is printed first;
* requests/s, chunks/s, requests in flight (sampled every 0.1 s), cyclic garbage
  collections, and CPU as a fraction of one core: loadgen's (getrusage), the
  backend's (/proc/PID/stat), and the whole machine's busy time (/proc/stat: both
  processes, the kernel's share of the networking and anything else running).

Usage:
  .venv/bin/python bench/loadgen_capacity.py [--quick] [--loop asyncio] [--chunk-ms 100] [--out r.json]
  .venv/bin/python bench/loadgen_capacity.py --loop asyncio,uvloop --chunk-ms 400,200,100,50 --repeats 3
A list (or --repeats) runs every combination in a fresh process, each after the
machine is idle, and prints a table of medians.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp

from loadgen.client import ChatClient, Exchange
from loadgen.datasets import synthetic
from loadgen.runner import LevelPlan, run_level
from qtrap_common.localproc import child, free_port

ROOT = Path(__file__).resolve().parent.parent
TARGET_P99_MS = 5.0


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def dist_ms(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_ms": pct(values, 0.5) * 1e3,
        "p99_ms": pct(values, 0.99) * 1e3,
        "max_ms": max(values) * 1e3 if values else float("nan"),
    }


def first_stamp(ex: Exchange) -> float:
    return float(ex.text.split(None, 1)[0])


def last_stamp(ex: Exchange) -> float:
    return float(ex.text.rsplit(None, 1)[-1])


class Probe:
    """Sleeps ``period_s`` at a time and records (wake time, lateness)."""

    def __init__(self, period_s: float = 1e-3) -> None:
        self.period_s = period_s
        self.samples: list[tuple[float, float]] = []

    async def run(self) -> None:
        while True:
            due = time.monotonic() + self.period_s
            await asyncio.sleep(self.period_s)
            now = time.monotonic()
            self.samples.append((now, now - due))


class GcPauses:
    """Cyclic garbage collections as (start, seconds, generation)."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, float, int]] = []
        self._t0 = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.monotonic()
        else:
            self.pauses.append((self._t0, time.monotonic() - self._t0, info["generation"]))


async def idle_lag(seconds: float) -> list[float]:
    probe = Probe()
    task = asyncio.create_task(probe.run())
    await asyncio.sleep(seconds)
    task.cancel()
    return [lag for _, lag in probe.samples]


def machine_busy_s() -> float:
    """CPU seconds all cores of the machine have spent not idle (from /proc/stat)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


class RecordingClient(ChatClient):
    """loadgen's ChatClient, noting which worker (task) sent each request, in order, and how many are open."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.by_worker: dict[int, list[Exchange]] = defaultdict(list)
        self.open = 0

    async def chat(self, prompt: str, *, chain: str, hop: int, headers: dict[str, str]) -> Exchange:
        self.open += 1
        try:
            ex = await super().chat(prompt, chain=chain, hop=hop, headers=headers)
        finally:
            self.open -= 1
        self.by_worker[id(asyncio.current_task())].append(ex)
        return ex


async def measure(args: argparse.Namespace, url: str, backend_pid: int) -> dict[str, Any]:
    idle = await idle_lag(1.0)
    c = args.concurrency
    problems = synthetic(max(1000, 2 * c), seed=0)
    plan = LevelPlan("bf16", c, 0, warmup=c, num_chains=None, duration_s=args.duration, hops_mode="requests")
    # (monotonic, loadgen CPU s, backend CPU s, machine CPU s, requests in flight)
    cpu: list[tuple[float, float, float, float, int]] = []
    stop = asyncio.Event()

    def on_window(which: str, _t: float) -> None:
        if which == "close":
            stop.set()  # the measurement is over: cut the drain short (requests in flight are abandoned)

    async def sampler() -> None:
        while True:
            cpu.append(
                (time.monotonic(), self_cpu_s(), proc_cpu_s(backend_pid), machine_busy_s(), client.open)
            )
            await asyncio.sleep(0.1)

    gcp = GcPauses()
    gc.callbacks.append(gcp)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        client = RecordingClient(session, url, "m", max_tokens=args.chunks, seed=0)
        probe = Probe()
        probe_task = asyncio.create_task(probe.run())
        cpu_task = asyncio.create_task(sampler())
        run = await run_level(client, plan, problems, "cap", stop=stop, on_window=on_window)
    probe_task.cancel()
    cpu_task.cancel()
    gc.callbacks.remove(gcp)
    if run.window is None:
        raise SystemExit("the level never reached steady state: raise --duration")
    w0, w1 = run.window
    # measure from the moment every worker has had its first request answered: by then the level's start,
    # when all workers connect and send at once, is over
    seqs = list(client.by_worker.values())
    w0 = max([w0] + [seq[0].t_end for seq in seqs])
    cpu_in = [x for x in cpu if w0 <= x[0] <= w1]
    if len(cpu_in) < 2:
        raise SystemExit("no steady state after every worker's first request: raise --duration")
    w0, w1 = cpu_in[0][0], cpu_in[-1][0]  # the window, trimmed to the CPU samples
    wall = w1 - w0
    exchanges = run.exchanges
    bad = [e for e in exchanges if e.status != "ok"]
    issue: list[float] = []  # backend's last bytes of the previous response -> next t_send
    between: list[float] = []  # loadgen's t_end of the previous response -> next t_send
    for seq in seqs:
        for prev, nxt in itertools.pairwise(seq):
            if w0 <= nxt.t_send <= w1 and prev.status == "ok":
                issue.append(nxt.t_send - last_stamp(prev))
                between.append(nxt.t_send - prev.t_end)
    firsts = [
        e.t_first - first_stamp(e)
        for e in exchanges
        if e.status == "ok" and e.t_first is not None and w0 <= e.t_first <= w1
    ]
    done = [e for e in exchanges if w0 <= e.t_end <= w1]
    chunks = sum(e.chunks for e in done)
    lag = [x for t, x in probe.samples if w0 <= t <= w1]
    pauses = [(d, g) for t, d, g in gcp.pauses if w0 <= t <= w1]
    lg_cpu, be_cpu, all_cpu = (cpu_in[-1][i] - cpu_in[0][i] for i in (1, 2, 3))
    res: dict[str, Any] = {
        "window_s": wall,
        "requests": len(exchanges),
        "errors": len(bad),
        "first_error": bad[0].error if bad else None,
        "requests_per_s": len(done) / wall,
        "chunks_per_s": chunks / wall,
        "in_flight": {  # sampled every 0.1 s
            "peak": max(x[4] for x in cpu_in),
            "mean": sum(x[4] for x in cpu_in) / len(cpu_in),
            "least": min(x[4] for x in cpu_in),
        },
        "scheduling_delay": dist_ms(issue),
        "t_end_to_t_send": dist_ms(between),
        "token_observation_lag": dist_ms(firsts),
        "loop_lag": dist_ms(lag),
        "loop_lag_idle": dist_ms(idle),
        "gc": {
            "collections": len(pauses),
            "total_ms": sum(d for d, _ in pauses) * 1e3,
            "max_ms": max((d for d, _ in pauses), default=0.0) * 1e3,
        },
        "first_request_after_level_start": dist_ms([seq[0].t_send - run.t_start for seq in seqs]),
        "loadgen_cpu_cores": lg_cpu / wall,
        "backend_cpu_cores": be_cpu / wall,
        "machine_busy_cores": all_cpu / wall,
        "loadgen_cpu_us_per_request": lg_cpu / max(len(done), 1) * 1e6,
        "loadgen_cpu_us_per_chunk": lg_cpu / max(chunks, 1) * 1e6,
    }
    res["target_met"] = res["scheduling_delay"]["p99_ms"] <= TARGET_P99_MS
    return res


def report(res: dict[str, Any]) -> None:
    def line(name: str, d: dict[str, float]) -> str:
        return (
            f"{name:<34} p50 {d['p50_ms']:8.3f} ms  p99 {d['p99_ms']:8.3f} ms  "
            f"max {d['max_ms']:8.3f} ms  (n={d['n']})"
        )

    a, f, g = res["settings"], res["in_flight"], res["gc"]
    print(
        f"{a['concurrency']} workers, {a['chunks']} chunks (mean) {a['chunk_ms']:g} ms apart per request, "
        f"phase {a['phase']}, loadgen on {a['loop']}; window {res['window_s']:.1f} s"
    )
    print(
        f"requests/s {res['requests_per_s']:,.0f}  chunks/s {res['chunks_per_s']:,.0f}  "
        f"in flight: peak {f['peak']}, mean {f['mean']:.0f}, least {f['least']}  "
        f"errors {res['errors']} of {res['requests']}" + (f" ({res['first_error']})" if res["errors"] else "")
    )
    print(line("scheduling delay", res["scheduling_delay"]))
    print(line("  of which t_end -> next t_send", res["t_end_to_t_send"]))
    print(line("token observation lag", res["token_observation_lag"]))
    print(line("event-loop lag (1 ms probe)", res["loop_lag"]))
    print(line("event-loop lag, idle", res["loop_lag_idle"]))
    print(line("first request after level start", res["first_request_after_level_start"]))
    print(
        f"garbage collection in the window: {g['collections']} collections, {g['total_ms']:.0f} ms, "
        f"longest {g['max_ms']:.1f} ms"
    )
    print(
        f"CPU (cores): loadgen {res['loadgen_cpu_cores']:.2f} ({res['loadgen_cpu_us_per_request']:.0f} "
        f"us/request, {res['loadgen_cpu_us_per_chunk']:.1f} us/chunk), backend {res['backend_cpu_cores']:.2f}, "
        f"whole machine busy {res['machine_busy_cores']:.2f} of {os.cpu_count()}"
    )
    verdict = "met" if res["target_met"] else "NOT met"
    print(f"target: scheduling delay p99 <= {TARGET_P99_MS:g} ms: {verdict}", flush=True)


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="qtrap-bench-"))
    cmd = [
        sys.executable,
        str(ROOT / "bench/instant_backend.py"),
        "--port",
        str(port),
        "--chunks",
        str(args.chunks),
        "--interval-ms",
        str(args.chunk_ms),
        "--stamp",
        "--phase",
        args.phase,
        "--loop",
        args.backend_loop,
    ]
    if not args.fixed_length:
        cmd.append("--vary-length")
    if args.loop == "uvloop":
        import uvloop

        uvloop.install()
    with child(cmd, f"http://127.0.0.1:{port}/health", tmp / "backend.log") as backend:
        res = asyncio.run(measure(args, f"http://127.0.0.1:{port}", backend.pid))
    res["settings"] = {k: v for k, v in vars(args).items() if k not in ("out", "repeats")}
    res["machine"] = {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "aiohttp": aiohttp.__version__,
    }
    return res


def wait_idle(limit_s: float = 900.0) -> None:
    """On a shared machine: wait until everything else uses less than a quarter of a core (over 3 s)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        b0 = machine_busy_s()
        time.sleep(3.0)
        busy = (machine_busy_s() - b0) / 3.0
        if busy < 0.25:
            return
        print(f"machine busy ({busy:.2f} cores): waiting", flush=True)
        time.sleep(10.0)


def matrix(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every combination of --loop, --phase and --chunk-ms, --repeats times, each in a fresh process;
    a table of medians over the repeats at the end."""
    configs = list(itertools.product(args.loop, args.phase, args.chunk_ms))
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="qtrap-bench-") as tmp:
        for rep in range(args.repeats):
            for i, (loop, phase, ms) in enumerate(configs):
                out = Path(tmp) / f"{rep}-{i}.json"
                cmd = [sys.executable, __file__, "--loop", loop, "--phase", phase, "--chunk-ms", f"{ms:g}"]
                cmd += ["--concurrency", str(args.concurrency), "--chunks", str(args.chunks)]
                cmd += ["--duration", f"{args.duration:g}", "--backend-loop", args.backend_loop]
                cmd += ["--out", str(out)] + (["--fixed-length"] if args.fixed_length else [])
                wait_idle()
                print(f"run {rep + 1}/{args.repeats}: {' '.join(cmd[2:-2])}", flush=True)
                subprocess.run(cmd, check=True)
                print(flush=True)
                results.append(json.loads(out.read_text()))
    table(results)
    return results


def table(results: list[dict[str, Any]]) -> None:
    """Medians over the runs of each configuration, as a Markdown table."""

    def med(rs: list[dict[str, Any]], *keys: str) -> float:
        vals = []
        for r in rs:
            v: Any = r
            for k in keys:
                v = v[k]
            vals.append(float(v))
        return statistics.median(vals)

    configs: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for r in results:
        a = r["settings"]
        configs.setdefault((a["loop"], a["phase"], a["chunk_ms"]), []).append(r)
    print("medians over the runs of each configuration; p99 range = lowest..highest p99 of the runs")
    print(
        "| loadgen loop | chunk phase | chunk gap | chunks/s | requests/s | in flight (mean) "
        "| scheduling delay p50 | **p99** | p99 range | max | token observation lag p99 "
        "| loadgen CPU | backend CPU | machine busy | p99 <= 5 ms |"
    )
    print("| --- " * 15 + "|")
    for (loop, phase, ms), rs in configs.items():
        p99s = sorted(r["scheduling_delay"]["p99_ms"] for r in rs)
        print(
            f"| {loop} | {phase} | {ms:g} ms | {med(rs, 'chunks_per_s'):,.0f} | {med(rs, 'requests_per_s'):,.0f} | "
            f"{med(rs, 'in_flight', 'mean'):,.0f} | {med(rs, 'scheduling_delay', 'p50_ms'):.2f} ms | "
            f"**{med(rs, 'scheduling_delay', 'p99_ms'):.2f} ms** | {p99s[0]:.1f}..{p99s[-1]:.1f} ms | "
            f"{med(rs, 'scheduling_delay', 'max_ms'):.1f} ms | {med(rs, 'token_observation_lag', 'p99_ms'):.2f} ms | "
            f"{med(rs, 'loadgen_cpu_cores'):.2f} | {med(rs, 'backend_cpu_cores'):.2f} | "
            f"{med(rs, 'machine_busy_cores'):.2f} | {sum(r['target_met'] for r in rs)} of {len(rs)} runs |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=2000, help="closed-loop workers (streams)")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of loadgen's steady-state window")
    ap.add_argument("--chunks", type=int, default=16, help="content chunks (tokens) per request, on average")
    ap.add_argument(
        "--chunk-ms",
        type=lambda v: [float(x) for x in v.split(",")],
        default=[100.0],
        help="gap between a stream's chunks in ms (a comma-separated list runs each)",
    )
    ap.add_argument(
        "--phase",
        type=lambda v: v.split(","),
        default=["random"],
        help="when streams' chunks go out (bench/instant_backend.py): random (default: random phases), step "
        "(in step, like an engine's decode steps) or arrival (counted from each request's arrival); a list runs each",
    )
    ap.add_argument(
        "--loop",
        type=lambda v: v.split(","),
        default=["asyncio"],
        help="loadgen's event loop: asyncio (as the loadgen command runs) or uvloop; a list runs each",
    )
    ap.add_argument(
        "--repeats", type=int, default=1, help="runs of each configuration, each in a fresh process"
    )
    ap.add_argument(
        "--fixed-length",
        action="store_true",
        help="every stream exactly --chunks long (default: uniform in 1 .. 2 x chunks - 1)",
    )
    ap.add_argument(
        "--backend-loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="the backend's event loop (auto: uvloop when installed)",
    )
    ap.add_argument("--quick", action="store_true", help="short run: a 10 s window")
    ap.add_argument("--out", help="write the results here as JSON")
    ap.add_argument(
        "--table", metavar="JSON", help="print the table of a list of runs written by --out, and exit"
    )
    args = ap.parse_args()
    if args.table:
        table(json.loads(Path(args.table).read_text()))
        return
    for v in args.loop:
        if v not in ("asyncio", "uvloop"):
            ap.error(f"--loop {v}: choose asyncio or uvloop")
    for v in args.phase:
        if v not in ("random", "step", "arrival"):
            ap.error(f"--phase {v}: choose random, step or arrival")
    if args.quick:
        args.duration = 10.0
    if len(args.loop) * len(args.phase) * len(args.chunk_ms) * args.repeats > 1:
        out: Any = matrix(args)
    else:
        args.loop, args.phase, args.chunk_ms = args.loop[0], args.phase[0], args.chunk_ms[0]
        out = run_one(args)
        report(out)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
