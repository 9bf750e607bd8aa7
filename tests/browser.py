"""Headless Chromium driven over the DevTools protocol (a websocket), to check that a page renders."""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp


def chromium() -> str | None:
    return next(
        (p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None
    )


@dataclass
class PageCheck:
    console_errors: list[str] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    failed_loads: list[str] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)
    title: str = ""


async def _check(ws_url: str, page_url: str, timeout_s: float) -> PageCheck:
    out = PageCheck()
    ids = itertools.count(1)
    async with aiohttp.ClientSession() as s, s.ws_connect(ws_url, max_msg_size=0) as ws:
        pending: dict[int, asyncio.Future[Any]] = {}
        loaded = asyncio.Event()

        async def reader() -> None:
            async for msg in ws:
                doc = json.loads(msg.data)
                if "id" in doc and doc["id"] in pending:
                    pending.pop(doc["id"]).set_result(doc.get("result", doc.get("error")))
                method = doc.get("method")
                params = doc.get("params", {})
                if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                    out.console_errors.append(
                        " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
                    )
                elif method == "Runtime.exceptionThrown":
                    out.exceptions.append(str(params["exceptionDetails"].get("text")))
                elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                    out.console_errors.append(str(params["entry"].get("text")))
                elif method == "Network.loadingFailed":
                    out.failed_loads.append(str(params.get("errorText")))
                elif method == "Page.loadEventFired":
                    loaded.set()

        async def call(method: str, **params: Any) -> Any:
            i = next(ids)
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            pending[i] = fut
            await ws.send_str(json.dumps({"id": i, "method": method, "params": params}))
            return await asyncio.wait_for(fut, timeout_s)

        task = asyncio.create_task(reader())
        for domain in ("Runtime", "Log", "Network", "Page"):
            await call(f"{domain}.enable")
        await call("Page.navigate", url=page_url)
        await asyncio.wait_for(loaded.wait(), timeout_s)
        expr = (
            "JSON.stringify({title: document.title, images: Array.from(document.images).map(i => ({"
            "alt: i.alt, complete: i.complete, naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight,"
            "width: i.getBoundingClientRect().width, height: i.getBoundingClientRect().height,"
            "visible: getComputedStyle(i).visibility !== 'hidden' && getComputedStyle(i).display !== 'none'}))})"
        )
        res = await call("Runtime.evaluate", expression=expr, returnByValue=True)
        doc = json.loads(res["result"]["value"])
        out.title, out.images = doc["title"], doc["images"]
        await asyncio.sleep(0.3)  # late console messages
        task.cancel()
    return out


def check_page(path: Path, timeout_s: float = 30.0) -> PageCheck:
    """Open ``path`` in headless Chromium (no network) and report console errors and images."""
    exe = chromium()
    if exe is None:
        raise RuntimeError("chromium is not installed")
    profile = Path(tempfile.mkdtemp(prefix="qtrap-chromium-"))
    proc = subprocess.Popen(
        [
            exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
            "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={profile}",
            "--proxy-server=http://127.0.0.1:9", "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout_s
        while not port_file.exists() or len(port_file.read_text().splitlines()) < 2:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])

        async def page_ws() -> str:
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/json/list") as r:
                targets = await r.json()
            return str(next(t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page"))

        page_url = path.resolve().as_uri()

        async def main() -> PageCheck:
            return await _check(await page_ws(), page_url, timeout_s)

        return asyncio.run(main())
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
