"""Engine facts on real vLLM: spans from vLLM's OpenTelemetry tracing joined to the proxy's requests.

Runs on the GPU machine (``JOB=facts bash bench/gpu/vllm_e2e.sh`` sets it up: vLLM 0.26.0 and the
OpenTelemetry SDK with both OTLP exporters, which vLLM imports before it will trace):

1. two vLLM servers of one random-weight shape side by side (``--precisions``, default BF16 and FP8), each
   started with ``--otlp-traces-endpoint`` pointing at the proxy's OTLP receiver,
   ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf`` (vLLM's default is gRPC) and
   ``OTEL_BSP_SCHEDULE_DELAY`` (the SDK's batch exporter sends every 5 s by default);
2. qtrap-proxy in front of them: NVML meter, ``token_counters: true``, ``engine_facts: otlp``,
   ``meter.compare_views: true`` (every interval also split by the proxy's own view);
3. ``bench/attribution_error.py --proxy``: the mixed workload (prompts of 8-2,000 words, 16-256 output
   tokens, 70% streamed, both precisions) at each concurrency level; every record read back final;
4. results in ``--out``: ``rows.json`` (each request's two figures, its engine timing, whose view placed
   it), ``energy.json`` (the proxy's accounts: conservation, the clock offsets, the span outcomes),
   ``metrics.txt``, ``summary.txt`` (the comparison as printed), ``logs/``.

There is no per-request truth on real hardware: the summary compares the two views with each other.

``--engine sim`` runs the same flow on a CPU with qtrap-sim in place of vLLM (its spans, its DCGM counter
standing in for NVML): a check of this script, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]
for p in (str(ROOT), str(HERE.parent)):
    if p not in sys.path:
        sys.path.insert(0, p)

import vllm_e2e  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3-8b")
    ap.add_argument("--precisions", default="bf16,fp8")
    ap.add_argument("--levels", default="1,4,16,64")
    ap.add_argument("--requests-per-level", type=int, default=48)
    ap.add_argument("--vllm-site", default="/tmp/vsite")
    ap.add_argument("--pkgs", default="/tmp/qtrap-vllm-pkgs", help="where the OpenTelemetry wheels went")
    ap.add_argument("--work", default="/tmp/qtrap-vllm")
    ap.add_argument("--out", required=True)
    ap.add_argument("--kv-tokens", type=int, default=120_000)
    ap.add_argument("--batch-delay-ms", type=int, default=200)
    ap.add_argument("--start-timeout-s", type=float, default=420.0)
    ap.add_argument("--engine", choices=["vllm", "sim"], default="vllm")
    ap.add_argument("--work-model", choices=["rows", "shared"], default="shared", help="meter.work_model")
    args = ap.parse_args()

    import yaml

    from qtrap_common.localproc import child, free_port

    job = vllm_e2e.Job(args, "facts")
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
        engine, ns, work, precisions, otlp_port, args.batch_delay_ms, args.pkgs
    )
    result["serve_cmds"] = cmds
    save()
    rc = 0
    try:
        with ExitStack() as stack:
            result["servers_up_s"] = vllm_e2e.start_servers(
                stack, cmds, ports, env, logs, args.start_timeout_s
            )
            print(f"servers up in {result['servers_up_s']} s", flush=True)
            save()
            proxy_port = free_port()
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
                        "token_counters": True,
                        "engine_facts": "otlp",
                        "timeouts": {"read_s": 300},
                    }
                    for p in precisions
                ],
                "pools": {args.shape: {"default_precision": precisions[0]}},
                "meter": (
                    {"kind": "dcgm", "urls": [f"http://127.0.0.1:{ports[precisions[0]]}/dcgm/metrics"]}
                    if sim
                    else {"kind": "nvml"}
                )
                | {"compare_views": True, "settle_s": 10.0, "work_model": args.work_model},
                "otlp_receiver": {"enabled": True, "port": otlp_port, "wait_s": 6.0},
                "ledger": {"path": str(work / f"facts-ledger-{proxy_port}.sqlite")},
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
            vllm_e2e.e2e.warm_up(
                {p: f"http://127.0.0.1:{ports[p]}" for p in precisions},
                args.shape,
                [4, 16],
                16,
                {"ignore_eos": True},
            )
            t0 = time.monotonic()
            cmd = [
                sys.executable, str(ROOT / "bench" / "attribution_error.py"), "--proxy", proxy,
                "--pool", args.shape, "--precisions", args.precisions, "--levels", args.levels,
                "--requests-per-level", str(args.requests_per_level), "--extra-body", '{"ignore_eos": true}',
                "--json", str(out / "rows.json"),
            ]  # fmt: skip
            result["workload_cmd"] = cmd
            save()
            done = subprocess.run(
                cmd, cwd=ROOT, env={**os.environ, **proxy_env}, capture_output=True, text=True
            )
            (out / "summary.txt").write_text(done.stdout + done.stderr)
            print(done.stdout[-6000:], done.stderr[-3000:], flush=True)
            result["workload_exit"] = done.returncode
            result["workload_s"] = round(time.monotonic() - t0, 1)
            energy = vllm_e2e.e2e._get_json(proxy + "/qtrap/v1/energy")
            (out / "energy.json").write_text(json.dumps(energy, indent=1))
            (out / "metrics.txt").write_text(
                "".join(
                    line + "\n"
                    for line in vllm_e2e.e2e._get_text(proxy + "/metrics").splitlines()
                    if line.startswith(("qtrap_otlp", "qtrap_gpu", "qtrap_meter"))
                )
            )
    except (Exception, SystemExit) as e:
        result["error"] = f"{type(e).__name__}: {e}"[:3000]
        print("vllm_facts failed:", result["error"], file=sys.stderr, flush=True)
        rc = 1
    for log in logs.glob("serve-*.log"):  # keep the logs small: the start and the end
        text = log.read_text(errors="replace")
        if len(text) > 200_000:
            log.write_text(text[:100_000] + "\n...\n" + text[-100_000:])
    result["finished_unix_s"] = time.time()
    save()
    return rc


if __name__ == "__main__":
    sys.exit(main())
