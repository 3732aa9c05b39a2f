"""Active health checks: `GET /health` on every pod; a failing pod is not routed to until it recovers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

import aiohttp

from routing.pods import Pod

log = logging.getLogger("extproc_router.health")


class HealthProber:
    """Probes pods at a fixed interval and reports the set of healthy pod keys when it changes.

    A new pod counts as not ready until its first probe succeeds (Kubernetes readiness semantics);
    `unhealthy_threshold` consecutive failures mark a ready pod down, one success brings it back.
    """

    def __init__(self, on_change: Callable[[set[str]], None], *, interval: float = 1.0,
                 timeout: float = 1.0, unhealthy_threshold: int = 1, path: str = "/health") -> None:
        self._on_change = on_change
        self.interval = interval
        self.timeout = timeout
        self.unhealthy_threshold = max(1, unhealthy_threshold)
        self.path = path
        self._pods: dict[str, Pod] = {}
        self._healthy: set[str] = set()
        self._failures: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._wake = asyncio.Event()

    @property
    def healthy(self) -> set[str]:
        return set(self._healthy)

    def set_pods(self, pods: Iterable[Pod]) -> None:
        """Replace the probed set; probes the new set right away."""
        self._pods = {p.key: p for p in pods}
        gone = self._healthy - set(self._pods)
        if gone:
            self._healthy -= gone
        self._failures = {k: v for k, v in self._failures.items() if k in self._pods}
        self._wake.set()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            connector=aiohttp.TCPConnector(limit=0, force_close=True))
        await self.probe_all()
        self._task = asyncio.create_task(self._loop(), name="health-prober")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            try:
                await self.probe_all()
            except Exception:  # never let one bad round stop health checking
                log.exception("health probe round failed")

    async def _probe(self, pod: Pod) -> bool:
        assert self._session is not None
        try:
            async with self._session.get(f"http://{pod.address}{self.path}") as resp:
                await resp.read()
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def probe_all(self) -> None:
        pods = list(self._pods.values())
        if not pods:
            return
        results = await asyncio.gather(*(self._probe(p) for p in pods))
        before = set(self._healthy)
        for pod, ok in zip(pods, results, strict=True):
            if pod.key not in self._pods:  # removed while probing
                continue
            if ok:
                self._failures.pop(pod.key, None)
                if pod.key not in self._healthy:
                    log.info("pod %s (%s) is healthy", pod.key, pod.address)
                self._healthy.add(pod.key)
            else:
                n = self._failures.get(pod.key, 0) + 1
                self._failures[pod.key] = n
                if pod.key in self._healthy and n >= self.unhealthy_threshold:
                    self._healthy.discard(pod.key)
                    log.warning("pod %s (%s) failed its health check; not routing to it", pod.key,
                                pod.address)
        if self._healthy != before:
            self._on_change(set(self._healthy))
