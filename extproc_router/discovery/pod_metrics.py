"""Engine metrics scraped from pods' `/metrics` (vLLM names; SGLang's equivalents accepted).

The decode side of `pd` ranks pods by what the engine reports (running sequences, KV-cache usage),
not only by what this router sent: other routers and direct clients load the same pods.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Callable

from extproc_router.discovery.poller import PodPoller
from routing.pods import Pod
from routing.stats import EngineStats

log = logging.getLogger("extproc_router.pod_metrics")

# metric name -> field; the first of each group that a pod exposes wins
_NAMES = {
    b"vllm:num_requests_running": "running",
    b"sglang:num_running_reqs": "running",
    b"vllm:num_requests_waiting": "waiting",
    b"sglang:num_queue_reqs": "waiting",
    b"vllm:gpu_cache_usage_perc": "kv_usage",
    b"vllm:kv_cache_usage_perc": "kv_usage",
    b"sglang:token_usage": "kv_usage",
    b"sglang:max_total_num_tokens": "kv_capacity_tokens",
    b"vllm:cache_config_info": "cache_config",  # an info gauge: the capacity is in its labels
    b"vllm:lora_requests_info": "lora_info",  # the LoRA adapters in use are in its labels
}
# Only the labels of `vllm:cache_config_info` lines are searched, so scraping stays one dict lookup a
# line. The name must start a label (`{` or `,` before it): `num_gpu_blocks_override` is another label.
_GPU_BLOCKS = re.compile(rb'[{,]\s*num_gpu_blocks="([^"]*)"')
_BLOCK_SIZE = re.compile(rb'[{,]\s*block_size="([^"]*)"')
# vLLM sets one series per distinct (running, waiting, max_lora) label set to the current time and
# never removes old ones: the series with the largest value is the current state.
_LORA_RUNNING = re.compile(rb'[{,]\s*running_lora_adapters="((?:[^"\\]|\\.)*)"')
_LORA_WAITING = re.compile(rb'[{,]\s*waiting_lora_adapters="((?:[^"\\]|\\.)*)"')
_UNESCAPE = re.compile(r"\\(.)")  # a label value's \\, \" and \n


PodMetrics = EngineStats  # what one scrape of one pod yields


def parse_metrics(text: bytes) -> PodMetrics:
    """Sum each wanted metric over its label sets (several models on one pod add up).

    The KV capacity is vLLM's `cache_config_info` num_gpu_blocks x block_size (one line per engine
    of a data-parallel pod, summed; a line without both labels as numbers, such as num_gpu_blocks
    "None" before the engine profiled its memory, makes it unknown), else SGLang's
    `max_total_num_tokens`.

    The LoRA adapters in use are the `running_lora_adapters` and `waiting_lora_adapters` (comma-
    separated names) of the newest `vllm:lora_requests_info` series: its value is the time vLLM
    last set it, and the series of earlier label sets stay exported with older times.
    """
    values: dict[str, float] = {}
    source: dict[str, bytes] = {}  # field -> the metric name it is read from (the first seen)
    vllm_capacity: float | None = None  # None: no cache_config_info line; nan: one was unusable
    lora_line, lora_time = b"", -math.inf  # the newest lora_requests_info series: labels, value
    for line in text.split(b"\n"):
        if not line or line[0] == 35:  # '#'
            continue
        name_end = line.find(b"{")
        if name_end < 0:
            name_end = line.find(b" ")
        name = line[:name_end]
        field = _NAMES.get(name)
        if field is None:
            continue
        # vLLM exports gpu_cache_usage_perc and kv_cache_usage_perc side by side (the old and new
        # names of one figure): sum a field over one metric's label sets, never over its aliases.
        if source.setdefault(field, name) != name:
            continue
        if field == "cache_config":
            vllm_capacity = (vllm_capacity or 0.0) + _cache_config_tokens(line[name_end:])
            continue
        try:
            value = float(line.rsplit(b" ", 1)[1])
        except (ValueError, IndexError):
            continue
        if field == "lora_info":
            if value >= lora_time:
                lora_line, lora_time = line[name_end:], value
            continue
        values[field] = values.get(field, 0.0) + value
    if vllm_capacity is not None:
        capacity = vllm_capacity if vllm_capacity > 0 else 0.0  # nan > 0 is False
    else:
        capacity = values.get("kv_capacity_tokens", 0.0)
    return EngineStats(running=values.get("running", 0.0), waiting=values.get("waiting", 0.0),
                      kv_usage=values.get("kv_usage", 0.0), scraped_at=time.monotonic(),
                      kv_capacity_tokens=capacity if math.isfinite(capacity) else 0.0,
                      lora_adapters=_lora_adapters(lora_line) if lora_line else frozenset())


def _lora_adapters(labels: bytes) -> frozenset[str]:
    """The adapter names of one lora_requests_info label set: running and waiting, comma-separated."""
    names: set[str] = set()
    for pattern in (_LORA_RUNNING, _LORA_WAITING):
        found = pattern.search(labels)
        if found is not None and found[1]:
            text = _UNESCAPE.sub(lambda m: "\n" if m[1] == "n" else m[1], found[1].decode("utf-8", "replace"))
            names.update(n.strip() for n in text.split(",") if n.strip())
    return frozenset(names)


def _cache_config_tokens(labels: bytes) -> float:
    """num_gpu_blocks x block_size of one cache_config_info label set; nan when either is unusable."""
    blocks = _GPU_BLOCKS.search(labels)
    size = _BLOCK_SIZE.search(labels)
    if blocks is None or size is None:
        return math.nan
    try:
        tokens = float(blocks[1]) * float(size[1])
    except ValueError:  # "None", "", garbage
        return math.nan
    return tokens if math.isfinite(tokens) and tokens > 0 else math.nan


class PodMetricsScraper(PodPoller):
    """Scrapes a set of pods every `interval` and publishes {pod key: PodMetrics}; a pod whose scrape
    fails is left out (callers treat missing metrics as unknown, not as idle).

    Pods that `set_pods` adds are scraped right away rather than at the next tick: with a slow
    interval (static values such as the KV capacity) a new pod would otherwise stay unknown for
    up to a whole interval.
    """

    def __init__(self, publish: Callable[[dict[str, PodMetrics]], None], *, interval: float = 0.1,
                 timeout: float = 0.5, name: str = "pod-metrics") -> None:
        super().__init__(interval=interval, timeout=timeout, name=name)
        self._publish = publish

    async def _scrape(self, pod: Pod) -> tuple[str, PodMetrics | None]:
        answer = await self.get(pod, "/metrics")
        if answer is None or answer[0] != 200:
            return pod.key, None
        return pod.key, parse_metrics(answer[1])

    async def scrape_once(self) -> dict[str, PodMetrics]:
        results = await asyncio.gather(*(self._scrape(p) for p in list(self._pods.values())))
        out = {k: m for k, m in results if m is not None}
        self._publish(out)
        return out

    async def poll_all(self) -> None:
        await self.scrape_once()
