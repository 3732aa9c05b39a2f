"""statesync against a real Redis: batching, own and foreign stream entries, snapshot + tail catch-up,
stream trimming, pod removal, shared in-flight load, a Redis outage."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from routing.load import LoadTracker
from routing.prefix_index import PrefixIndex
from statesync import KeyLayout, StateSync, StateSyncSettings
from statesync import statesync_pb2 as pb
from statesync.codec import FOREIGN, INVALID, MALFORMED, STREAM_FIELD, DeltaRecord, encode_batch
from tests.conftest import chain, start_redis

P0, P1 = "default/pod-0", "default/pod-1"
LAYOUT = KeyLayout()


def counter(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def eventually(check: Callable[[], bool], timeout: float = 3.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.01)


class Fleet:
    """StateSync replicas on one Redis, each with its own index and load tracker."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.replicas: list[StateSync] = []

    async def add(self, name: str, *, start: bool = True, **kw: object) -> StateSync:
        settings = StateSyncSettings(self.host, self.port, **{"snapshot_interval": 3600.0, **kw})  # type: ignore[arg-type]
        sync = StateSync(settings, index=PrefixIndex(50_000, 600.0), load=LoadTracker(),
                         registry=CollectorRegistry(), replica_id=name)
        self.replicas.append(sync)
        if start:
            assert await sync.start(), f"{name} did not catch up"
        return sync

    async def stop(self) -> None:
        await asyncio.gather(*(r.stop() for r in self.replicas))


@pytest.fixture
async def fleet(redis_server: tuple) -> AsyncIterator[Fleet]:
    host, port, _ = redis_server
    f = Fleet(host, port)
    try:
        yield f
    finally:
        await f.stop()


@pytest.fixture
async def rdb(redis_server: tuple) -> AsyncIterator[aioredis.Redis]:
    host, port, _ = redis_server
    client = aioredis.Redis(host=host, port=port)
    try:
        yield client
    finally:
        await client.aclose()


def registry_of(sync: StateSync) -> CollectorRegistry:
    assert sync.registry is not None
    return sync.registry


def index_of(sync: StateSync) -> PrefixIndex:
    assert sync.prefix is not None
    return sync.prefix.index


def holds(sync: StateSync, hashes: np.ndarray, pod: str = P0) -> int:
    return index_of(sync).match(hashes, [pod], time.time()).get(pod, 0)


# -- the prefix index across replicas ---------------------------------------------------------------

async def test_deltas_are_batched_and_applied_by_the_others_only(fleet: Fleet, rdb: aioredis.Redis) -> None:
    # A long flush interval: every decision of the window goes out as one stream entry.
    a = await fleet.add("a", flush_interval=0.3)
    b = await fleet.add("b")
    chains = [chain(i, 16) for i in range(20)]  # 20 x 16 hashes: fits one 4 KiB entry
    now = time.time()
    for i, h in enumerate(chains):
        index_of(a).add(h, P0 if i % 2 == 0 else P1, now)
    await eventually(lambda: all(holds(b, h, P0 if i % 2 == 0 else P1) == 16 for i, h in enumerate(chains)),
                     what="b holds a's chains")
    ra, rb = registry_of(a), registry_of(b)
    # b may apply the entry before a has read XADD's reply.
    await eventually(lambda: counter(ra, "extproc_statesync_batches_sent_total") == 1, what="a counted its batch")
    assert counter(ra, "extproc_statesync_deltas_sent_total") == 20
    assert await rdb.xlen(LAYOUT.stream) == 1
    assert counter(rb, "extproc_statesync_deltas_applied_total", source="stream") == 20
    # a read its own entry back and skipped it; b does not re-publish what it merged.
    await asyncio.sleep(0.05)
    assert counter(ra, "extproc_statesync_deltas_applied_total", source="stream") == 0
    assert counter(rb, "extproc_statesync_deltas_sent_total") == 0
    lag = counter(rb, "extproc_statesync_propagation_lag_seconds_count")
    assert lag == 20 and counter(rb, "extproc_statesync_propagation_lag_seconds_sum") / lag < 1.0


async def test_long_chains_are_split_into_bounded_entries(fleet: Fleet, rdb: aioredis.Redis) -> None:
    a = await fleet.add("a", flush_interval=0.2)
    b = await fleet.add("b")
    long = chain(99, 3000)
    index_of(a).add(long, P0, time.time())
    await eventually(lambda: holds(b, long) == 3000, what="b holds the whole chain")
    entries = await rdb.xrange(LAYOUT.stream)
    assert len(entries) >= 6
    assert all(len(fields[STREAM_FIELD]) <= 4096 for _, fields in entries)


