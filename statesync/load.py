"""In-flight load shared between replicas: every `interval` (100 ms, the reference's period) each
replica writes its LoadReport into one Redis hash (field = its replica id) and reads everyone's
back in the same command (a Lua script: HSET + PEXPIRE + HGETALL on one key), then hands the sum
of the others' fresh reports to its LoadTracker, replacing the previous remote part wholesale.

A report counts as fresh while its `seq` keeps changing: staleness is measured on this replica's
own monotonic clock, so clock skew between machines cannot drop (or keep) a replica. A report
that has not changed for `stale_after` (1 s) is ignored; one that has not changed for
`forget_after` is deleted from the hash (a replica that died without saying goodbye). If Redis
cannot be read for `stale_after`, the remote part is dropped: routing falls back to local counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from extproc_router.resp import PipelinedRedis
from routing.load import LoadTracker
from statesync.codec import DecodeError, decode_load, encode_load
from statesync.keys import KeyLayout
from statesync.metrics import StateSyncMetrics, SyncState
from statesync.prefix import REDIS_ERRORS, ErrorLog

_HASH_TTL_MS = 10_000  # the whole hash vanishes this long after the last replica stops writing
# One command, one round trip and one syscall each way (three pipelined commands cost twice the CPU).
_EXCHANGE_SCRIPT = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return redis.call('HGETALL', KEYS[1])
"""


class LoadSync:
    """Publishes this replica's in-flight counts and feeds the others' into `load`."""

    def __init__(self, load: LoadTracker, *, replica_id: str, layout: KeyLayout, writer: PipelinedRedis,
                 metrics: StateSyncMetrics, state: SyncState, errors: ErrorLog, interval: float,
                 stale_after: float = 1.0, forget_after: float = 30.0, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.load = load
        self.replica_id = replica_id
        self.layout = layout
        self.writer = writer
        self.metrics = metrics
        self.state = state
        self._errors = errors
        self.interval = interval
        self.stale_after = stale_after
        self.forget_after = forget_after
        self._clock = clock
        self._mono = monotonic
        self._seq = 0
        self._seen: dict[str, tuple[int, float]] = {}  # replica -> (last seq, when it last changed)
        self._last_ok = monotonic()
        self.remote_replicas = 0

    def report(self) -> bytes:
        """This replica's LoadReport, now."""
        self._seq += 1
        inflight = self.load.snapshot()
        prefill = self.load.prefill_snapshot()
        queued = {k: self.load.local_queued_prefill(k) for k in prefill}
        return encode_load(self.replica_id, self._seq, self._clock(), inflight, prefill, queued)

    async def exchange(self) -> None:
        """One round: write ours, read all, update the tracker. Raises on Redis errors (after
        dropping the remote part if reads have failed for `stale_after`)."""
        key = self.layout.load
        try:
            fields = await self.writer.eval_script(_EXCHANGE_SCRIPT, [key],
                                                   [self.replica_id, self.report(), _HASH_TTL_MS])
        except REDIS_ERRORS:
            if self._mono() - self._last_ok > self.stale_after:
                self.load.set_remote({})
                self.remote_replicas = self.state.remote_replicas = 0
            raise
        self._last_ok = self._mono()
        self.merge(fields if isinstance(fields, list) else [])

    def merge(self, fields: list[object]) -> list[str]:
        """Sum the fresh reports of other replicas (HGETALL's flat field/value list) into the tracker;
        returns the replicas to forget."""
        now = self._mono()
        wall = self._clock()
        inflight: dict[str, int] = {}
        prefill: dict[str, int] = {}
        queued: dict[str, float] = {}
        fresh = 0
        forget: list[str] = []
        present: set[str] = set()
        for i in range(0, len(fields) - 1, 2):
            name, payload = fields[i], fields[i + 1]
            if not isinstance(name, bytes) or not isinstance(payload, bytes):
                continue
            replica = name.decode("utf-8", "replace")
            if replica == self.replica_id:
                continue
            present.add(replica)
            try:
                report = decode_load(payload)
            except DecodeError as exc:
                self.metrics.dropped(f"load_{exc.reason}")
                forget.append(replica)
                continue
            seen = self._seen.get(replica)
            if seen is None:
                # First sight: the report's own (another machine's) clock is all there is to date it.
                seen = self._seen[replica] = (report.seq, now - max(0.0, wall - report.timestamp))
            elif report.seq != seen[0]:
                seen = self._seen[replica] = (report.seq, now)
            changed = seen[1]
            if now - changed > self.forget_after:
                forget.append(replica)
                continue
            if now - changed > self.stale_after:
                continue
            fresh += 1
            for pod, line in report.pods.items():
                if line.inflight:
                    inflight[pod] = inflight.get(pod, 0) + line.inflight
                if line.prefill_tokens:
                    prefill[pod] = prefill.get(pod, 0) + line.prefill_tokens
                if line.queued_prefill_tokens:
                    queued[pod] = queued.get(pod, 0.0) + line.queued_prefill_tokens
        for gone in self._seen.keys() - present:
            del self._seen[gone]
        self.load.set_remote(inflight, prefill, queued)
        self.remote_replicas = self.state.remote_replicas = fresh
        if forget:
            self._forget(forget)
        return forget

    def _forget(self, replicas: list[str]) -> None:
        for r in replicas:
            self._seen.pop(r, None)
        task = asyncio.ensure_future(self.writer.call("HDEL", self.layout.load, *replicas))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # best effort: the next reader retries

    async def run(self) -> None:
        """`exchange` every `interval`, forever."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.exchange()
            except Exception as exc:
                self._errors("load", exc)

    async def close(self) -> None:
        """Remove our report, so the others stop counting our requests at once."""
        with contextlib.suppress(*REDIS_ERRORS):  # the others drop it within `stale_after` anyway
            await self.writer.call("HDEL", self.layout.load, self.replica_id)
