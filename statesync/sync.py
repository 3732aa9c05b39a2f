"""`StateSync`: everything statesync runs in one router process, started and stopped as one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from extproc_router.resp import DEFAULT_LIMITS, PipelinedRedis, RespLimits
from routing.load import LoadTracker
from routing.pods import PodSnapshot
from routing.prefix_index import PrefixIndex
from statesync.keys import DEFAULT_NAMESPACE, KeyLayout
from statesync.load import LoadSync
from statesync.metrics import StateSyncMetrics, SyncState, SyncStateCollector
from statesync.prefix import ErrorLog, PrefixSync, PrefixSyncSettings

log = logging.getLogger("extproc_router.statesync")


@dataclass(frozen=True, slots=True)
class StateSyncSettings:
    """Where Redis is and how often to sync (RouterConfig's `redis_*` and `statesync_*`, which take
    their defaults from here: config.STATESYNC_FIELDS maps the names)."""

    redis_host: str
    redis_port: int = 6379
    redis_password: str | None = None
    redis_tls: bool = False
    flush_interval: float = 0.005  # new deltas are published this long after the first of them, as one entry
    snapshot_interval: float = 10.0  # seconds between this replica's compacted snapshots
    stream_maxlen: int = 10_000  # stream entries Redis keeps (XADD MAXLEN ~): bounds its memory
    load_interval: float = 0.1  # share in-flight counts this often (the reference's period)
    namespace: str = DEFAULT_NAMESPACE  # key prefix: fleets sharing one Redis need different ones
    start_timeout: float = 3.0  # how long `start` waits to catch up before routing begins anyway

    def prefix_settings(self) -> PrefixSyncSettings:
        # Snapshots outlive a few missed writes, and a fleet restarted within a minute finds them.
        return PrefixSyncSettings(flush_interval=self.flush_interval, stream_maxlen=self.stream_maxlen,
                                  snapshot_interval=self.snapshot_interval,
                                  snapshot_ttl=max(60.0, 6 * self.snapshot_interval))


def new_replica_id() -> str:
    """Host name (the pod name on Kubernetes), pid and a random suffix: unique per process start, so
    a restarted replica never mistakes its predecessor's deltas for its own."""
    host = socket.gethostname().split(".")[0] or "router"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


class StateSync:
    """Prefix-index and in-flight-load replication through Redis for one router process.

    `index` is the prefix index the strategies share (None: load only); `load` the router's
    LoadTracker (None: prefix only). Metrics go to `registry`.
    """

    def __init__(self, settings: StateSyncSettings, *, index: PrefixIndex | None, load: LoadTracker | None,
                 registry: CollectorRegistry | None = None, replica_id: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.replica_id = replica_id or new_replica_id()
        self.layout = KeyLayout(settings.namespace)
        self.registry = registry
        self.metrics = StateSyncMetrics(registry)
        self.state = SyncState()
        if registry is not None:
            registry.register(SyncStateCollector(self.state, clock))
        errors = ErrorLog(self.metrics)
        s = settings
        pre = s.prefix_settings()

        def client(timeout: float, limits: RespLimits = DEFAULT_LIMITS) -> PipelinedRedis:
            return PipelinedRedis(s.redis_host, s.redis_port, password=s.redis_password, tls=s.redis_tls,
                                  timeout=timeout, limits=limits)

        # Three connections: XREAD BLOCK holds its own; snapshots (a few MB) would hold up the
        # small, latency-bound XADD / load commands if they shared one.
        self.writer = client(1.0)
        self.reader = client(pre.block_ms / 1000 + 2.0)
        # A snapshot is at most ~80 bytes per index entry (every entry its own delta); the client's
        # default reply bound (64 MiB) covers the default index 4x over, a much larger index gets room.
        self.bulk = client(10.0, _snapshot_limits(index.capacity if index is not None else 0))
        self.prefix = None if index is None else PrefixSync(
            index, replica_id=self.replica_id, layout=self.layout, settings=pre, writer=self.writer,
            reader=self.reader, bulk=self.bulk, metrics=self.metrics, state=self.state, errors=errors, clock=clock)
        self.load = None if load is None else LoadSync(
            load, replica_id=self.replica_id, layout=self.layout, writer=self.writer, metrics=self.metrics,
            state=self.state, errors=errors, interval=s.load_interval, clock=clock)
        self._tasks: list[asyncio.Task[None]] = []

    def on_pods(self, snapshot: PodSnapshot) -> None:
        """Discovery published a new pod snapshot (after the router applied it)."""
        if self.prefix is not None:
            self.prefix.on_pods({p.key: m.name for m in snapshot.models.values() for p in m.pods})

    async def start(self) -> bool:
        """Start the loops and wait up to `start_timeout` for the first catch-up; True if caught up.
        Routing never waits longer: without Redis the replica works on its own state."""
        s = self.settings
        if self.prefix is not None:
            self._tasks += [asyncio.create_task(self.prefix.run_reader(), name="statesync-reader"),
                            asyncio.create_task(self.prefix.run_publisher(), name="statesync-publisher"),
                            asyncio.create_task(self.prefix.run_snapshots(), name="statesync-snapshots")]
        if self.load is not None:
            self._tasks.append(asyncio.create_task(self.load.run(), name="statesync-load"))
        if self.prefix is None:
            return True
        try:
            await asyncio.wait_for(self.prefix.synced.wait(), s.start_timeout)
        except TimeoutError:
            log.warning("state sync: nothing from Redis at %s:%d after %.0fs; this replica routes on its own "
                        "(in-process) state and catches up in the background once Redis answers",
                        s.redis_host, s.redis_port, s.start_timeout)
            return False
        log.info("state sync: replica %s caught up from Redis at %s:%d (%d index entries); sharing prefix-cache "
                 "state and in-flight load", self.replica_id, s.redis_host, s.redis_port, len(self.prefix.index))
        return True

    async def stop(self) -> None:
        """Stop the loops, publish the last deltas and withdraw our load report (best effort, ~1 s)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(
                *(x.close() for x in (self.prefix, self.load) if x is not None)), 1.5)
        for c in (self.writer, self.reader, self.bulk):
            await c.close()


def _snapshot_limits(index_capacity: int) -> RespLimits:
    """Reply bounds of the connection that reads snapshots: 4x the largest snapshot `index_capacity`
    entries can make (~80 bytes each at worst), never below the client's defaults."""
    default = DEFAULT_LIMITS
    bulk = max(default.max_bulk_bytes, 4 * 80 * index_capacity)
    return RespLimits(max_bulk_bytes=bulk, max_reply_bytes=max(default.max_reply_bytes, 2 * bulk))
