"""Routing by cost on real vLLM: one load schedule under each pinned precision and under ``routing: cost``.

Runs on the GPU machine (``JOB=routing bash bench/gpu/vllm_e2e.sh`` sets it up: vLLM 0.26.0 unpacked, the
proxy's packages installed, the model folders written):

1. one vLLM server per precision of one random-weight shape (``--precisions``, default BF16, FP8 and
   W4A16 of the 8B shape), side by side on the one GPU (``--load-format dummy``);
2. qtrap-proxy in front of them: NVML meter, the pool with ``routing: cost`` (``--cost-config`` adds
   knobs), every server a replica of the pool;
3. ``python -m loadgen compare-routing --proxy ...``: the schedule (``--schedule``) once unpinned (the cost
   policy, first, so that its curves start empty; ``--cost-last``: after the others) and once per pinned
   precision, synthetic chains, ``ignore_eos`` so every answer runs to
   ``--max-tokens``, not scored (random weights answer nothing right: compare fleet energy per output
   token, not per correct answer);
4. results in ``--out``: ``loadgen/`` (compare-routing.json/.md), ``routing-tables.json`` (the proxy's
   ``GET /qtrap/v1/routing`` every few seconds during the cost policy's run and after it), ``energy.json``
   (conservation, the engine facts' outcomes and clock offsets), ``metrics.txt``, ``logs/``;
5. engine facts (unless ``--no-engine-facts``): every server exports vLLM's ``llm_request`` spans to the
   proxy's OTLP receiver (``engine_facts: otlp``) and the proxy also splits every interval by its own view
   (``meter.compare_views``): ``facts-summary.json`` and ``facts-rows.json`` compare the two attributions
   request by request over the whole run (no per-request truth on real hardware).

All replicas share one GPU, so "fleet energy" is that GPU's: its idle power is paid once whatever the
policy, and a replica's curve is its attributed share of the GPU's power above idle against its own load.

``--engine sim`` runs the same flow on a CPU with qtrap-sim in place of vLLM: a check of this script, not a
measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]
for p in (str(ROOT), str(HERE.parent)):
    if p not in sys.path:
        sys.path.insert(0, p)

import vllm_e2e  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3-8b")
    ap.add_argument("--precisions", default="bf16,fp8,w4a16")
    ap.add_argument("--schedule", default="steps:1@25s,32@8s,1@25s,32@8s")
    ap.add_argument("--window", type=float, default=8.0)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--cost-config", default="{}", help="JSON: more keys of pools.<shape>.cost")
    ap.add_argument(
        "--cost-last",
        action="store_true",
        help="run the cost policy after the pinned ones (its curves then start from what the pinned runs "
        "taught the proxy); by default it runs first, knowing nothing",
    )
    ap.add_argument("--vllm-site", default="/tmp/vsite")
    ap.add_argument("--work", default="/tmp/qtrap-vllm")
    ap.add_argument("--out", required=True)
    ap.add_argument("--kv-tokens", type=int, default=60_000)
    ap.add_argument("--start-timeout-s", type=float, default=420.0)
    ap.add_argument(
        "--deadline-s", type=float, default=540.0, help="stop loadgen (SIGINT) this long after start"
    )
    ap.add_argument("--engine", choices=["vllm", "sim"], default="vllm")
    ap.add_argument(
        "--no-engine-facts",
        dest="engine_facts",
        action="store_false",
        help="without vLLM's OTLP spans (by default they go to the proxy's receiver, engine_facts: otlp, and the "
        "proxy also splits every interval by its own view: meter.compare_views)",
    )
    ap.add_argument("--batch-delay-ms", type=int, default=200, help="the span exporter's batch delay")
    ap.add_argument("--pkgs", default="/tmp/qtrap-vllm-pkgs", help="where the OpenTelemetry wheels went")
    args = ap.parse_args()

    import yaml

    from qtrap_common.localproc import child, free_port

    started = time.monotonic()
    job = vllm_e2e.Job(args, "routing")
    out, logs, work, precisions, result, save = (
        job.out,
        job.logs,
        job.work,
        job.precisions,
        job.result,
        job.save,
    )
    sim, engine, ns = job.sim, job.engine, job.ns
    otlp_port = free_port()
    ports, cmds, env = vllm_e2e.span_servers(
        engine, ns, work, precisions, otlp_port if args.engine_facts else None, args.batch_delay_ms, args.pkgs
    )
    result["serve_cmds"] = cmds
    save()
    rc = 0
    tables: list[dict[str, Any]] = []
    try:
        with ExitStack() as stack:
            result["servers_up_s"] = vllm_e2e.start_servers(
                stack, cmds, ports, env, logs, args.start_timeout_s
            )
            print(f"servers up in {result['servers_up_s']} s", flush=True)
            save()
            proxy_port = free_port()
            cost = {"probe_s": 2.0, **json.loads(args.cost_config)}
            cfg = {
                "server": {"host": "127.0.0.1", "port": proxy_port},
                "backends": [
                    {
                        "name": f"vllm-{p}",
                        "kind": "vllm",
                        "url": f"http://127.0.0.1:{ports[p]}",
                        "model": args.shape,
                        "pool": args.shape,
                        "precision": p,
                        "devices": [{"host": "qtrap-sim" if sim else "localhost", "index": 0}],
                        "timeouts": {"read_s": 300},
                        "engine_facts": "otlp" if args.engine_facts else "none",
                    }
                    for p in precisions
                ],
                "pools": {args.shape: {"default_precision": precisions[0], "routing": "cost", "cost": cost}},
                "meter": (
                    {"kind": "dcgm", "urls": [f"http://127.0.0.1:{ports[precisions[0]]}/dcgm/metrics"]}
                    if sim
                    else {"kind": "nvml"}
                )
                | {"settle_s": 10.0, "compare_views": args.engine_facts},
                "otlp_receiver": {"enabled": args.engine_facts, "port": otlp_port, "wait_s": 6.0},
                "ledger": {"path": str(work / f"routing-ledger-{proxy_port}.sqlite")},
            }
            (out / "proxy.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
            proxy_env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
            stack.enter_context(
                child(
                    [sys.executable, "-m", "qtrap_proxy", "serve", "--config", str(out / "proxy.yaml"),
                     "--log-level", "warning"],
                    f"http://127.0.0.1:{proxy_port}/v1/models", logs / "proxy.log", timeout_s=60, env=proxy_env,
                    cwd=ROOT,
                )
            )  # fmt: skip
            proxy = f"http://127.0.0.1:{proxy_port}"
            extra = engine.extra_body()
            vllm_e2e.e2e.warm_up(
                {p: f"http://127.0.0.1:{ports[p]}" for p in precisions}, args.shape, [4, 16], 16, extra
            )
            done = threading.Event()

            def poll() -> None:  # the cost table while loadgen runs
                t_poll = time.monotonic()
                while not done.wait(4.0):
                    try:
                        tables.append(
                            {
                                "t_s": round(time.monotonic() - t_poll, 1),
                                "routing": vllm_e2e.e2e._get_json(proxy + "/qtrap/v1/routing"),
                            }
                        )
                    except Exception as e:  # the run goes on without this table
                        tables.append({"t_s": round(time.monotonic() - t_poll, 1), "error": str(e)[:200]})

            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            cmd = [
                sys.executable, "-m", "loadgen", "compare-routing", "--proxy", proxy, "--model", args.shape,
                "--precisions", ",".join(precisions), "--policies", ",".join([*precisions, "cost"] if args.cost_last else ["cost", *precisions]),
                "--schedule", args.schedule, "--window", str(args.window), "--hops", "requests",
                "--max-tokens", str(args.max_tokens), "--no-score", "random-weight models answer nothing",
                "--timeout", "300", "--final-timeout", "60", "--out", str(out / "loadgen"), "--quiet",
            ]  # fmt: skip
            if extra:
                cmd += ["--extra-body", json.dumps(extra)]
            result["loadgen_cmd"] = cmd
            save()
            t0 = time.monotonic()
            budget = args.deadline_s - (t0 - started)
            with (logs / "loadgen.log").open("wb") as f:
                lgp = subprocess.Popen(
                    cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **proxy_env}
                )
                try:
                    lgp.wait(timeout=max(5.0, budget))
                except subprocess.TimeoutExpired:
                    result["loadgen_interrupted"] = f"SIGINT after {budget:.0f} s (deadline)"
                    lgp.send_signal(signal.SIGINT)
                    try:
                        lgp.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        lgp.kill()
                        lgp.wait()
            done.set()
            poller.join(timeout=10)
            result["loadgen_exit"] = lgp.returncode
            result["loadgen_s"] = round(time.monotonic() - t0, 1)
            print((logs / "loadgen.log").read_text(errors="replace")[-6000:], flush=True)
            tables.append({"t_s": "end", "routing": vllm_e2e.e2e._get_json(proxy + "/qtrap/v1/routing")})
            (out / "energy.json").write_text(
                json.dumps(vllm_e2e.e2e._get_json(proxy + "/qtrap/v1/energy"), indent=1)
            )
            (out / "metrics.txt").write_text(
                "".join(
                    line + "\n"
                    for line in vllm_e2e.e2e._get_text(proxy + "/metrics").splitlines()
                    if line.startswith(("qtrap_route", "qtrap_gpu", "qtrap_meter", "qtrap_otlp"))
                )
            )
            if args.engine_facts:
                time.sleep(12.0)  # the last requests' intervals settle (settle_s 10)
                result["engine_facts"] = facts_summary(Path(cfg["ledger"]["path"]), out)
    except (Exception, SystemExit) as e:
        result["error"] = f"{type(e).__name__}: {e}"[:3000]
        print("vllm_routing failed:", result["error"], file=sys.stderr, flush=True)
        rc = 1
    (out / "routing-tables.json").write_text(json.dumps(tables))
    for log in logs.glob("serve-*.log"):  # keep the logs small: the start and the end
        text = log.read_text(errors="replace")
        if len(text) > 200_000:
            log.write_text(text[:100_000] + "\n...\n" + text[-100_000:])
    result["finished_unix_s"] = time.time()
    save()
    return rc


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, round(q * (len(v) - 1)))]


def facts_summary(ledger: Path, out: Path) -> dict[str, Any]:
    """Engine facts against the proxy's own view, request by request: how far apart the two attributions of
    each final record are (|proxy view - engine view| / engine view), by precision; what placed each
    request. There is no per-request truth on real hardware: this compares two estimates."""
    import sqlite3

    conn = sqlite3.connect(f"{ledger.resolve().as_uri()}?mode=ro", uri=True)
    rows = [json.loads(r[0]) for r in conn.execute("SELECT record FROM requests")]
    conn.close()
    placed: dict[str, int] = {}
    diffs: dict[str, list[float]] = {}
    per_request = []
    for rec in rows:
        placed[str(rec.get("facts"))] = placed.get(str(rec.get("facts")), 0) + 1
        e, pv = rec.get("energy_j"), rec.get("energy_proxy_view_j")
        if rec.get("status") != "ok" or not e or pv is None or rec.get("facts") != "engine":
            continue
        d = abs(pv - e) / e
        diffs.setdefault(str(rec.get("precision")), []).append(d)
        diffs.setdefault("all", []).append(d)
        per_request.append(
            {"id": rec["id"], "precision": rec.get("precision"), "energy_j": e, "proxy_view_j": pv,
             "duration_s": rec.get("e2e_s"), "stream": rec.get("stream")}
        )  # fmt: skip
    summary = {
        "records": len(rows),
        "placed_by": placed,
        "relative_difference": {
            k: {"n": len(v), "median": _pct(v, 0.5), "p90": _pct(v, 0.9), "max": max(v)}
            for k, v in sorted(diffs.items())
        },
    }
    (out / "facts-rows.json").write_text(json.dumps(per_request))
    (out / "facts-summary.json").write_text(json.dumps(summary, indent=1))
    print("engine facts vs the proxy's view:", json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    sys.exit(main())
