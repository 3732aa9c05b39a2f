"""Prefix-index replication: deltas on a Redis Stream, compacted snapshots for joiners and gaps.

* **Publish.** Every `flush_interval` (5 ms) the additions routing made to the local index since
  the last flush become one DeltaBatch, appended with `XADD <stream> MAXLEN ~ <n>` (bigger batches
  are split at `max_message_bytes`, so every entry, and with it the stream, is bounded in size).
  While Redis is unreachable they wait in a bounded queue and go out after reconnection.
* **Apply.** One connection sits in `XREAD BLOCK` on the stream and merges every other replica's
  deltas as they arrive (own batches skipped by replica id; newer timestamp wins per entry, so
  re-reading is harmless). Stream entries that are not ours or do not parse are dropped and counted.
* **Snapshots.** Every `snapshot_interval` (10 s, jittered) each replica writes its whole live
  index, compacted, under its own key with a TTL, noting the last stream id it reflects, and
  registers itself in a sorted set. A joiner, or a replica that finds the stream trimmed past its
  position or Redis restarted, merges the registered snapshots and reads the stream from the
  oldest of their positions. One key per replica rather than a shared, turn-taking one: no
  coordination, a replica still catching up can never overwrite the fleet's good snapshot, and
  merging several snapshots heals a replica that missed part of the stream; it costs Redis one
  snapshot (~9 bytes per index entry) per replica.
* **Pod removal.** A pod leaving this replica's pod snapshot is tombstoned locally (late deltas
  for it are dropped) and published, so every replica forgets it even if its own discovery lags.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from extproc_router.resp import PipelinedRedis, RespError
from routing.prefix_index import PrefixIndex
from statesync.codec import (
    FOREIGN,
    INVALID,
    STREAM_FIELD,
    DecodeError,
    DeltaRecord,
    decode_batch,
    decode_snapshot,
    encode_batch,
    encode_snapshot,
)
from statesync.keys import KeyLayout
from statesync.metrics import StateSyncMetrics, SyncState

log = logging.getLogger("extproc_router.statesync")

REDIS_ERRORS = (RespError, ConnectionError, OSError, TimeoutError)
_MAX_FUTURE_S = 300.0  # a delta stamped further ahead than this is nonsense (or a broken clock)
_APPLY_SLICE = 64  # stream entries applied between two yields to the event loop


@dataclass(frozen=True, slots=True)
class PrefixSyncSettings:
    """Timing and bounds of prefix-index replication. The first four come from StateSyncSettings
    (`prefix_settings`), where their defaults are; the rest are fixed here."""

    flush_interval: float
    stream_maxlen: int
    snapshot_interval: float
    snapshot_ttl: float
    max_message_bytes: int = 4096  # one stream entry's payload, at most (a longer delta is split)
    max_pending_hashes: int = 131_072  # outgoing queue while Redis is unreachable (1 MiB of hashes)
    read_count: int = 256  # stream entries per XREAD
    block_ms: int = 1000
    backoff_initial: float = 0.05
    backoff_max: float = 5.0


def stream_id(raw: bytes | str) -> tuple[int, int]:
    """`"1718000000000-3"` -> (1718000000000, 3), ordered as Redis orders stream ids."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class Backoff:
    """Capped exponential backoff with jitter, reset on success."""

    def __init__(self, initial: float, cap: float) -> None:
        self.initial, self.cap = initial, cap
        self._next = initial

    def reset(self) -> None:
        self._next = self.initial

    def next(self) -> float:
        delay = self._next
        self._next = min(self.cap, self._next * 2)
        return delay * random.uniform(0.8, 1.2)


class ErrorLog:
    """One warning per operation per 10 s, however often Redis fails; every failure counted. The
    sync loops route any other exception here too (with its traceback): a bug in state sync must
    cost a retry, never the replica."""

    def __init__(self, metrics: StateSyncMetrics) -> None:
        self._metrics = metrics
        self._last: dict[str, float] = {}

    def __call__(self, operation: str, exc: BaseException) -> None:
        self._metrics.error(operation)
        now = time.monotonic()
        if now - self._last.get(operation, -1e9) >= 10.0:
            self._last[operation] = now
            log.warning("state sync: %s failed (%s: %s); routing goes on with local state, retrying",
                        operation, type(exc).__name__, exc, exc_info=not isinstance(exc, REDIS_ERRORS))