async def test_malformed_and_foreign_entries_are_dropped_and_counted(fleet: Fleet, rdb: aioredis.Redis) -> None:
    b = await fleet.add("b")
    await rdb.xadd(LAYOUT.stream, {"foo": "bar"})  # foreign: not our field
    await rdb.xadd(LAYOUT.stream, {STREAM_FIELD: b"\xff\xfe\x00garbage"})  # does not parse
    await rdb.xadd(LAYOUT.stream, {STREAM_FIELD: pb.DeltaBatch(seq=1).SerializeToString()})  # no replica id
    bad = pb.DeltaBatchWire(replica_id="z", sent_unix_seconds=time.time(), deltas=[
        pb.DeltaWire(pod_key=P0, unix_seconds=time.time(), hashes=b"\x01" * 9)])
    await rdb.xadd(LAYOUT.stream, {STREAM_FIELD: bad.SerializeToString()})
    good = chain(5)
    await rdb.xadd(LAYOUT.stream, {STREAM_FIELD: encode_batch("z", 2, time.time(),
                                                              [DeltaRecord(P0, "m", time.time(), good)])})
    await eventually(lambda: holds(b, good) == 32, what="the good entry after the bad ones applied")
    r = registry_of(b)
    assert counter(r, "extproc_statesync_deltas_dropped_total", reason=FOREIGN) == 1
    assert counter(r, "extproc_statesync_deltas_dropped_total", reason=MALFORMED) == 2
    assert counter(r, "extproc_statesync_deltas_dropped_total", reason=INVALID) == 1
    assert b.state.connected and b.prefix is not None and b.prefix.last_id is not None


async def test_a_joiner_catches_up_from_snapshots_plus_the_tail(fleet: Fleet, rdb: aioredis.Redis) -> None:
    a = await fleet.add("a")
    b = await fleet.add("b")
    old = [chain(i) for i in range(10)]
    for h in old:
        index_of(a).add(h, P0, time.time())
    await eventually(lambda: all(holds(b, h) for h in old), what="b caught up")
    assert a.prefix is not None and b.prefix is not None
    await a.prefix.write_snapshot()
    await b.prefix.write_snapshot()
    await rdb.xtrim(LAYOUT.stream, maxlen=0)  # the old deltas now live only in the snapshots
    new = chain(100)
    index_of(b).add(new, P1, time.time())  # after the snapshots: only in the stream tail
    await eventually(lambda: holds(a, new, P1) == 32, what="a got the tail delta")

    c = await fleet.add("c")
    assert all(holds(c, h) == 32 for h in old) and holds(c, new, P1) == 32
    rc = registry_of(c)
    assert counter(rc, "extproc_statesync_snapshots_loaded_total") == 2
    assert counter(rc, "extproc_statesync_resyncs_total", reason="join") == 1
    # Grouped by pod and second: a couple of deltas per snapshot, not one per decision.
    assert 2 <= counter(rc, "extproc_statesync_deltas_applied_total", source="snapshot") <= 4


async def test_a_replica_trimmed_past_resyncs_from_snapshots(fleet: Fleet, rdb: aioredis.Redis) -> None:
    a = await fleet.add("a")
    b = await fleet.add("b")
    assert a.prefix is not None and b.prefix is not None
    first = chain(1)
    index_of(a).add(first, P0, time.time())
    await eventually(lambda: holds(b, first) == 32, what="b in sync")
    for task in b._tasks:  # b stalls (as if cut off from Redis) ...
        task.cancel()
    await asyncio.gather(*b._tasks, return_exceptions=True)
    b._tasks.clear()
    missed = chain(2)
    index_of(a).add(missed, P0, time.time())
    await asyncio.sleep(0.05)
    await rdb.xtrim(LAYOUT.stream, maxlen=0)  # ... and the stream moves on without it
    index_of(a).add(chain(3), P0, time.time())
    await asyncio.sleep(0.05)
    await a.prefix.write_snapshot()
    await b.prefix.resync("reconnect")
    assert counter(registry_of(b), "extproc_statesync_resyncs_total", reason="gap") == 1
    assert holds(b, missed) == 32 and holds(b, chain(3)) == 32


