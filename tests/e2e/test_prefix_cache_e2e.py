"""`prefix-cache` through the real stack: routing by prefix with the match echoed, and emptying the
router's prefix index with the loadtest's reset."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from extproc_router.loadtest.client import reset_pods
from extproc_router.stack import LocalStack
from routing.strategies.prefix_cache import MATCH_HEADER
from tests.conftest import start_stack
from tests.unit.routing.prefix_cache_helpers import SYSTEM


async def test_real_stack_routes_by_prefix_and_echoes_the_match(stack: LocalStack) -> None:
    body = {"model": "demo-model", "max_tokens": 4,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "first"}]}
    async with aiohttp.ClientSession() as s:
        seen = []
        for question in ("first", "second", "third"):
            body["messages"][1]["content"] = question
            async with s.post(stack.url + "/v1/chat/completions", json=body,
                              headers={"routing-strategy": "prefix-cache"}) as resp:
                assert resp.status == 200, await resp.text()
                seen.append((resp.headers["target-pod"], resp.headers[MATCH_HEADER]))
    assert len({pod for pod, _ in seen}) == 1, seen
    assert seen[0][1].startswith("0.00;") and all(float(h.split(";")[0]) > 0.9 for _, h in seen[1:])


async def test_flush_cache_through_the_stack_with_the_loadtest_reset(tmp_path: Path) -> None:
    """bench/quality.py's reset: the harness POSTs the router's /flush_cache URL as a --reset-url."""
    stack: LocalStack = await asyncio.to_thread(start_stack, tmp_path, ttft_ms=1.0, itl_ms=1.0, health_interval=0.2)
    try:
        async with aiohttp.ClientSession() as s:
            async def index_entries() -> float:
                async with s.get(stack.router_http + "/metrics") as resp:
                    text = await resp.text()
                return next(x.value for f in text_string_to_metric_families(text) for x in f.samples
                            if x.name == "extproc_prefix_cache_index_entries")

            body = {"model": "demo-model", "messages": [{"role": "user", "content": "shared context " * 60}]}
            async with s.post(stack.url + "/v1/chat/completions", json=body,
                              headers={"routing-strategy": "prefix-cache"}) as resp:
                assert resp.status == 200, await resp.text()
                await resp.read()
            assert await index_entries() > 0
            assert await reset_pods(s, [stack.router_http + "/flush_cache"]) == []
            assert await index_entries() == 0
    finally:
        await asyncio.to_thread(stack.stop)
