"""What qtrap-proxy assumes about a vLLM server, checked on a running one (and through a running proxy).

The proxy relies on: ``GET /health`` answering 200 while the engine is up; ``GET /metrics`` carrying the
token counters it reads with ``token_counters: true`` (``vllm:generation_tokens_total``,
``vllm:prompt_tokens_total``) and ``vllm:num_requests_running``; streams asked for ``stream_options:
{include_usage: true, continuous_usage_stats: true}`` carrying cumulative usage on every chunk, then a chunk
with ``choices: []`` and the final usage, then ``data: [DONE]``; the ``X-Request-Id`` it sends upstream
becoming the engine's request id; and a client that goes away mid-stream ending the engine's work (the
running count falls back). Each check records what it saw (raw lines included) so that a mismatch is a
finding with evidence, never an exception that loses the run.

    python3 vllm_protocol.py --url http://127.0.0.1:8000 --model qwen3-0.6b [--proxy URL --pool-model M]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import aiohttp

WORDS = " ".join(f"w{i * 37 % 5000 + 4}" for i in range(48))
METRICS = (
    "vllm:generation_tokens_total",
    "vllm:prompt_tokens_total",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:request_queue_time_seconds",
    "vllm:request_prefill_time_seconds",
    "vllm:request_decode_time_seconds",
    "vllm:time_to_first_token_seconds",
    "vllm:iteration_tokens_total",
    "vllm:kv_cache_usage_perc",
)


def _sample(text: str, name: str) -> float | None:
    """Sum of a metric's samples (all label sets) in a Prometheus text page, or None when absent."""
    total, seen = 0.0, False
    for m in re.finditer(rf"^{re.escape(name)}(?:\{{[^}}]*\}})?\s+(\S+)", text, re.M):
        total += float(m.group(1))
        seen = True
    return total if seen else None


async def _metrics(s: aiohttp.ClientSession, url: str) -> str:
    async with s.get(url + "/metrics") as r:
        return await r.text()


