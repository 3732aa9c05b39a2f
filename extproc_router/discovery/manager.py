"""Keeps the router's pod snapshot current: file reloads plus health-check results."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from extproc_router.discovery.health import HealthProber
from extproc_router.discovery.static_file import DiscoveryError, PodFile, file_signature, read_pod_file
from routing.pods import PodSnapshot

log = logging.getLogger("extproc_router.discovery")


class FileDiscovery:
    """Watches the pod file (polling its mtime and size) and health-probes its pods.

    Every change yields a new immutable PodSnapshot passed to `publish`. A file that stops parsing
    is reported and ignored: the router keeps serving the last good pod set.
    """

    def __init__(self, path: str | os.PathLike[str], publish: Callable[[PodSnapshot], None], *,
                 poll_interval: float = 1.0, health_interval: float = 1.0, health_timeout: float = 1.0,
                 unhealthy_threshold: int = 1, on_reload_error: Callable[[str], None] | None = None) -> None:
        self.path = path
        self._publish = publish
        self.poll_interval = poll_interval
        self._on_reload_error = on_reload_error
        self._file = PodFile()
        self._sig: tuple[int, int] | None = None
        self._version = 0
        self._healthy: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self.prober = HealthProber(self._health_changed, interval=health_interval, timeout=health_timeout,
                                   unhealthy_threshold=unhealthy_threshold)
        self.ready = False  # True once the first snapshot with health results is published

    def load_initial(self) -> PodFile:
        """Read the file once, raising DiscoveryError if it is unusable (fail fast at start-up)."""
        self._sig = file_signature(self.path)
        self._file = read_pod_file(self.path)
        return self._file

    async def start(self) -> None:
        self.prober.set_pods(self._file.pods)
        self._republish()
        await self.prober.start()
        self._healthy = self.prober.healthy
        self._republish()
        self.ready = True
        self._task = asyncio.create_task(self._watch(), name="pod-file-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.prober.stop()

    def _health_changed(self, healthy: set[str]) -> None:
        self._healthy = healthy
        self._republish()

    def _republish(self) -> None:
        self._version += 1
        self._publish(PodSnapshot.build(self._file.pods, self._healthy, self._file.model_configs,
                                        self._version, adapters=self._file.adapters))

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            sig = file_signature(self.path)
            if sig == self._sig:
                continue
            self._sig = sig
            try:
                new = await asyncio.to_thread(read_pod_file, self.path)
            except DiscoveryError as exc:
                log.error("pod file reload failed, keeping the previous pods: %s", exc)
                if self._on_reload_error:
                    self._on_reload_error(str(exc))
                continue
            old_keys = {p.key for p in self._file.pods}
            new_keys = {p.key for p in new.pods}
            log.info("pod file reloaded: %d models, %d pods (+%d -%d)", len(new.model_configs), len(new.pods),
                     len(new_keys - old_keys), len(old_keys - new_keys))
            self._file = new
            self._healthy &= new_keys
            self._republish()
            self.prober.set_pods(new.pods)
