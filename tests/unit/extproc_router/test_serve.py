"""The router process (extproc_router/serve.py), in process over simulated pods: the prefix-cache
strategy's KV capacities from the engine scrape, and `POST /flush_cache`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml

from extproc_router.config import build_config
from extproc_router.serve import RouterProcess
from extproc_router.simulator.server import SimServer
from routing.request import CHAT_PATH, parse_body
from routing.strategies.prefix_cache import PrefixCacheStrategy
from tests.conftest import running_sims

MODEL = "sim-model"


def write_pod_file(path: Path, pods: dict[str, SimServer]) -> None:
    doc = {"models": {MODEL: {"pods": [{"name": n, "address": f"127.0.0.1:{s.port}"} for n, s in pods.items()]}}}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc))
    tmp.replace(path)  # atomic: the router never reads half a file


@asynccontextmanager
async def router_over(pod_file: Path, **env: str) -> AsyncIterator[RouterProcess]:
    """An in-process router (`serve`'s RouterProcess) reading `pod_file`, on free ports."""
    cfg = build_config(env=env, flags={"pods_file": str(pod_file), "grpc_listen": "127.0.0.1:0",
                                       "http_listen": "127.0.0.1:0", "reload_interval": 0.1,
                                       "health_interval": 0.1})
    proc = RouterProcess(cfg)
    await proc.start()
    try:
        yield proc
    finally:
        await proc.stop()


def prefix_strategy(proc: RouterProcess) -> PrefixCacheStrategy:
    strategy = proc.router.strategies[PrefixCacheStrategy.name]
    assert isinstance(strategy, PrefixCacheStrategy)
    return strategy


async def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def test_serve_keeps_prefix_cache_kv_capacity(tmp_path: Path) -> None:
    pod_file = tmp_path / "gateway.yaml"
    async with running_sims({}) as start:
        sims = {"pod-a": await start(kv_capacity_tokens=4096), "pod-b": await start(kv_capacity_tokens=1000)}
        write_pod_file(pod_file, sims)
        async with router_over(pod_file) as proc:
            a, b = "default/pod-a", "default/pod-b"
            # Both are scraped as soon as they are ready.
            await wait_for(lambda: proc.router.stats.kv_capacity == {a: 4096.0, b: 992.0}, 5, "both capacities")
            # The 100 ms engine scrape covers combined pods too: their waiting queues reach the cost guard.
            await wait_for(lambda: proc.router.stats.engine.keys() == {a, b}, 5, "engine waiting of both pods")

            # A pod joining is read at once too.
            sims["pod-c"] = await start(kv_capacity_tokens=2048)
            write_pod_file(pod_file, sims)
            await wait_for(lambda: proc.router.stats.kv_capacity.get("default/pod-c") == 2048.0, 5, "pod-c's capacity")

            # pod-b stops answering: a failed scrape keeps what was known.
            await sims["pod-b"].stop()
            result = await proc.pod_metrics.scrape_once()
            assert b not in result
            assert proc.router.stats.kv_capacity[b] == 992.0

            # pod-b leaves the pod file: its capacity goes with it.
            del sims["pod-b"]
            write_pod_file(pod_file, sims)
            await wait_for(lambda: b not in proc.router.stats.kv_capacity, 5, "pod-b dropped")
            assert proc.router.stats.kv_capacity == {a: 4096.0, "default/pod-c": 2048.0}
            await proc.pod_metrics.scrape_once()  # and a later round does not bring it back
            assert b not in proc.router.stats.kv_capacity


async def test_flush_cache_empties_the_prefix_index(tmp_path: Path, http: aiohttp.ClientSession,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    pod_file = tmp_path / "gateway.yaml"
    async with running_sims({}) as start:
        write_pod_file(pod_file, {"pod-a": await start(), "pod-b": await start()})
        async with router_over(pod_file) as proc:
            await wait_for(lambda: bool(proc.router.snapshot.models[MODEL].ready), 5, "a ready pod")
            strategy = prefix_strategy(proc)
            body = {"model": MODEL, "messages": [{"role": "user", "content": "a long shared system prompt " * 40}]}
            decision = proc.router.decide(parse_body(CHAT_PATH, orjson.dumps(body)), "prefix-cache")
            proc.router.release(decision)
            entries = len(strategy.index)
            assert entries > 0

            url = f"http://127.0.0.1:{proc.http_port}/flush_cache"
            with caplog.at_level(logging.INFO, logger="extproc_router"):
                async with http.post(url) as resp:
                    assert resp.status == 200
                    assert resp.content_type == "application/json"
                    assert await resp.json() == {"flushed_entries": entries}
            assert len(strategy.index) == 0
            assert any(f"dropped {entries} prefix-index entries" in r.getMessage() for r in caplog.records)
            async with http.post(url) as resp:
                assert await resp.json() == {"flushed_entries": 0}
            for method in ("GET", "PUT", "DELETE"):
                async with http.request(method, url) as resp:
                    assert resp.status == 405, method
