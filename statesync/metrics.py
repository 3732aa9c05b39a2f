"""Prometheus metrics of statesync, registered in the router process's registry."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# From loopback-fast to "Redis was down for a while": the p99 target is 50 ms.
_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
                10.0, 60.0)


@dataclass(slots=True)
class SyncState:
    """What the scrape-time gauges read (kept up to date by the sync loops as plain values)."""

    connected: bool = False
    synced: bool = False
    last_applied_wall: float | None = None  # when a delta of another replica was last applied
    pending_deltas: int = 0
    remote_replicas: int = 0


class StateSyncMetrics:
    """Counters and histograms updated as statesync works; gauges computed at scrape time."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        r = registry
        self.deltas_sent = Counter("extproc_statesync_deltas_sent", "Prefix-index deltas (one per routing "
                                   "decision, or per chunk of a long prompt) this replica published.", registry=r)
        self.batches_sent = Counter("extproc_statesync_batches_sent", "Stream entries (DeltaBatch messages) "
                                    "this replica published.", registry=r)
        self.deltas_applied = Counter("extproc_statesync_deltas_applied", "Deltas of other replicas merged into "
                                      "this replica's prefix index (from the stream or a snapshot).",
                                      ["source"], registry=r)
        self.deltas_dropped = Counter(
            "extproc_statesync_deltas_dropped", "Deltas or stream entries not applied or not published, by reason: "
            "malformed / foreign (stream entries), invalid, expired (older than the index TTL), removed_pod "
            "(for a pod removed since), backlog (not published: Redis unreachable for too long).",
            ["reason"], registry=r)
        self.lag = Histogram(
            "extproc_statesync_propagation_lag_seconds", "From the routing decision on another replica (its "
            "wall clock, batching included) to the delta applied here (this one's).", buckets=_LAG_BUCKETS,
            registry=r)
        self.redis_errors = Counter("extproc_statesync_redis_errors", "Failed Redis operations of statesync; "
                                    "routing goes on with local state.", ["operation"], registry=r)
        self.snapshot_bytes = Gauge("extproc_statesync_snapshot_bytes", "Size of the last compacted snapshot "
                                    "this replica wrote.", registry=r)
        self.snapshot_entries = Gauge("extproc_statesync_snapshot_entries", "Index entries in the last "
                                      "snapshot this replica wrote.", registry=r)
        self.snapshots_loaded = Counter("extproc_statesync_snapshots_loaded", "Snapshots of other replicas "
                                        "merged (on start and after gaps).", registry=r)
        self.resyncs = Counter("extproc_statesync_resyncs", "Catch-ups from snapshots plus the stream tail, by "
                               "cause: join, gap (stream trimmed past this replica), redis_restart, "
                               "stream_lost, followup.", ["reason"], registry=r)
        self._dropped: dict[str, Counter] = {}
        self._errors: dict[str, Counter] = {}

    def dropped(self, reason: str, n: int = 1) -> None:
        child = self._dropped.get(reason)
        if child is None:
            child = self._dropped[reason] = self.deltas_dropped.labels(reason)
        child.inc(n)

    def error(self, operation: str) -> None:
        child = self._errors.get(operation)
        if child is None:
            child = self._errors[operation] = self.redis_errors.labels(operation)
        child.inc()


class SyncStateCollector(Collector):
    """Gauges read from `SyncState` when scraped."""

    def __init__(self, state: SyncState, wall_clock: Callable[[], float]) -> None:
        self._state = state
        self._clock = wall_clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self._state
        yield GaugeMetricFamily("extproc_statesync_connected", "1 while this replica's stream reader is "
                                "connected to Redis.", value=1 if s.connected else 0)
        yield GaugeMetricFamily("extproc_statesync_synced", "1 once this replica has caught up (snapshots plus "
                                "stream tail) since its start or its last gap.", value=1 if s.synced else 0)
        age = GaugeMetricFamily("extproc_statesync_last_applied_age_seconds", "Seconds since a delta of another "
                                "replica was last applied (absent until the first one).")
        if s.last_applied_wall is not None:
            age.add_metric([], max(0.0, self._clock() - s.last_applied_wall))
        yield age
        yield GaugeMetricFamily("extproc_statesync_pending_deltas", "Deltas waiting to be published (grows "
                                "while Redis is unreachable, bounded).", value=s.pending_deltas)
        yield GaugeMetricFamily("extproc_statesync_remote_replicas", "Other replicas whose load report is fresh "
                                "(updated within the last second).", value=s.remote_replicas)