class PrefixSync:
    """Replicates one PrefixIndex through Redis. `run_*` are the background loops (StateSync starts
    them); `flush`, `write_snapshot` and `resync` are also called directly by tests. `synced` is
    set once the first catch-up (snapshots, then the stream tail) is complete."""

    def __init__(self, index: PrefixIndex, *, replica_id: str, layout: KeyLayout, settings: PrefixSyncSettings,
                 writer: PipelinedRedis, reader: PipelinedRedis, bulk: PipelinedRedis, metrics: StateSyncMetrics,
                 state: SyncState, errors: ErrorLog, clock: Callable[[], float] = time.time) -> None:
        self.index = index
        self.replica_id = replica_id
        self.layout = layout
        self.settings = settings
        self.writer, self.reader, self.bulk = writer, reader, bulk
        self.metrics = metrics
        self.state = state
        self._errors = errors
        self._clock = clock
        index.track_additions = True
        self._wake = asyncio.Event()  # set when there is something to publish
        index.on_additions = self._wake.set
        self.last_id: str | None = None  # last stream entry applied; None until the first sync
        self.synced = asyncio.Event()
        self._resync_reason: str | None = "join"
        self._catching_up = True  # reading the stream tail after a (re)sync, without blocking
        self._live_since = float("inf")  # batches sent before this are catch-up: no lag sample
        self._run_id: str | None = None
        self._pending: deque[DeltaRecord] = deque()
        self._pending_hashes = 0
        self._removals: list[tuple[str, float]] = []
        self._tombstones: dict[str, float] = {}  # pod key -> removed at (wall clock)
        self._pod_models: dict[str, str] = {}
        self._seq = 0
        self._publish_backoff = Backoff(settings.backoff_initial, settings.backoff_max)
        self._snapshot_now = asyncio.Event()
        self._followup_at: float | None = None

    # -- pods ------------------------------------------------------------------------------------
    def on_pods(self, pod_models: dict[str, str]) -> None:
        """The pod snapshot changed (pod key -> model of every known pod). Pods that left are
        tombstoned and their removal is published; the router has already dropped their entries."""
        now = self._clock()
        for key in self._pod_models.keys() - pod_models.keys():
            self._tombstones[key] = now
            self._removals.append((key, now))
            self._wake.set()
        for key in pod_models.keys() & self._tombstones.keys():
            del self._tombstones[key]  # back again: its new deltas are newer than the tombstone anyway
        self._pod_models = dict(pod_models)

    # -- publishing ------------------------------------------------------------------------------
    def collect(self) -> None:
        """Move the index's new additions to the outgoing queue, oldest dropped past the bound."""
        for a in self.index.drain_additions():
            self._pending.append(DeltaRecord(a.pod_key, self._pod_models.get(a.pod_key, ""), a.timestamp, a.hashes))
            self._pending_hashes += len(a.hashes)
        dropped = 0
        while self._pending_hashes > self.settings.max_pending_hashes and len(self._pending) > 1:
            old = self._pending.popleft()
            self._pending_hashes -= len(old.hashes)
            dropped += 1
        if dropped:
            self.metrics.dropped("backlog", dropped)
        self.state.pending_deltas = len(self._pending)

    def _messages(self) -> list[tuple[bytes, list[DeltaRecord], list[tuple[str, float]]]]:
        """Everything queued, as DeltaBatch payloads of at most `max_message_bytes` each (a delta
        too long for the room left is split: each part is a valid "pod holds these blocks")."""
        limit = self.settings.max_message_bytes
        base = 64  # replica id, time, seq
        out: list[tuple[bytes, list[DeltaRecord], list[tuple[str, float]]]] = []
        removals, self._removals = self._removals, []
        batch: list[DeltaRecord] = []
        size = base + sum(24 + len(k) for k, _ in removals)
        now = self._clock()

        def emit() -> None:
            nonlocal batch, removals, size
            self._seq += 1
            out.append((encode_batch(self.replica_id, self._seq, now, batch, removals), batch, removals))
            batch, removals, size = [], [], base

        while self._pending:
            rec: DeltaRecord | None = self._pending.popleft()
            self._pending_hashes -= len(rec.hashes)
            while rec is not None:
                need = rec.encoded_size()
                if size + need <= limit:
                    batch.append(rec)
                    size += need
                    rec = None
                    continue
                room = (limit - size - (need - 8 * len(rec.hashes))) // 8  # hashes that still fit
                if room >= 16 or (not batch and not removals):
                    room = max(1, room)
                    batch.append(DeltaRecord(rec.pod_key, rec.model, rec.timestamp, rec.hashes[:room]))
                    rec = DeltaRecord(rec.pod_key, rec.model, rec.timestamp, rec.hashes[room:])
                emit()
        if batch or removals:
            emit()
        self.state.pending_deltas = 0
        return out

    async def flush(self) -> int:
        """Publish everything queued; returns the number of stream entries written. On a Redis error
        the unpublished deltas go back to the front of the queue and the error is raised."""
        self.collect()
        if not self._pending and not self._removals:
            return 0
        messages = self._messages()
        s = self.settings
        # One pipelined round trip for all of them (PipelinedRedis writes each call at once).
        results = await asyncio.gather(*(
            self.writer.call("XADD", self.layout.stream, "MAXLEN", "~", s.stream_maxlen, "*", STREAM_FIELD, payload)
            for payload, _, _ in messages), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        sent = len(messages) - len(failed)
        self.metrics.batches_sent.inc(sent)
        self.metrics.deltas_sent.inc(sum(len(recs) for (_, recs, _), r in zip(messages, results, strict=True)
                                         if not isinstance(r, BaseException)))
        if not failed:
            return sent
        # Back to the front, in order, so that the bound drops the oldest deltas, not these.
        requeue = [rec for (_, recs, _), r in zip(messages, results, strict=True) if isinstance(r, BaseException)
                   for rec in recs]
        self._pending.extendleft(reversed(requeue))
        self._pending_hashes += sum(len(rec.hashes) for rec in requeue)
        self._removals[:0] = [rm for (_, _, rms), r in zip(messages, results, strict=True)
                              if isinstance(r, BaseException) for rm in rms]
        self.collect()
        exc = failed[0]
        if isinstance(exc, REDIS_ERRORS):
            raise exc
        raise ConnectionError(f"XADD failed: {exc!r}")

    async def run_publisher(self) -> None:
        """Once something is queued, wait `flush_interval` (so the decisions of that window share one
        entry) and flush; after a failure, retry with backoff while deltas keep queueing."""
        interval = self.settings.flush_interval
        while True:
            await self._wake.wait()
            await asyncio.sleep(interval)
            self._wake.clear()  # additions from here on (after the drain) wake the next round
            try:
                await self.flush()
                self._publish_backoff.reset()
            except Exception as exc:
                self._errors("publish", exc)
                await asyncio.sleep(self._publish_backoff.next())
                self._wake.set()  # retry what is still queued

    # -- applying --------------------------------------------------------------------------------
    def apply_entry(self, fields: list[object]) -> int:
        """Apply one stream entry's fields; returns the deltas merged. Never raises on bad input."""
        payload = None
        for i in range(0, len(fields) - 1, 2):
            if fields[i] == STREAM_FIELD:
                payload = fields[i + 1]
                break
        if not isinstance(payload, bytes):
            self.metrics.dropped(FOREIGN)
            return 0
        now = self._clock()
        try:
            batch = decode_batch(payload, now=now, max_future=_MAX_FUTURE_S)
        except DecodeError as exc:
            self.metrics.dropped(exc.reason)
            return 0
        if batch.replica_id == self.replica_id:
            return 0
        if batch.invalid:
            self.metrics.dropped(INVALID, batch.invalid)
        for key, at in batch.removals:
            self._remove_pod(key, at)
        applied = self._merge(batch.deltas, now, "stream", observe_lag=batch.sent >= self._live_since)
        if applied:
            self.state.last_applied_wall = now
        return applied

    def _remove_pod(self, key: str, at: float) -> None:
        if self._tombstones.get(key, -1.0) < at:
            self._tombstones[key] = at
        self.index.remove_pod(key)

    def _merge(self, records: list[DeltaRecord], now: float, source: str, *, observe_lag: bool) -> int:
        cutoff = now - self.index.ttl_seconds
        applied = expired = removed = 0
        observe = self.metrics.lag.observe
        for rec in records:
            tomb = self._tombstones.get(rec.pod_key)
            if tomb is not None and rec.timestamp <= tomb:
                removed += 1
                continue
            if rec.timestamp < cutoff:
                expired += 1
                continue
            self.index.merge(rec.hashes, rec.pod_key, rec.timestamp, now)
            applied += 1
            if observe_lag:
                observe(max(0.0, now - rec.timestamp))
        if expired:
            self.metrics.dropped("expired", expired)
        if removed:
            self.metrics.dropped("removed_pod", removed)
        if applied:
            self.metrics.deltas_applied.labels(source).inc(applied)
        return applied

    async def _apply_reply(self, reply: object) -> int:
        """Apply an XREAD reply; returns the number of entries it held."""
        if not reply:
            return 0
        n = 0
        for _stream, entries in reply:  # type: ignore[union-attr]
            for entry_id, fields in entries:
                try:
                    self.apply_entry(fields if isinstance(fields, list) else [])
                except Exception:  # a bug must cost one entry, never the replica
                    log.exception("could not apply state sync stream entry %r", entry_id)
                    self.metrics.dropped(INVALID)
                self.last_id = entry_id.decode()
                n += 1
                if n % _APPLY_SLICE == 0:
                    await asyncio.sleep(0)  # a long catch-up must not stall routing
        return n

    async def run_reader(self) -> None:
        """XREAD BLOCK forever; resync (snapshots + tail) on start, after reconnecting when Redis
        lost our position, and when the stream was trimmed past it."""
        backoff = Backoff(self.settings.backoff_initial, self.settings.backoff_max)
        s = self.settings
        while True:
            try:
                if self._resync_reason is not None:
                    await self.resync(self._resync_reason)
                # Catching up, a read must not wait for new entries: an empty answer means "done".
                block = () if self._catching_up else ("BLOCK", s.block_ms)
                reply = await self.reader.call("XREAD", "COUNT", s.read_count, *block, "STREAMS",
                                               self.layout.stream, self.last_id or "0-0")
                self.state.connected = True
                backoff.reset()
                if await self._apply_reply(reply) >= s.read_count:
                    self._resync_reason = "behind"  # a full read: check we were not trimmed past
                elif self._catching_up:
                    self._caught_up()
            except Exception as exc:
                self.state.connected = False
                self._errors("read", exc)
                self._resync_reason = "reconnect"
                await asyncio.sleep(backoff.next())

    # -- catching up -----------------------------------------------------------------------------
    async def resync(self, reason: str) -> None:
        """Find out whether our stream position is still good; if not (or on first start), merge the
        other replicas' snapshots and continue from the oldest position they reflect."""
        info = await self.writer.call("INFO", "server")
        run_id = _info_field(info, "run_id")
        first = await self.writer.call("XRANGE", self.layout.stream, "-", "+", "COUNT", 1)
        first_id = stream_id(first[0][0]) if first else None  # type: ignore[index]
        cause = None
        if self.last_id is None:
            cause = "join"
        elif self._run_id is not None and run_id != self._run_id:
            cause = "redis_restart"
        elif first_id is None and self.last_id != "0-0":
            cause = "stream_lost"
        elif first_id is not None and first_id > stream_id(self.last_id) and self.last_id != "0-0":
            cause = "gap"  # the entry we read last is gone: the stream was trimmed past us
        restarted = self._run_id is not None and run_id != self._run_id
        self._run_id = run_id
        if cause is not None:
            self.state.synced = False
            self.metrics.resyncs.labels(cause).inc()
            if cause != "join":
                log.warning("state sync position lost (%s, found on %s); catching up from snapshots and the "
                            "stream tail", cause, reason)
            start = await self.load_snapshots()
            self.last_id = start or "0-0"
            if first_id is not None and start is not None and stream_id(start) < first_id and cause == "join":
                # The oldest snapshot predates the stream's tail: the entries in between are lost
                # to us, but newer snapshots cover most of them.
                self.metrics.resyncs.labels("gap").inc()
            if cause != "join":
                # Replicas reconnecting after us rewrite their snapshots: merge them once more later.
                self._followup_at = time.monotonic() + self.settings.snapshot_interval * 1.5
        if restarted:
            self._snapshot_now.set()  # Redis lost everything: make our state available again now
        self._resync_reason = None
        self._catching_up = True

    def _caught_up(self) -> None:
        """The stream tail is applied: from now on deltas arrive live."""
        self._catching_up = False
        self._live_since = self._clock()
        self.state.synced = True
        self.synced.set()

    async def load_snapshots(self) -> str | None:
        """Merge every registered, unexpired snapshot of the other replicas; returns the oldest stream
        position among them (None when there are none)."""
        now = self._clock()
        ttl_ms = int(self.settings.snapshot_ttl * 1000)
        ids = await self.bulk.call("ZRANGEBYSCORE", self.layout.snapshots, int(now * 1000) - ttl_ms, "+inf")
        others = [i.decode() for i in ids or [] if i.decode() != self.replica_id]  # type: ignore[union-attr]
        if not others:
            return None
        payloads = await asyncio.gather(*(self.bulk.call("GET", self.layout.snapshot(r)) for r in others))
        positions: list[str] = []
        for replica, payload in zip(others, payloads, strict=True):
            if not isinstance(payload, bytes):
                continue  # expired between the two reads
            try:
                snap = decode_snapshot(payload, now=now, max_future=_MAX_FUTURE_S)
            except DecodeError as exc:
                log.warning("state sync snapshot of replica %s unusable (%s)", replica, exc)
                self.metrics.dropped(exc.reason)
                continue
            if snap.invalid:
                self.metrics.dropped(INVALID, snap.invalid)
            for i in range(0, len(snap.entries), 256):
                self._merge(snap.entries[i:i + 256], now, "snapshot", observe_lag=False)
                await asyncio.sleep(0)
            positions.append(snap.stream_id)
            self.metrics.snapshots_loaded.inc()
        return min(positions, key=stream_id) if positions else None

    # -- snapshots -------------------------------------------------------------------------------
    async def write_snapshot(self) -> int:
        """Write this replica's compacted snapshot; returns its size in bytes."""
        now = self._clock()
        entries = self.index.entries(now)
        payload = encode_snapshot(self.replica_id, now, self.last_id or "0-0", entries, self._pod_models)
        ttl_ms = int(self.settings.snapshot_ttl * 1000)
        now_ms = int(now * 1000)
        await asyncio.gather(
            self.bulk.call("SET", self.layout.snapshot(self.replica_id), payload, "PX", ttl_ms),
            self.bulk.call("ZADD", self.layout.snapshots, now_ms, self.replica_id),
            self.bulk.call("ZREMRANGEBYSCORE", self.layout.snapshots, "-inf", now_ms - ttl_ms),
            self.bulk.call("PEXPIRE", self.layout.snapshots, ttl_ms))
        self.metrics.snapshot_bytes.set(len(payload))
        self.metrics.snapshot_entries.set(sum(len(h) for h, _ in entries.values()))
        return len(payload)

    async def run_snapshots(self) -> None:
        """Write a snapshot every `snapshot_interval` (±10%), at once after Redis lost its data; merge
        the others' once more after a gap; forget old tombstones."""
        interval = self.settings.snapshot_interval
        while True:
            delay = interval * random.uniform(0.9, 1.1)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._snapshot_now.wait(), delay)
            self._snapshot_now.clear()
            self._forget_tombstones()
            if not self.state.synced:
                continue
            try:
                if self._followup_at is not None and time.monotonic() >= self._followup_at:
                    self._followup_at = None
                    self.metrics.resyncs.labels("followup").inc()
                    await self.load_snapshots()
                await self.write_snapshot()
            except Exception as exc:
                self._errors("snapshot", exc)

    def _forget_tombstones(self) -> None:
        cutoff = self._clock() - self.index.ttl_seconds
        for key in [k for k, at in self._tombstones.items() if at < cutoff]:
            del self._tombstones[key]

    async def close(self) -> None:
        """Publish what is still queued (best effort, bounded by the writer's timeout)."""
        try:
            await self.flush()
        except REDIS_ERRORS as exc:
            log.info("last prefix-index deltas not published on stop (%s)", exc)


def _info_field(info: object, name: str) -> str | None:
    """A field of an INFO reply."""
    if not isinstance(info, bytes):
        return None
    prefix = name.encode() + b":"
    for line in info.split(b"\r\n"):
        if line.startswith(prefix):
            return line[len(prefix):].decode()
    return None
