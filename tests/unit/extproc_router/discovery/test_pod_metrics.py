"""Engine metrics of pods (extproc_router/discovery/pod_metrics.py): KV capacity and usage parsed from
vLLM / SGLang / the simulator's /metrics, and the scraper."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from extproc_router.discovery.pod_metrics import PodMetrics, PodMetricsScraper, parse_metrics
from extproc_router.simulator.server import SimServer
from routing.pods import Pod
from tests.conftest import running_sims

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


def test_kv_usage_aliases_are_not_added_up() -> None:
    # vLLM (and the sim) export the old and the new name of the same usage figure side by side.
    text = (b'vllm:gpu_cache_usage_perc{model_name="a"} 0.25\n'
            b'vllm:kv_cache_usage_perc{model_name="a"} 0.25\n'
            b'vllm:num_requests_running{model_name="a"} 2\n'
            b'vllm:num_requests_running{model_name="b"} 3\n')
    m = parse_metrics(text)
    assert (m.kv_usage, m.running) == (0.25, 5.0)


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
