"""The loop both pod pollers share (health probes, engine-metrics scrapes): a set of pods polled every
`interval` over one HTTP session, woken at once when `set_pods` brings pods it has not polled yet."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

import aiohttp

from routing.pods import Pod

log = logging.getLogger("extproc_router.discovery")


class PodPoller:
    """Subclasses implement `poll_all`; `start` runs one round before returning when `first_round`."""

    def __init__(self, *, interval: float, timeout: float, name: str, keepalive: bool = True) -> None:
        self.interval = interval
        self.timeout = timeout
        self.name = name
        self._keepalive = keepalive
        self._pods: dict[str, Pod] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    def set_pods(self, pods: Iterable[Pod]) -> bool:
        """Replace the polled set; True (and the next round starts now) when it has new pods."""
        old = self._pods
        self._pods = {p.key: p for p in pods}
        added = not self._pods.keys() <= old.keys()
        if added:
            self._wake.set()
        return added

    async def poll_all(self) -> None:
        raise NotImplementedError

    async def start(self, first_round: bool = False) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            connector=aiohttp.TCPConnector(limit=0, force_close=not self._keepalive))
        if first_round and self._pods:
            await self.poll_all()
        self._task = asyncio.create_task(self._loop(wait_first=first_round), name=self.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def get(self, pod: Pod, path: str) -> tuple[int, bytes] | None:
        """Status and body of `GET path` on `pod`; None when it did not answer in time."""
        assert self._session is not None
        try:
            async with self._session.get(f"http://{pod.address}{path}") as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None

    async def _sleep(self) -> None:
        # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancellation that arrives as
        # the wake-up event is set (stop() right after set_pods), and the loop would then never end.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.interval):
                await self._wake.wait()

    async def _loop(self, wait_first: bool) -> None:
        if wait_first:
            await self._sleep()
        while True:
            # Cleared before the round: pods added while it runs set it again and get the next one.
            self._wake.clear()
            if self._pods:
                try:
                    await self.poll_all()
                except Exception:  # never let one bad round stop polling
                    log.exception("%s round failed", self.name)
            await self._sleep()
