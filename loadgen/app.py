"""One loadgen run: check inputs, start (or reach) the proxy, sweep the levels, analyse, write the report."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from loadgen import datasets
from loadgen.analysis import analyse, observe
from loadgen.client import ChatClient, key_session_args
from loadgen.context import fetch_backends, redact_keys, run_context
from loadgen.embedded import PRECISIONS, embedded_stack
from loadgen.proxyapi import ProxyError, admin_refused, energy_snapshot, fetch_records, pool_precisions
from loadgen.report import build, energy_summary, print_summary, write_csv, write_html, write_json
from loadgen.runner import Chain, LevelPlan, LevelRun, run_level
from loadgen.schema import Config, Report
from loadgen.validity import Thresholds, checks, has_warnings, validate
from qtrap_common.precision import BASELINES

DEFAULT_MIN_CHAINS = 30  # measured chains per level by default: the validity checks' minimum (--min-chains)
DEFAULT_WAVES = 3  # ... and at least this many times the concurrency: a window of about two chain lengths


def default_num_chains(concurrency: int) -> int:
    """Measured chains of a level without --num-chains or --duration: max(30, 3 x concurrency), so that the
    embedded default raises no few_chains or short_window warning (its windows last seconds)."""
    return max(DEFAULT_MIN_CHAINS, DEFAULT_WAVES * concurrency)


EXIT_WARNINGS = 3  # --strict: the run finished with a warning of level warning


class Fail(Exception):
    """A one-line error before any load is sent (exit 2)."""


class Display:
    """A rich progress bar on a terminal; plain lines otherwise (or nothing with --quiet)."""

    def __init__(self, quiet: bool) -> None:
        self.console = Console(stderr=True)
        self.quiet = quiet
        self.live = self.console.is_terminal and not quiet
        self.progress: Progress | None = None
        self.task: Any = None

    def __enter__(self) -> Display:
        if self.live:
            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[extra]}"),
                TimeElapsedColumn(),
                console=self.console,
            )
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(None, None, None)

    def say(self, text: str) -> None:
        if self.quiet:
            return
        if self.progress is not None:
            self.progress.console.print(text, highlight=False, markup=False)
        else:
            print(text, file=sys.stderr, flush=True)  # a log: whole lines, never wrapped

    def level_start(self, desc: str, total: int | None) -> None:
        if self.progress is not None:
            self.task = self.progress.add_task(desc, total=total, extra="")
        else:
            self.say(f"{desc} ...")

    def schedule_progress(self, elapsed_s: float, extra: str) -> None:
        """A schedule's bar: seconds of the schedule done, and what it offers now."""
        if self.progress is not None:
            self.progress.update(self.task, completed=int(elapsed_s), extra=extra)

    def chain_done(self, chain: Chain, correct: int | None, done: int) -> None:
        if self.progress is not None:
            extra = f"correct {correct}/{done}" if correct is not None else f"{done} chains (not scored)"
            self.progress.update(self.task, advance=1, extra=extra)

    def level_end(self, desc: str, run: LevelRun, missing: int) -> None:
        n = sum(1 for c in run.chains if not c.warmup)
        errs = sum(1 for e in run.exchanges if e.status != "ok")
        extra = f", {missing} records not final" if missing else ""
        line = f"{desc}: {n} chains, {len(run.exchanges)} requests, {errs} errors{extra}"
        if self.progress is not None:
            self.progress.update(self.task, extra=f"done; {errs} errors{extra}")
            self.progress.remove_task(self.task)
        self.say(line)


def _problems(args: argparse.Namespace, needed: int) -> list[datasets.Problem]:
    try:
        probs = datasets.load(
            args.dataset, args.data_file, split=args.split, n=max(needed, 1), seed=args.seed
        )
    except datasets.DatasetError as e:
        raise Fail(str(e)) from e
    order = list(probs)
    random.Random(args.seed).shuffle(order)
    return order


