"""Schedules end to end: ``python -m loadgen --schedule ...`` (the schedule once per precision, pinned) and
``python -m loadgen compare-routing`` (one schedule under several routing policies, one after another).

Policies: a precision P (every request sent as ``pool@P``), ``round_robin`` (unpinned requests: the
proxy's own routing as configured; today's proxy sends them to the pool's default precision, round robin
over its replicas) and ``cost`` (unpinned requests against a proxy whose pool has ``routing: cost``).
With the embedded default, loadgen writes ``pools.<pool>.routing: cost`` (and ``--cost-config`` under
``pools.<pool>.cost``) into a second proxy's config; a proxy that refuses the key is reported as "not
run" with its one-line reason. Against ``--proxy``, cost and round_robin both send unpinned requests and
measure whatever the proxy is configured with: ``--policies`` names what it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import re
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from loadgen.app import (
    Display,
    Fail,
    _loop_factory,
    _on_sigint,
    _problems,
    external_precisions,
    write_outputs,
)
from loadgen.client import ChatClient, key_session_args
from loadgen.context import fetch_backends, redact_keys, run_context
from loadgen.datasets import write_source
from loadgen.embedded import PRECISIONS, embedded_stack
from loadgen.proxyapi import admin_refused, energy_snapshot, fetch_records
from loadgen.report import _clean, build_scheduled, energy_summary, write_csv
from loadgen.runner import Chain, LevelRun
from loadgen.schedreport import (
    POLICY_HEAD,
    _console,
    _print_table,
    comparison,
    policy_rows,
    render_schedules,
    write_markdown,
)
from loadgen.schedule import Schedule
from loadgen.scheduled import SchedulePlan, run_schedule
from loadgen.schema import GENERATOR, SCHEMA_VERSION, CompareRouting, Config
from loadgen.timeline import summarise

UNPINNED = ("round_robin", "cost")


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    kind: str  # pinned | round_robin | cost
    model: str  # the model field sent


def policies_for(names: list[str], pool: str, precisions: list[str]) -> list[Policy]:
    out = []
    for n in names:
        if n in UNPINNED:
            out.append(Policy(n, n, pool))
        elif n in precisions:
            out.append(Policy(n, "pinned", f"{pool}@{n}"))
        else:
            raise Fail(
                f"unknown policy {n!r}: choose precisions the proxy serves ({', '.join(precisions)}), "
                "round_robin or cost"
            )
    return out


def _config(args: argparse.Namespace, precisions: list[str]) -> Config:
    sched: Schedule = args.schedule
    return Config(
        proxy=args.proxy or f"embedded default (qtrap_sim, simulated {args.sim_gpu.upper()})",
        model=args.model or "qwen3-8b",
        precisions=precisions,
        dataset=args.dataset,
        data_file=args.data_file,
        hops=args.hops,
        seed=args.seed,
        max_tokens=args.max_tokens or (1024 if args.hops == "stream" else 256),
        extra_body=args.extra_body,
        bootstrap=args.bootstrap,
        scoring="strict (#### N / Answer: letter)" if not args.no_score else f"not scored: {args.no_score}",
        no_score=args.no_score,
        argv=redact_keys(sys.argv[1:]),
        schedule=sched.spec,
        schedule_unit=args.schedule_unit,
        arrivals=None if args.schedule_unit == "concurrency" else args.arrivals,
        window_s=args.window,
    )


async def _run_policy(
    session: aiohttp.ClientSession,
    url: str,
    policy: Policy,
    args: argparse.Namespace,
    problems: list[Any],
    display: Display,
    stop: asyncio.Event,
    run_id: str,
) -> tuple[dict[str, Any], LevelRun]:
    """One schedule under one policy: energy readings every window, then the final records."""
    sched: Schedule = args.schedule
    scored = not args.no_score
    client = ChatClient(
        session,
        url,
        policy.model,
        max_tokens=args.max_tokens or (1024 if args.hops == "stream" else 256),
        seed=args.seed,
        timeout_s=args.timeout,
        extra_body=args.extra_body,
    )
    plan = SchedulePlan(
        policy.name, sched, args.schedule_unit, args.arrivals, args.hops, args.seed, report_scores=scored
    )
    snaps: list[Any] = [await energy_snapshot(session, url)]
    finished = asyncio.Event()
    counts = [0, 0]
    t0 = time.monotonic()
    desc = f"{policy.name} {sched.spec}"
    display.level_start(desc, math.ceil(sched.duration_s))

    def on_chain(chain: Chain) -> None:
        counts[1] += 1
        counts[0] += bool(chain.score and chain.score.strict)

    async def sampler() -> None:
        k = 1
        while not finished.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(finished.wait(), max(0.0, t0 + k * args.window - time.monotonic()))
            if finished.is_set():
                return
            snaps.append(await energy_snapshot(session, url))
            k += 1

    async def ticker() -> None:
        while not finished.is_set():
            t = time.monotonic() - t0
            done = f"correct {counts[0]}/{counts[1]}" if scored else f"{counts[1]} chains"
            display.schedule_progress(
                min(t, sched.duration_s),
                f"offered {sched.value_at(t):.3g} {args.schedule_unit}, {done}"
                if t < sched.duration_s
                else f"draining, {done}",
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(finished.wait(), 0.5)

    side = [asyncio.create_task(sampler()), asyncio.create_task(ticker())]
    result = await run_schedule(
        client, plan, problems, f"lg-{run_id}-{policy.name}", stop=stop, on_chain=on_chain
    )
    finished.set()
    await asyncio.gather(*side)
    snaps.append(await energy_snapshot(session, url))
    missing = await fetch_records(
        session, url, result.run, timeout_s=2.0 if stop.is_set() else args.final_timeout
    )
    display.level_end(desc, result.run, missing)
    doc = summarise(
        result,
        snaps,
        model=policy.model,
        window_s=args.window,
        scored=scored,
        bootstrap=args.bootstrap,
        seed=args.seed,
    )
    return doc, result.run


async def _run_policies(
    args: argparse.Namespace,
    url: str,
    policies: list[Policy],
    problems: list[Any],
    display: Display,
    stopped: list[bool],
) -> tuple[list[tuple[Policy, dict[str, Any], LevelRun]], dict[str, Any], dict[str, Any]]:
    """The policies' runs, the proxy's energy accounts over them and what the report's header needs from the
    proxy (``facts``: its backends and last energy snapshot). ``stopped`` carries Ctrl-C from one event loop
    to the next (each stack runs in its own loop, and an asyncio.Event belongs to the loop it was first
    awaited in)."""
    stop = asyncio.Event()
    if stopped[0]:
        stop.set()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, _on_sigint, stop, display)
    out = []
    run_id = uuid.uuid4().hex[:8]
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), **key_session_args(args.api_key, args.admin_key)
        ) as session:
            first = await energy_snapshot(session, url)
            if first is None and (refused := await admin_refused(session, url)):
                print(f"loadgen: warning: {refused}", file=sys.stderr)
            for policy in policies:
                if stop.is_set():
                    break
                doc, run = await _run_policy(session, url, policy, args, problems, display, stop, run_id)
                out.append((policy, doc, run))
            last, backends = await asyncio.gather(energy_snapshot(session, url), fetch_backends(session, url))
            return out, energy_summary(first, last), {"energy": last, "backends": backends}
    finally:
        stopped[0] = stopped[0] or stop.is_set()


def _oracle(args: argparse.Namespace, problems: list[Any], work: Path) -> list[str]:
    if args.dataset == "synthetic":
        return []
    if args.data_file:
        return [str(Path(args.data_file).resolve())]
    return [str(write_source(problems, work / f"{args.dataset}.data"))]


def _rejection(e: BaseException) -> str:
    """The proxy's own one-line complaint from a failed start, else the first line of the error."""
    text = str(e)
    for line in text.splitlines():
        if line.startswith("qtrap-proxy:"):
            return re.sub(r"^\S+\.ya?ml:\s*", "", line.removeprefix("qtrap-proxy:").strip())
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def _embedded(
    args: argparse.Namespace,
    precisions: tuple[str, ...],
    oracle: list[str],
    work: Path,
    options: dict[str, Any],
) -> Iterator[str]:
    cm = embedded_stack(
        args.model or "qwen3-8b",
        precisions,
        oracle,
        work,
        args.sim_think_tokens,
        gpu=args.sim_gpu,
        pool_options=options,
    )
    stack = cm.__enter__()
    try:
        yield stack.url
    finally:
        cm.__exit__(None, None, None)


