"""Engine metrics scraped from pods' `/metrics` (vLLM names; SGLang's equivalents accepted).

The decode side of `pd` ranks pods by what the engine reports (running sequences, KV-cache usage),
not only by what this router sent: other routers and direct clients load the same pods.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import aiohttp

from routing.pods import Pod

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
}


@dataclass(frozen=True, slots=True)
class PodMetrics:
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0  # 0..1
    scraped_at: float = 0.0


def parse_metrics(text: bytes) -> PodMetrics:
    """Sum each wanted metric over its label sets (several models on one pod add up)."""
    values: dict[str, float] = {}
    for line in text.split(b"\n"):
        if not line or line[0] == 35:  # '#'
            continue
        name_end = line.find(b"{")
        if name_end < 0:
            name_end = line.find(b" ")
        field = _NAMES.get(line[:name_end])
        if field is None:
            continue
        try:
            value = float(line.rsplit(b" ", 1)[1])
        except (ValueError, IndexError):
            continue
        values[field] = values.get(field, 0.0) + value
    return PodMetrics(running=values.get("running", 0.0), waiting=values.get("waiting", 0.0),
                      kv_usage=values.get("kv_usage", 0.0), scraped_at=time.monotonic())


class PodMetricsScraper:
    """Scrapes a set of pods every `interval` and publishes {pod key: PodMetrics}; a pod whose scrape
    fails is left out (callers treat missing metrics as unknown, not as idle)."""

    def __init__(self, publish: Callable[[dict[str, PodMetrics]], None], *, interval: float = 0.1,
                 timeout: float = 0.5) -> None:
        self._publish = publish
        self.interval = interval
        self.timeout = timeout
        self._pods: dict[str, Pod] = {}
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    def set_pods(self, pods: Iterable[Pod]) -> None:
        self._pods = {p.key: p for p in pods}

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout),
                                              connector=aiohttp.TCPConnector(limit=0))
        self._task = asyncio.create_task(self._loop(), name="pod-metrics")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def _scrape(self, pod: Pod) -> tuple[str, PodMetrics | None]:
        assert self._session is not None
        try:
            async with self._session.get(f"http://{pod.address}/metrics") as resp:
                if resp.status != 200:
                    return pod.key, None
                return pod.key, parse_metrics(await resp.read())
        except (aiohttp.ClientError, TimeoutError, OSError):
            return pod.key, None

    async def scrape_once(self) -> dict[str, PodMetrics]:
        results = await asyncio.gather(*(self._scrape(p) for p in list(self._pods.values())))
        out = {k: m for k, m in results if m is not None}
        self._publish(out)
        return out

    async def _loop(self) -> None:
        while True:
            if self._pods:
                try:
                    await self.scrape_once()
                except Exception:  # keep scraping whatever one round did
                    log.exception("pod metrics scrape failed")
            await asyncio.sleep(self.interval)