@contextlib.contextmanager
def _target(
    args: argparse.Namespace, problems: list[datasets.Problem], out: Path
) -> Iterator[tuple[str, list[str]]]:
    """(proxy URL, precisions to sweep)."""
    if args.proxy:
        yield args.proxy.rstrip("/"), external_precisions(args, args.model or "qwen3-8b")
        return
    precisions = tuple(args.precisions or PRECISIONS)
    oracle: list[str] = []
    work = out / "embedded"
    work.mkdir(parents=True, exist_ok=True)
    if args.dataset != "synthetic":
        oracle = (
            [str(Path(args.data_file).resolve())]
            if args.data_file
            else [str(datasets.write_source(problems, work / f"{args.dataset}.data"))]
        )
    try:
        stack_cm = embedded_stack(
            args.model or "qwen3-8b", precisions, oracle, work, args.sim_think_tokens, gpu=args.sim_gpu
        )
        stack = stack_cm.__enter__()
    except (ValueError, RuntimeError, OSError) as e:
        raise Fail(
            f"cannot start the embedded default: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e
    try:
        yield stack.url, list(precisions)
    finally:
        stack_cm.__exit__(None, None, None)


async def _sweep(
    args: argparse.Namespace,
    url: str,
    precisions: list[str],
    problems: list[datasets.Problem],
    display: Display,
    stop: asyncio.Event,
    facts: dict[str, Any],
) -> tuple[list[LevelRun], dict[int, tuple[Any, Any]], dict[str, Any]]:
    """Every level; the runs, each run's energy snapshots at its window's ends, and the proxy's energy
    accounts when the sweep started and ended (``energy_summary``). ``facts`` gets the context's raw
    material: the last energy snapshot (``energy``) and the proxy's backends (``backends``)."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGINT, _on_sigint, stop, display)
    runs: list[LevelRun] = []
    snapshots: dict[int, tuple[Any, Any]] = {}
    run_id = uuid.uuid4().hex[:8]
    max_tokens = args.max_tokens or (1024 if args.hops == "stream" else 256)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    scored = not args.no_score
    async with aiohttp.ClientSession(
        connector=connector, **key_session_args(args.api_key, args.admin_key)
    ) as session:
        model = args.model or "qwen3-8b"
        first = await energy_snapshot(session, url)
        if first is None and (refused := await admin_refused(session, url)):
            print(f"loadgen: warning: {refused}", file=sys.stderr)

        async def accounts() -> dict[str, Any]:
            last, facts["backends"] = await asyncio.gather(
                energy_snapshot(session, url), fetch_backends(session, url)
            )
            facts["energy"] = last
            return energy_summary(first, last)

        for repeat in range(args.repeats):
            for c in args.concurrency:
                for p in precisions:
                    if stop.is_set():
                        return runs, snapshots, await accounts()
                    warmup = c if args.warmup is None else max(0, args.warmup)
                    num = None if args.duration else (args.num_chains or default_num_chains(c))
                    plan = LevelPlan(
                        p, c, repeat, warmup, num, args.duration, args.hops, report_scores=scored
                    )
                    client = ChatClient(
                        session,
                        url,
                        f"{model}@{p}",
                        max_tokens=max_tokens,
                        seed=args.seed,
                        timeout_s=args.timeout,
                        extra_body=args.extra_body,
                    )
                    desc = f"{p} c={c}" + (f" r{repeat + 1}/{args.repeats}" if args.repeats > 1 else "")
                    display.level_start(desc, (warmup + num) if num else None)
                    snap: list[Any] = [None, None]
                    tasks: list[asyncio.Task[Any]] = []
                    counts = [0, 0]

                    def on_window(
                        which: str, _t: float, snap: list[Any] = snap, tasks: list[Any] = tasks
                    ) -> None:
                        i = 0 if which == "open" else 1

                        async def take() -> None:
                            snap[i] = await energy_snapshot(session, url)

                        tasks.append(asyncio.create_task(take()))

                    def on_chain(chain: Chain, counts: list[int] = counts) -> None:
                        counts[1] += 1
                        counts[0] += bool(chain.score and chain.score.strict)
                        display.chain_done(chain, counts[0] if scored else None, counts[1])

                    prefix = f"lg-{run_id}-{p}-c{c}-r{repeat}"
                    run = await run_level(
                        client, plan, problems, prefix, stop=stop, on_chain=on_chain, on_window=on_window
                    )
                    if tasks:
                        await asyncio.gather(*tasks)
                    missing = await fetch_records(
                        session, url, run, timeout_s=2.0 if stop.is_set() else args.final_timeout
                    )
                    runs.append(run)
                    snapshots[id(run)] = (snap[0], snap[1])
                    display.level_end(desc, run, missing)
        return runs, snapshots, await accounts()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (it comes with uvicorn[standard]): about a quarter less CPU per streamed chunk,
    which keeps loadgen's scheduling delay in bounds at twice the chunk rate (docs/benchmarks.md)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _on_sigint(stop: asyncio.Event, display: Display) -> None:
    if stop.is_set():
        raise KeyboardInterrupt
    display.say("interrupted: stopping the run and writing a partial report (Ctrl-C again to quit at once)")
    stop.set()


def plots_or_none(report: Report, out: Path) -> list[Path]:
    """The PNG plots, or none (with a note on stderr) where matplotlib is not installed: a GPU machine
    often lacks it. ``python -m loadgen render`` draws them later from report.json."""
    try:
        from loadgen.plots import all_plots
    except ImportError as e:
        print(
            f"plots skipped: {e}; draw them with `python -m loadgen render {out / 'report.json'}`",
            file=sys.stderr,
        )
        return []
    return all_plots(report, out)


def render_outputs(report: Report, out: Path) -> list[Path]:
    """Plots, report.html and the terminal summary of a report (also ``python -m loadgen render``)."""
    if report.schedules and not report.levels:
        from loadgen.schedreport import render_schedules

        render_schedules(report, out)
        return []
    plots = plots_or_none(report, out)
    write_html(report, plots, out / "report.html")
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 200))  # a log or a pipe: do not squeeze the tables
    print_summary(report, console)
    return plots


def render(report_path: Path, out: Path | None) -> int:
    """``python -m loadgen render REPORT [--out DIR]``: plots, report.html and the summary, again."""
    from loadgen.report import ReportError, load

    try:
        report = load(report_path / "report.json" if report_path.is_dir() else report_path)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    target = out or (report_path if report_path.is_dir() else report_path.parent)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: cannot create --out {target}: {e.strerror or e}", file=sys.stderr)
        return 2
    render_outputs(report, target)
    print(f"rendered: {target / 'report.html'}", flush=True)
    return 0


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        if args.baseline and args.precisions and args.baseline not in args.precisions:
            raise Fail(f"--baseline {args.baseline} is not among --precisions {','.join(args.precisions)}")
        if args.data_file and args.dataset == "synthetic":
            raise Fail("--data-file needs --dataset gsm8k or mathqa")
        if args.dataset not in datasets.DATASETS:
            raise Fail(f"unknown dataset {args.dataset!r}: choose one of {', '.join(datasets.DATASETS)}")
        per_level = (
            default_num_chains(max(args.concurrency)) + max(args.concurrency)
            if not args.num_chains
            else args.num_chains + max(args.concurrency)
        )
        problems = _problems(args, max(per_level, 1000))
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise Fail(f"cannot create --out {out}: {e.strerror or e}") from e
        started = time.time()
        t0 = time.monotonic()
        with Display(args.quiet) as display, _target(args, problems, out) as (url, precisions):
            baseline = args.baseline or next((b for b in BASELINES if b in precisions), None)
            if args.baseline and args.baseline not in precisions:
                raise Fail(
                    f"--baseline {args.baseline} is not a precision of this run ({', '.join(precisions)})"
                )
            display.say(
                f"loadgen: {len(problems)} {args.dataset} problems, precisions {', '.join(precisions)}, "
                f"concurrency {','.join(map(str, args.concurrency))}, hops as {args.hops}, proxy {url}"
            )
            stop = asyncio.Event()
            facts: dict[str, Any] = {}
            with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                runs, snapshots, energy = runner.run(
                    _sweep(args, url, precisions, problems, display, stop, facts)
                )
            partial = stop.is_set()
    except Fail as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if not runs:
        print("error: no level ran", file=sys.stderr)
        return 130 if partial else 1
    groups: dict[tuple[str, int], list[LevelRun]] = {}
    for r in runs:
        groups.setdefault((r.precision, r.concurrency), []).append(r)
    obs = [observe(g, snapshots) for g in groups.values()]
    analysis = analyse(
        obs,
        baseline=baseline,
        bootstrap=args.bootstrap,
        seed=args.seed,
        index_weights=args.index_weights,
        accuracy_null_reason=args.no_score,
    )
    config = Config(
        proxy=args.proxy
        or f"embedded default (qtrap_sim, simulated {args.sim_gpu.upper()}"
        + (", calibrated to vLLM 0.26 serving)" if args.sim_gpu == "h200" else ", 2026-11 kernel probe)"),
        model=args.model or "qwen3-8b",
        precisions=precisions,
        baseline=baseline,
        concurrency=args.concurrency,
        dataset=args.dataset,
        data_file=args.data_file,
        hops=args.hops,
        num_chains=args.num_chains,
        duration_s=args.duration,
        warmup=args.warmup,
        repeats=args.repeats,
        seed=args.seed,
        max_tokens=args.max_tokens or (1024 if args.hops == "stream" else 256),
        extra_body=args.extra_body,
        bootstrap=args.bootstrap,
        index_weights=list(args.index_weights),
        scoring="strict (#### N / Answer: letter); flexible reported alongside"
        if not args.no_score
        else f"not scored: {args.no_score}",
        no_score=args.no_score,
        argv=redact_keys(sys.argv[1:]),
    )
    context = run_context(args, url, precisions, facts, started, sys.argv[1:])
    report = build(
        config,
        analysis,
        partial=partial,
        started_unix_s=started,
        duration_s=time.monotonic() - t0,
        energy=energy,
        context=context,
    )
    report.checks = checks(report, Thresholds(min_window_s=args.min_window_s, min_chains=args.min_chains))
    report.warnings = validate(report, report.checks)
    code = write_outputs(report, runs, out, render_outputs, scored=not args.no_score, partial=partial)
    if code == 0 and args.strict and has_warnings(report):
        return EXIT_WARNINGS
    return code


def external_precisions(args: argparse.Namespace, model: str) -> list[str]:
    """The precisions to sweep on a running proxy: --precisions, each checked against what it serves for
    ``model`` (one-line Fail otherwise), else all it serves."""

    async def check() -> list[str]:
        async with aiohttp.ClientSession(**key_session_args(args.api_key, args.admin_key)) as s:
            return await pool_precisions(s, args.proxy, model)

    try:
        served = asyncio.run(check())
    except ProxyError as e:
        raise Fail(str(e)) from e
    unknown = [p for p in (args.precisions or []) if p not in served]
    if unknown:
        raise Fail(
            f"the proxy does not serve {model} at {', '.join(unknown)}; it serves: {', '.join(served) or 'none'}"
        )
    return list(args.precisions or served)


def write_outputs(
    report: Report,
    runs: list[LevelRun],
    out: Path,
    render: Callable[[Report, Path], object],
    *,
    scored: bool,
    partial: bool,
) -> int:
    """report.json, requests.csv and what ``render`` draws; the exit code: 130 when interrupted, 1 when no
    request succeeded, else 0."""
    write_json(report, out / "report.json")
    write_csv(runs, out / "requests.csv", scored=scored)
    render(report, out)
    print(f"report: {out / 'report.json'}, {out / 'report.html'}, {out / 'requests.csv'}", flush=True)
    if partial:
        return 130
    ok = sum(1 for r in runs for e in r.exchanges if e.status == "ok")
    return 0 if ok else 1
