"""The loadtest's resets between runs (extproc_router/loadtest/client.py): reset URLs."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from extproc_router.loadtest.client import reset_pods, reset_target


async def test_reset_urls_with_a_path_are_posted_as_given() -> None:
    hits: list[tuple[str, str]] = []

    async def record(request: web.Request) -> web.Response:
        hits.append((request.method, request.path_qs))
        return web.Response(status=404 if request.path == "/missing" else 200)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as s:
            errors = await reset_pods(s, [base, base + "/", base + "/flush_cache", base + "/a/b?x=1",
                                          base + "/missing"])
        assert sorted(hits) == sorted([("POST", "/sim/reset"), ("POST", "/sim/reset"), ("POST", "/flush_cache"),
                                       ("POST", "/a/b?x=1"), ("POST", "/missing")])
        assert errors == [f"{base}/missing: HTTP 404"]
    finally:
        await runner.cleanup()
    assert reset_target("http://h:1") == "http://h:1/sim/reset"
    assert reset_target("http://h:1/flush_cache") == "http://h:1/flush_cache"