async def test_stream_memory_stays_bounded(fleet: Fleet, rdb: aioredis.Redis) -> None:
    maxlen = 200
    a = await fleet.add("a", stream_maxlen=maxlen, flush_interval=0.001)
    assert a.prefix is not None
    now = time.time()
    for i in range(1500):
        index_of(a).add(chain(i, 480), P0, now)  # ~3.9 KB: one full entry per decision
        if i % 50 == 49:
            await a.prefix.flush()
    await a.prefix.flush()
    length = await rdb.xlen(LAYOUT.stream)
    used = await rdb.memory_usage(LAYOUT.stream)
    # Approximate trimming keeps at most one more macro node (<= 100 entries) than asked.
    assert maxlen <= length <= maxlen + 100
    assert used is not None and used <= (maxlen + 100) * (4096 + 128), used


async def test_pod_removal_propagates(fleet: Fleet) -> None:
    a = await fleet.add("a")
    b = await fleet.add("b")
    assert a.prefix is not None and b.prefix is not None
    pods = {P0: "m", P1: "m"}
    a.prefix.on_pods(pods)
    b.prefix.on_pods(pods)
    h = chain(7)
    index_of(a).add(h, P1, time.time() - 1)
    await eventually(lambda: holds(b, h, P1) == 32, what="b learnt P1's blocks")
    index_of(a).remove_pod(P1)  # what Router.update_snapshot does, then discovery tells statesync
    a.prefix.on_pods({P0: "m"})
    await eventually(lambda: holds(b, h, P1) == 0, what="b forgot P1")
    # A late delta for the removed pod, stamped before its removal, stays dropped.
    index_of(a).add(h, P1, time.time() - 5)
    await eventually(lambda: counter(registry_of(b), "extproc_statesync_deltas_dropped_total",
                                     reason="removed_pod") == 1, what="late delta dropped")
    assert holds(b, h, P1) == 0


# -- in-flight load -------------------------------------------------------------------------------------



async def test_in_flight_counts_are_shared_and_stale_reports_dropped(fleet: Fleet) -> None:
    a = await fleet.add("a", load_interval=0.02)
    b = await fleet.add("b", load_interval=0.02)
    assert a.load is not None and b.load is not None
    a.load.load.acquire(P0, 100)
    a.load.load.acquire(P0)
    b.load.load.acquire(P1)
    await eventually(lambda: b.load.load.inflight(P0) == 2 and a.load.load.inflight(P1) == 1, what="shared load")
    assert b.load.load.prefill_tokens(P0) == 100 and b.load.load.snapshot() == {P1: 1}
    assert b.state.remote_replicas == 1
    a.load.load.release(P0, 100)
    await eventually(lambda: b.load.load.inflight(P0) == 1, what="release seen")
    # a stops reporting (its report stays in Redis, unchanged): b drops it after stale_after (1 s).
    b.load.stale_after = 0.2
    for task in a._tasks:
        task.cancel()
    await eventually(lambda: b.load.load.inflight(P0) == 0 and b.state.remote_replicas == 0, what="stale dropped")


async def test_redis_down_means_local_state_and_recovery_afterwards(redis_server: tuple, tmp_path: Path) -> None:
    host, port, proc = redis_server
    fleet = Fleet(host, port)
    restarted: subprocess.Popen | None = None
    try:
        a = await fleet.add("a", load_interval=0.02)
        b = await fleet.add("b", load_interval=0.02)
        assert a.load is not None and b.load is not None and a.prefix is not None
        a.load.load.acquire(P0)
        await eventually(lambda: b.load.load.inflight(P0) == 1, what="shared load")
        proc.terminate()
        proc.wait(5)
        during = chain(42)
        index_of(a).add(during, P0, time.time())  # routing goes on; the delta waits in a's queue
        await eventually(lambda: b.load.load.inflight(P0) == 0, what="remote load dropped")
        await eventually(lambda: not b.state.connected and a.state.pending_deltas == 1, what="outage seen")
        assert counter(registry_of(b), "extproc_statesync_redis_errors_total", operation="read") >= 1

        restarted = start_redis(port, tmp_path)  # empty: Redis lost everything
        await eventually(lambda: holds(b, during) == 32 and b.load.load.inflight(P0) == 1, timeout=10,
                         what="b converged after Redis came back")
        assert b.state.connected and a.state.pending_deltas == 0
        assert counter(registry_of(b), "extproc_statesync_resyncs_total", reason="redis_restart") == 1
    finally:
        await fleet.stop()
        if restarted is not None:
            restarted.terminate()
            restarted.wait(5)
