"""loadgen's API keys: kept out of what it writes, sent to the routes that take them."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from loadgen.client import key_middlewares
from loadgen.context import redact_keys


def test_key_values_are_redacted_in_both_spellings() -> None:
    argv = ["--proxy", "http://p", "--api-key", "qk-secret", "--admin-key=qa-secret", "--model", "m"]
    assert redact_keys(argv) == ["--proxy", "http://p", "--api-key", "REDACTED", "--admin-key=REDACTED",
                                 "--model", "m"]  # fmt: skip
    assert redact_keys(["--api-key"]) == ["--api-key"]  # a dangling option stays as it was


def test_the_admin_key_goes_to_the_admin_routes_and_the_client_key_elsewhere() -> None:
    seen: dict[str, str | None] = {}

    async def handler(request: web.Request) -> web.Response:
        seen[request.path] = request.headers.get("Authorization")
        return web.Response(text="ok")

    async def main() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        base = f"http://127.0.0.1:{port}"
        try:
            for keys, tag in (
                ((("qk-c", "qa-a")), "both"),
                (("qk-c", None), "client"),
                ((None, None), "none"),
            ):
                async with aiohttp.ClientSession(middlewares=key_middlewares(*keys)) as s:
                    for path in ("/v1/chat/completions", "/qtrap/v1/energy"):
                        async with s.post(f"{base}{path}?{tag}") as r:
                            await r.read()
                    async with s.get(
                        f"{base}/qtrap/v1/requests/x", headers={"Authorization": "Bearer own"}
                    ) as r:
                        await r.read()
                    seen[f"{tag}:chat"] = seen.pop("/v1/chat/completions")
                    seen[f"{tag}:admin"] = seen.pop("/qtrap/v1/energy")
                    seen[f"{tag}:own"] = seen.pop("/qtrap/v1/requests/x")
        finally:
            await runner.cleanup()

    asyncio.run(main())
    assert seen == {
        "both:chat": "Bearer qk-c", "both:admin": "Bearer qa-a", "both:own": "Bearer own",
        "client:chat": "Bearer qk-c", "client:admin": "Bearer qk-c", "client:own": "Bearer own",
        "none:chat": None, "none:admin": None, "none:own": "Bearer own",
    }  # fmt: skip