def _execute(
    args: argparse.Namespace, names: list[str] | None, out: Path, compare: bool
) -> tuple[list[dict[str, Any]], list[LevelRun], dict[str, Any], list[str], bool, dict[str, Any]]:
    """Run the policies (``names``; None: every precision pinned, then with ``compare`` round_robin, and
    cost with the embedded default); (PolicyResult docs, runs, the proxy's energy accounts (the last
    stack's), precisions, interrupted, the report's header (loadgen/context.py))."""
    started = time.time()
    model = args.model or "qwen3-8b"
    if args.data_file and args.dataset == "synthetic":
        raise Fail("--data-file needs --dataset gsm8k or mathqa")
    problems = _problems(args, 1000)
    precisions = external_precisions(args, model) if args.proxy else list(args.precisions or PRECISIONS)
    if names is None:
        names = precisions + (["round_robin", *([] if args.proxy else ["cost"])] if compare else [])
    policies = policies_for(names, model, precisions)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Fail(f"cannot create --out {out}: {e.strerror or e}") from e
    stopped = [False]  # Ctrl-C seen (in whichever stack's event loop)
    results: dict[str, dict[str, Any]] = {}
    runs: list[LevelRun] = []
    energy: dict[str, Any] = {"devices": [], "null_reason": "not recorded"}
    facts: dict[str, Any] = {}
    url = args.proxy.rstrip("/") if args.proxy else "embedded default (not started)"
    # the embedded default: one stack for the policies of the default config, another for routing: cost
    groups: list[tuple[dict[str, Any] | None, list[Policy]]]
    if args.proxy:
        groups = [(None, policies)]
    else:
        cost_opts: dict[str, Any] = {"routing": "cost"}
        if getattr(args, "cost_config", None):
            cost_opts["cost"] = args.cost_config
        groups = [
            ({}, [p for p in policies if p.kind != "cost"]),
            (cost_opts, [p for p in policies if p.kind == "cost"]),
        ]
    with Display(args.quiet) as display:
        display.say(
            f"loadgen: schedule {args.schedule.spec} ({args.schedule_unit}), policies "
            f"{', '.join(p.name for p in policies)}, proxy {args.proxy or 'embedded default'}"
        )
        for options, group in groups:
            if not group or stopped[0]:
                continue
            with contextlib.ExitStack() as es:
                if args.proxy:
                    url = args.proxy.rstrip("/")
                else:
                    work = out / "embedded" / ("cost" if options else "default")
                    work.mkdir(parents=True, exist_ok=True)
                    try:
                        url = es.enter_context(
                            _embedded(
                                args, tuple(precisions), _oracle(args, problems, work), work, options or {}
                            )
                        )
                    except (ValueError, RuntimeError, OSError) as e:
                        if options:  # the proxy refused routing: cost
                            reason = f"the proxy did not start with routing: cost: {_rejection(e)}"
                            display.say(f"cost: not run ({reason})")
                            for p in group:
                                results[p.name] = {"ran": False, "not_run_reason": reason}
                            continue
                        raise Fail(f"cannot start the embedded default: {_rejection(e)}") from e
                with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                    done, energy, facts = runner.run(
                        _run_policies(args, url, group, problems, display, stopped)
                    )
                for policy, doc, run in done:
                    results[policy.name] = {"ran": True, "not_run_reason": None, "run": doc}
                    runs.append(run)
    docs = []
    for p in policies:
        r = results.get(p.name, {"ran": False, "not_run_reason": "interrupted before it ran"})
        docs.append({"policy": p.name, "kind": p.kind, "model": p.model, "run": None, **r})
    context = run_context(args, url, precisions, facts, started, sys.argv[1:])
    return docs, runs, energy, precisions, stopped[0], context


