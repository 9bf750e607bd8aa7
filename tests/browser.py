"""Headless Chromium driven over the DevTools protocol (a websocket), to check that a page renders."""

from __future__ import annotations

import asyncio
import base64
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
    warnings: dict[str, Any] | None = None  # the element id="warnings": where it is, its class and text
    headings: list[str] = field(default_factory=list)  # h1 and h2 texts in document order
    screenshot_png: bytes | None = None


_WARNINGS_JS = """(() => {
  const w = document.getElementById('warnings');
  if (!w) return null;
  const h2 = document.querySelector('h2');
  const r = w.getBoundingClientRect();
  return {top: r.top + window.scrollY, height: r.height, cls: w.className, text: w.innerText,
          before_first_h2: h2 ? !!(w.compareDocumentPosition(h2) & Node.DOCUMENT_POSITION_FOLLOWING) : true,
          first_h2_top: h2 ? h2.getBoundingClientRect().top + window.scrollY : null,
          index_in_body: Array.from(document.body.children).indexOf(w)};
})()"""


async def _check(
    ws_url: str, page_url: str, timeout_s: float, screenshot: bool, width: int, height: int | None
) -> PageCheck:
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
        await call(
            "Emulation.setDeviceMetricsOverride", width=width, height=900, deviceScaleFactor=1, mobile=False
        )
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
        res = await call("Runtime.evaluate", expression=_WARNINGS_JS, returnByValue=True)
        out.warnings = res["result"].get("value")
        res = await call(
            "Runtime.evaluate",
            expression="Array.from(document.querySelectorAll('h1, h2')).map(h => h.textContent)",
            returnByValue=True,
        )
        out.headings = res["result"]["value"]
        if screenshot:
            res = await call(
                "Runtime.evaluate", expression="document.documentElement.scrollHeight", returnByValue=True
            )
            full = int(res["result"]["value"])
            clip = {"x": 0, "y": 0, "width": width, "height": min(full, height or full), "scale": 1}
            shot = await call("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)
            out.screenshot_png = base64.b64decode(shot["data"])
        await asyncio.sleep(0.3)  # late console messages
        task.cancel()
    return out


def check_page(
    path: Path,
    timeout_s: float = 30.0,
    *,
    screenshot: Path | None = None,
    width: int = 1280,
    height: int | None = None,
) -> PageCheck:
    """Open ``path`` in headless Chromium (no network) ``width`` CSS pixels wide and report console errors,
    failed loads, images, the warnings block and the headings; ``screenshot``: a PNG of the page's top
    ``height`` pixels (all of it without ``height``)."""
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
            return await _check(await page_ws(), page_url, timeout_s, screenshot is not None, width, height)

        page = asyncio.run(main())
        if screenshot is not None and page.screenshot_png is not None:
            screenshot.write_bytes(page.screenshot_png)
        return page
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(html: Path, png: Path, *, height: int | None = None, max_kb: int = 400) -> PageCheck:
    """A PNG of ``html``'s top ``height`` pixels at 1,280 pixels wide, reduced to 256 colours when it is over
    ``max_kb`` (the screenshots in docs/img); the page's check."""
    page = check_page(html, screenshot=png, height=height)
    if png.stat().st_size > max_kb * 1024:
        from PIL import Image

        with Image.open(png) as im:
            im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(png, optimize=True)
    return page


if __name__ == "__main__":  # python -m tests.browser REPORT.html OUT.png [HEIGHT]
    import sys

    shot = screenshot(
        Path(sys.argv[1]), Path(sys.argv[2]), height=int(sys.argv[3]) if len(sys.argv) > 3 else None
    )
    problems = shot.console_errors + shot.exceptions + shot.failed_loads
    print(f"{sys.argv[2]}: {Path(sys.argv[2]).stat().st_size // 1024} KiB; problems: {problems or 'none'}")
    sys.exit(1 if problems else 0)
