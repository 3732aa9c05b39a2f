"""Pods' KV capacity for `prefix-cache` (the sim's vllm:cache_config_info, parsing, the capacity
scraper in serve) and emptying the router's prefix index (`POST /flush_cache`, loadtest resets)."""

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
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from extproc_router.config import build_config
from extproc_router.discovery.pod_metrics import PodMetrics, PodMetricsScraper, parse_metrics
from extproc_router.loadtest.client import reset_pods, reset_target
from extproc_router.serve import RouterProcess
from extproc_router.simulator.server import SimServer
from extproc_router.stack import LocalStack
from routing.pods import Pod
from routing.request import CHAT_PATH, parse_body
from routing.strategies.prefix_cache import PrefixCacheStrategy
from tests.conftest import running_sims, start_stack

MODEL = "sim-model"

# ---------------------------------------------------------------- parse_metrics


def test_vllm_cache_config_info_in_any_label_order() -> None:
    lines = [
        # vLLM v1 as served: engine first, an `_override` label that must not be taken for num_gpu_blocks
        'vllm:cache_config_info{engine="0",block_size="16",num_gpu_blocks_override="None",'
        'cache_dtype="auto",num_gpu_blocks="661",num_cpu_blocks="None"} 1.0',
        'vllm:cache_config_info{num_gpu_blocks="661",block_size="16"} 1.0',
        'vllm:cache_config_info{block_size="16", num_gpu_blocks="661"} 1',
    ]
    for line in lines:
        text = f"# TYPE vllm:cache_config_info gauge\n{line}\nvllm:num_requests_running{{model_name=\"m\"}} 2.0\n"
        m = parse_metrics(text.encode())
        assert m.kv_capacity_tokens == 661 * 16, line
        assert m.running == 2.0  # the info line is not mistaken for a counted metric


def test_vllm_cache_config_info_unusable_is_unknown() -> None:
    for labels in ('block_size="16"', 'num_gpu_blocks="661"', 'block_size="16",num_gpu_blocks="None"',
                   'block_size="",num_gpu_blocks="661"', 'block_size="16",num_gpu_blocks="0"',
                   'block_size="16",num_gpu_blocks_override="661"', 'cache_block_size="16",num_gpu_blocks="661"'):
        m = parse_metrics(f"vllm:cache_config_info{{{labels}}} 1.0\n".encode())
        assert m.kv_capacity_tokens == 0.0, labels
    # One unusable engine of two: the sum would be too small, so the capacity is unknown.
    text = ('vllm:cache_config_info{engine="0",block_size="16",num_gpu_blocks="100"} 1.0\n'
            'vllm:cache_config_info{engine="1",block_size="16",num_gpu_blocks="None"} 1.0\n')
    assert parse_metrics(text.encode()).kv_capacity_tokens == 0.0
    assert parse_metrics(b'vllm:num_requests_running{model_name="m"} 1.0\n').kv_capacity_tokens == 0.0


def test_data_parallel_engines_add_up() -> None:
    text = ('vllm:cache_config_info{engine="0",block_size="16",num_gpu_blocks="100"} 1.0\n'
            'vllm:cache_config_info{engine="1",block_size="16",num_gpu_blocks="50"} 1.0\n')
    assert parse_metrics(text.encode()).kv_capacity_tokens == 150 * 16


def test_sglang_max_total_num_tokens() -> None:
    text = (b'# TYPE sglang:max_total_num_tokens gauge\n'
            b'sglang:max_total_num_tokens{model_name="m",engine_type="unified",tp_rank="0",pp_rank="0"} 123456.0\n'
            b'sglang:token_usage{model_name="m"} 0.25\n')
    m = parse_metrics(text)
    assert (m.kv_capacity_tokens, m.kv_usage) == (123456.0, 0.25)
    assert parse_metrics(b"sglang:max_total_num_tokens 4096\n").kv_capacity_tokens == 4096.0


# ---------------------------------------------------------------- the simulator's /metrics