async def _stream(
    s: aiohttp.ClientSession,
    url: str,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """POST a streaming request; the raw ``data:`` lines (all, or the first ``stop_after`` before the
    connection is dropped) and the response headers."""
    lines: list[str] = []
    t0 = time.monotonic()
    async with s.post(url + path, json=body, headers=headers or {}) as r:
        hdrs = {k.lower(): v for k, v in r.headers.items()}
        status = r.status
        async for raw in r.content:
            line = raw.decode(errors="replace").strip()
            if line:
                lines.append(line)
            if stop_after is not None and len(lines) >= stop_after:
                r.close()  # the client goes away mid-stream
                break
    return {"status": status, "headers": hdrs, "lines": lines, "seconds": time.monotonic() - t0}


def _usage_shape(lines: list[str]) -> dict[str, Any]:
    chunks = []
    done = False
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            continue
        try:
            chunks.append(json.loads(data))
        except json.JSONDecodeError:
            chunks.append({"unparsed": data[:200]})
    with_choices = [c for c in chunks if c.get("choices")]
    last = chunks[-1] if chunks else {}
    return {
        "chunks": len(chunks),
        "content_chunks_with_usage": sum(1 for c in with_choices if c.get("usage")),
        "content_chunks": len(with_choices),
        "cumulative_completion_tokens": [
            (c.get("usage") or {}).get("completion_tokens") for c in with_choices
        ][:12],
        "last_chunk_choices_empty": last.get("choices") == [],
        "last_chunk_usage": last.get("usage"),
        "done_line": done,
        "ids": sorted({str(c.get("id")) for c in chunks})[:3],
    }


async def _running_falls(
    s: aiohttp.ClientSession, upstream: str, start: float, timeout_s: float = 10.0
) -> dict[str, Any]:
    """Poll the server's running count until it is back to 0: how long after ``start`` it took."""
    seen = []
    t_end = time.monotonic() + timeout_s
    while time.monotonic() < t_end:
        running = _sample(await _metrics(s, upstream), "vllm:num_requests_running")
        seen.append(running)
        if running == 0:
            return {"fell_to_0_after_s": round(time.monotonic() - start, 3), "polls": len(seen)}
        await asyncio.sleep(0.05)
    return {"fell_to_0_after_s": None, "last_running": seen[-1] if seen else None, "polls": len(seen)}


async def _check_server(url: str, model: str) -> dict[str, Any]:
    out: dict[str, Any] = {"url": url}
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        async with s.get(url + "/health") as r:
            out["health"] = {"status": r.status, "body": (await r.text())[:200]}
        text = await _metrics(s, url)
        out["metrics_present"] = {name: (re.search(rf"^{re.escape(name)}", text, re.M) is not None)
                                  for name in METRICS}  # fmt: skip
        out["metrics_labels"] = sorted(
            {m.group(1) for m in re.finditer(r"^vllm:num_requests_running\{([^}]*)\}", text, re.M)}
        )
        out["metric_families"] = sorted(set(re.findall(r"^# TYPE (vllm:\S+)", text, re.M)))
        before = _sample(text, "vllm:generation_tokens_total")
        body = {"model": model, "messages": [{"role": "user", "content": WORDS}], "max_tokens": 12,
                "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True}}  # fmt: skip
        chat = await _stream(s, url, "/v1/chat/completions", body, {"X-Request-Id": "qtrap-probe-chat-1"})
        out["chat_stream"] = {"status": chat["status"], "x-request-id": chat["headers"].get("x-request-id"),
                              **_usage_shape(chat["lines"]), "raw_head": chat["lines"][:3],
                              "raw_tail": chat["lines"][-3:]}  # fmt: skip
        after = _sample(await _metrics(s, url), "vllm:generation_tokens_total")
        out["generation_counter_delta"] = None if before is None or after is None else after - before
        comp = {"model": model, "prompt": WORDS, "max_tokens": 12, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True}}  # fmt: skip
        c = await _stream(s, url, "/v1/completions", comp, {"X-Request-Id": "qtrap-probe-comp-1"})
        out["completion_stream"] = {"status": c["status"], **_usage_shape(c["lines"]),
                                    "raw_tail": c["lines"][-3:]}  # fmt: skip
        async with s.post(url + "/v1/chat/completions", json={**body, "stream": False,
                                                                "stream_options": None}) as r:  # fmt: skip
            doc = await r.json(content_type=None)
            out["non_stream"] = {"status": r.status, "usage": doc.get("usage"), "id": doc.get("id"),
                                 "x-request-id": r.headers.get("x-request-id")}  # fmt: skip
        # a client that goes away mid-stream
        long = {**body, "max_tokens": 3000}
        t0 = time.monotonic()
        cut = await _stream(s, url, "/v1/chat/completions", long, {"X-Request-Id": "qtrap-probe-cut-1"},
                            stop_after=6)  # fmt: skip
        running_at_cut = _sample(await _metrics(s, url), "vllm:num_requests_running")
        out["disconnect"] = {"lines_read": len(cut["lines"]), "running_right_after": running_at_cut,
                             **await _running_falls(s, url, t0)}  # fmt: skip
    return out


async def _check_proxy(proxy: str, model: str, upstream: str) -> dict[str, Any]:
    out: dict[str, Any] = {"proxy": proxy, "model": model}
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        async with s.get(proxy + "/health") as r:
            out["health"] = {"status": r.status, "body": json.loads(await r.text())}
        async with s.get(proxy + "/v1/models") as r:
            out["models"] = [m.get("id") for m in (await r.json(content_type=None)).get("data", [])]
        body = {"model": model, "messages": [{"role": "user", "content": WORDS}], "max_tokens": 12,
                "stream": True, "ignore_eos": True}  # fmt: skip
        res = await _stream(s, proxy, "/v1/chat/completions", body)
        rid = res["headers"].get("x-qtrap-request-id")
        out["stream"] = {"status": res["status"], "x-qtrap-request-id": rid,
                         "x-qtrap-backend": res["headers"].get("x-qtrap-backend"),
                         **_usage_shape(res["lines"])}  # fmt: skip
        if rid:
            rec: dict[str, Any] = {}
            for _ in range(100):  # until final
                async with s.get(f"{proxy}/qtrap/v1/requests/{rid}") as r:
                    rec = await r.json(content_type=None)
                if rec.get("final"):
                    break
                await asyncio.sleep(0.2)
            out["record"] = {k: rec.get(k) for k in ("status", "prompt_tokens", "completion_tokens", "energy_j",
                                                     "final", "energy_null_reason", "j_per_token")}  # fmt: skip
        # a client that goes away mid-stream, through the proxy: the proxy must cancel upstream
        long = {**body, "max_tokens": 3000}
        t0 = time.monotonic()
        cut = await _stream(s, proxy, "/v1/chat/completions", long, stop_after=6)
        out["disconnect"] = {"lines_read": len(cut["lines"]), **await _running_falls(s, upstream, t0)}
        crid = cut["headers"].get("x-qtrap-request-id")
        if crid:
            await asyncio.sleep(0.5)
            async with s.get(f"{proxy}/qtrap/v1/requests/{crid}") as r:
                rec = await r.json(content_type=None)
            out["disconnect"]["record"] = {k: rec.get(k) for k in ("status", "completion_tokens", "energy_j",
                                                                   "final")}  # fmt: skip
    return out


def _save(out_dir: Path | None, name: str, doc: dict[str, Any]) -> None:
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / name).write_text(json.dumps(doc, indent=1, default=str) + "\n")


def check_server(url: str, model: str, out_dir: Path | None = None) -> dict[str, Any]:
    doc = asyncio.run(_check_server(url, model))
    _save(out_dir, "server.json", doc)
    return doc


def check_proxy(proxy: str, model: str, upstream: str, out_dir: Path | None = None) -> dict[str, Any]:
    doc = asyncio.run(_check_proxy(proxy, model, upstream))
    _save(out_dir, "proxy.json", doc)
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="the vLLM (or qtrap-sim) server")
    ap.add_argument("--model", required=True)
    ap.add_argument("--proxy", help="a qtrap proxy in front of it")
    ap.add_argument("--pool-model", help="model to ask the proxy for (default: --model)")
    ap.add_argument("--out", help="folder for server.json / proxy.json")
    a = ap.parse_args()
    out = Path(a.out) if a.out else None
    print(json.dumps(check_server(a.url, a.model, out), indent=1, default=str))
    if a.proxy:
        print(json.dumps(check_proxy(a.proxy, a.pool_model or a.model, a.url, out), indent=1, default=str))


if __name__ == "__main__":
    main()
