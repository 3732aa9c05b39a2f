"""Active health checks: `GET /health` on every pod; a failing pod is not routed to until it recovers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from extproc_router.discovery.poller import PodPoller
from routing.pods import Pod

log = logging.getLogger("extproc_router.health")


class HealthProber(PodPoller):
    """Probes pods at a fixed interval and reports the set of healthy pod keys when it changes.

    A new pod counts as not ready until its first probe succeeds (Kubernetes readiness semantics);
    `unhealthy_threshold` consecutive failures mark a ready pod down, one success brings it back.
    """

    def __init__(self, on_change: Callable[[set[str]], None], *, interval: float = 1.0,
                 timeout: float = 1.0, unhealthy_threshold: int = 1, path: str = "/health") -> None:
        # A fresh connection per probe: a pod that hangs must not pass on a pooled one.
        super().__init__(interval=interval, timeout=timeout, name="health-prober", keepalive=False)
        self._on_change = on_change
        self.unhealthy_threshold = max(1, unhealthy_threshold)
        self.path = path
        self._healthy: set[str] = set()
        self._failures: dict[str, int] = {}

    @property
    def healthy(self) -> set[str]:
        return set(self._healthy)

    def set_pods(self, pods: Iterable[Pod]) -> bool:
        """Replace the probed set; probes the new set right away."""
        added = super().set_pods(pods)
        gone = self._healthy - set(self._pods)
        if gone:
            self._healthy -= gone
        self._failures = {k: v for k, v in self._failures.items() if k in self._pods}
        self._wake.set()
        return added

    async def start(self, first_round: bool = True) -> None:
        await super().start(first_round)

    async def _probe(self, pod: Pod) -> bool:
        answer = await self.get(pod, self.path)
        return answer is not None and answer[0] == 200

    async def probe_all(self) -> None:
        await self.poll_all()

    async def poll_all(self) -> None:
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