def compare_routing(args: argparse.Namespace) -> int:
    """``python -m loadgen compare-routing``."""
    out = Path(args.out)
    started, t0 = time.time(), time.monotonic()
    try:
        docs, runs, _energy, precisions, partial, context = _execute(args, args.policies, out, compare=True)
    except Fail as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    doc = CompareRouting.model_validate(
        _clean(
            {
                "schema_version": SCHEMA_VERSION,
                "generator": GENERATOR,
                "partial": partial,
                "started_unix_s": started,
                "duration_s": time.monotonic() - t0,
                "config": _config(args, precisions),
                "policies": docs,
                "context": context,
            }
        )
    )
    (out / "compare-routing.json").write_text(json.dumps(_clean(doc.model_dump()), indent=2) + "\n")
    write_markdown(doc, out / "compare-routing.md")
    write_csv(runs, out / "requests.csv", scored=not args.no_score)
    console = _console()
    _print_table(console, f"Routing policies under {args.schedule.spec}", POLICY_HEAD, policy_rows(doc))
    for line in comparison(doc):
        console.print(line)
    for p in doc.policies:
        if not p.ran:
            console.print(f"{p.policy}: not run: {p.not_run_reason}", highlight=False, markup=False)
    print(f"compare-routing: {out / 'compare-routing.json'}, {out / 'compare-routing.md'}", flush=True)
    if partial:
        return 130
    return 0 if any(p.ran for p in doc.policies) else 1


def run_scheduled(args: argparse.Namespace) -> int:
    """``python -m loadgen --schedule ...``: the schedule once per precision, pinned; report.json."""
    out = Path(args.out)
    started, t0 = time.time(), time.monotonic()
    try:
        docs, runs, energy, precisions, partial, context = _execute(args, None, out, compare=False)
    except Fail as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    report = build_scheduled(
        _config(args, precisions),
        [d["run"] for d in docs if d["run"] is not None],
        partial=partial,
        started_unix_s=started,
        duration_s=time.monotonic() - t0,
        energy=energy,
        context=context,
    )
    return write_outputs(report, runs, out, render_schedules, scored=not args.no_score, partial=partial)