async def test_sim_exports_cache_config_info(http: aiohttp.ClientSession) -> None:
    async with running_sims({}) as start:
        fixed = await start(kv_capacity_tokens=1000)  # 62 whole blocks of 16: 992 tokens
        model = await start(kv_capacity_tokens=8192, block_size=32, timing="model", tokenizer="bytes")
        for sim, blocks, size, caching in ((fixed, 62, 16, "False"), (model, 256, 32, "True")):
            async with http.get(sim.url + "/metrics") as resp:
                raw = await resp.read()
            families = {f.name: f for f in text_string_to_metric_families(raw.decode())}
            info = families["vllm:cache_config_info"]
            assert info.type == "gauge"
            [s] = info.samples
            assert s.value == 1.0
            assert s.labels == {"block_size": str(size), "num_gpu_blocks": str(blocks), "cache_dtype": "auto",
                                "enable_prefix_caching": caching}  # no model_name: one cache for every model
            assert parse_metrics(raw).kv_capacity_tokens == blocks * size


# ---------------------------------------------------------------- the scraper


class Published:
    """Collects what a scraper publishes; `until` waits for a condition on it."""

    def __init__(self) -> None:
        self.rounds: list[dict[str, PodMetrics]] = []
        self._changed = asyncio.Event()

    def __call__(self, metrics: dict[str, PodMetrics]) -> None:
        self.rounds.append(metrics)
        self._changed.set()

    async def until(self, check: Callable[[], bool], timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not check():
                self._changed.clear()
                await self._changed.wait()


def sim_pod(sim: SimServer, name: str) -> Pod:
    return Pod(name=name, address=f"127.0.0.1:{sim.port}", model=MODEL)


async def test_new_pods_are_scraped_at_once_despite_a_slow_interval() -> None:
    published = Published()
    scraper = PodMetricsScraper(published, interval=60.0)
    async with running_sims({}) as start:
        a, b = await start(kv_capacity_tokens=4096), await start(kv_capacity_tokens=2048)
        pa, pb = sim_pod(a, "a"), sim_pod(b, "b")
        scraper.set_pods([pa])
        await scraper.start()
        try:
            await published.until(lambda: bool(published.rounds), 5)
            assert published.rounds[-1][pa.key].kv_capacity_tokens == 4096
            t0 = time.monotonic()
            scraper.set_pods([pa, pb])
            await published.until(lambda: pb.key in published.rounds[-1], 5)
            assert time.monotonic() - t0 < 2  # not the 60 s interval
            assert published.rounds[-1][pb.key].kv_capacity_tokens == 2048
            # Fewer pods is no reason to scrape: nothing is published until the interval.
            n = len(published.rounds)
            scraper.set_pods([pb])
            await asyncio.sleep(0.3)
            assert len(published.rounds) == n
        finally:
            await scraper.stop()


# ---------------------------------------------------------------- serve


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
            strategy = prefix_strategy(proc)
            a, b = "default/pod-a", "default/pod-b"
            # Both are scraped as soon as they are ready.
            await wait_for(lambda: strategy.kv_capacity == {a: 4096.0, b: 992.0}, 5, "both capacities")
            # The 100 ms engine scrape covers combined pods too: their waiting queues reach the cost guard.
            await wait_for(lambda: strategy.engine_waiting.keys() == {a, b}, 5, "engine waiting of both pods")

            # A pod joining is read at once too.
            sims["pod-c"] = await start(kv_capacity_tokens=2048)
            write_pod_file(pod_file, sims)
            await wait_for(lambda: strategy.kv_capacity.get("default/pod-c") == 2048.0, 5, "pod-c's capacity")

            # pod-b stops answering: a failed scrape keeps what was known.
            await sims["pod-b"].stop()
            result = await proc.pod_metrics.scrape_once()
            assert b not in result
            assert strategy.kv_capacity[b] == 992.0

            # pod-b leaves the pod file: its capacity goes with it.
            del sims["pod-b"]
            write_pod_file(pod_file, sims)
            await wait_for(lambda: b not in strategy.kv_capacity, 5, "pod-b dropped")
            assert strategy.kv_capacity == {a: 4096.0, "default/pod-c": 2048.0}
            await proc.pod_metrics.scrape_once()  # and a later round does not bring it back
            assert b not in strategy.kv_capacity


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


# ---------------------------------------------------------------- loadtest resets


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


def test_kv_usage_aliases_are_not_added_up() -> None:
    # vLLM (and the sim) export the old and the new name of the same usage figure side by side.
    text = (b'vllm:gpu_cache_usage_perc{model_name="a"} 0.25\n'
            b'vllm:kv_cache_usage_perc{model_name="a"} 0.25\n'
            b'vllm:num_requests_running{model_name="a"} 2\n'
            b'vllm:num_requests_running{model_name="b"} 3\n')
    m = parse_metrics(text)
    assert (m.kv_usage, m.running) == (0.25, 5.0)
