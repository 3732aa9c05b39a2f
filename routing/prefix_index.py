"""The prefix index: which pod was last sent which prompt block, and when.

One entry per (block hash, pod) pair, bounded in count (least recently used evicted first) and
in age (a TTL). It is routing history, not engine truth: a pod is assumed to hold a block because
the router sent it a prompt containing it.

Layout, chosen for memory (a `dict` with int keys alone costs ~110 bytes per entry, before any
pod or time is stored): numpy arrays form a two-choice bucketed hash table, 8 slots per bucket.
An entry's key is its block hash XOR a per-pod salt, so one 64-bit compare checks block and pod
at once and a whole chain is looked up for several pods in a handful of vectorised operations.
A key lives in one of two buckets (picked by its low and high 32 bits); insertion takes the
emptier one, which keeps overflow rare at the 70% load the table is sized for. A free slot holds
key 0, so one gather of a key's two buckets answers both "where is it" and "where is room".
Deleting is clearing a slot: no tombstones, no rehashing, ever. Least-recently-used order is an
append-only log of slot numbers (a slot's newest record is the live one, older ones are skipped),
compacted when full: O(1) amortised per entry.

Memory: 43 bytes per entry at 1M entries (table at 70% load plus the log; tracemalloc in
`bench/decision_latency.py`), whether a block is held by one pod or by many.

The same index serves `prefix-cache` and the later `pd` strategy, and feeds statesync: `add`
records local additions for `drain_additions`; `merge` applies a remote replica's "pod P holds
hashes H as of time T" without recording it again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

_SLOTS = 8  # slots per bucket: one 64-byte cache line of keys
_LOAD = 0.7  # load factor at full capacity; at 0.8 ~5% of inserts found both buckets full
_EMPTY = 0xFFFF  # pod id of a free slot
_MAX_PODS = 0xFFFF  # pod ids 0.._MAX_PODS-1
_LOW32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
_SHIFT56 = np.uint64(56)
_BYTE_SUM = np.uint64(0x0101010101010101)
_SWEEP_INTERVAL = 1.0  # seconds between TTL sweeps piggybacked on `add` (the TTL is minutes)
_SWEEP_BUDGET = 8192  # log records one piggybacked sweep looks at; a backlog is caught up over a few
_LIVE_BUCKETS = 30  # time buckets per pod of the live-entry counts (`live_blocks`)


def _salt(pod_id: int) -> np.uint64:
    """splitmix64 of the pod id: a well-mixed 64-bit value per pod, fixed for the id's lifetime."""
    z = (pod_id + 1) * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return np.uint64(z ^ (z >> 31))


@dataclass(frozen=True, slots=True)
class Addition:
    """The local additions of one `add` call, as `drain_additions` hands them to statesync."""

    pod_key: str
    hashes: np.ndarray  # uint64 block hashes, chain order
    timestamp: float  # wall-clock seconds


@dataclass(slots=True)
class IndexStats:
    """Counters since the index was created."""

    evicted_capacity: int = 0
    evicted_ttl: int = 0
    evicted_overflow: int = 0  # both buckets of a new key full: the oldest of their entries made room
    removed_pod: int = 0
    additions_dropped: int = 0  # additions not drained in time (statesync stalled)


class PrefixIndex:
    """(block hash, pod) -> last access; bounded by `capacity` entries and `ttl_seconds` of age.

    Timestamps are wall-clock seconds (`time.time()`), so that replicas can exchange them. Not
    thread safe: a router process has one event loop, and routing never awaits.
    """

    def __init__(self, capacity: int = 200_000, ttl_seconds: float = 1200.0, *,
                 track_additions: bool = False, live_horizon: float = 300.0) -> None:
        if capacity < 1:
            raise ValueError("prefix index capacity must be at least 1")
        if ttl_seconds <= 0:
            raise ValueError("prefix index TTL must be positive")
        self.capacity = capacity
        self.ttl_seconds = ttl_seconds
        self.stats = IndexStats()
        nb = max(2, math.ceil(capacity / (_SLOTS * _LOAD)))
        self._nb = np.uint64(nb)
        size = nb * _SLOTS
        self._keys = np.zeros(size, dtype=np.uint64)  # 0 = free; a real key of 0 (p = 2**-64) is never stored
        self._pods = np.full(size, _EMPTY, dtype=np.uint16)
        self._ts = np.zeros(size, dtype=np.float64)
        self._keys2d = self._keys.reshape(nb, _SLOTS)
        self._ts2d = self._ts.reshape(nb, _SLOTS)
        # LRU log of slot numbers; `_rec[slot]` is the position of the slot's newest record, -1
        # when free. Room for 3x capacity: after a compaction at most `capacity` records are live,
        # and one upsert appends at most 2x capacity.
        pos_type = np.int32 if 3 * capacity + 64 < 2**31 else np.int64
        self._log = np.zeros(3 * capacity + 64, dtype=np.int32 if size < 2**31 else np.int64)
        self._rec = np.full(size, -1, dtype=pos_type)
        self._head = 0
        self._tail = 0
        self._live = 0
        self._last_sweep = -math.inf
        self._pod_ids: dict[str, int] = {}
        self._salts: dict[int, np.uint64] = {}
        self._free_ids: list[int] = []
        self._next_id = 0
        self._cand_cache: dict[tuple[str, ...], tuple[list[str], np.ndarray]] = {}
        # Capacity eviction frees up to this many entries beyond the need: small requests then pay
        # for one pass over the log every few requests, not on every one. Kept small because the
        # cost is per entry (~0.1 us of random writes) and lands on one request.
        self._evict_slack = min(capacity >> 6, 256)
        self._track = track_additions
        self._additions: list[Addition] = []
        self._pending = 0
        # Live-entry counts: per pod, entries by the time bucket of their last access, over a ring of
        # `_LIVE_BUCKETS` buckets spanning `live_horizon` seconds. Kept exact as entries are
        # inserted, refreshed and freed (a count moves with its entry), so `live_blocks` - how
        # much of what each pod was sent lately it would still have to hold - costs O(pods), not a
        # scan of the table. A bucket's epoch says which bucket-width interval its count is for.
        self.live_horizon = live_horizon if live_horizon > 0 else 300.0
        self._bw = self.live_horizon / _LIVE_BUCKETS
        self._bk_count = np.zeros((16, _LIVE_BUCKETS), dtype=np.int64)
        self._bk_epoch = np.full((16, _LIVE_BUCKETS), -1, dtype=np.int64)
        # Called when an addition is recorded while none were waiting: statesync's publisher sleeps
        # until then instead of polling every few milliseconds (2.5% of a core when idle).
        self.on_additions: Callable[[], None] | None = None

    # -- public API --------------------------------------------------------------------------
    def __len__(self) -> int:
        """Live (block, pod) entries; expired ones not yet swept included."""
        return self._live

    @property
    def pod_keys(self) -> list[str]:
        """Pods the index has entries (or had entries) for and still tracks."""
        return list(self._pod_ids)

    def add(self, hashes: np.ndarray | Iterable[int], pod_key: str, now: float) -> int:
        """Record that `pod_key` was sent the blocks `hashes` (chain order) at `now`.

        Refreshes existing entries, inserts the others (evicting the least recently used when
        full) and returns how many were new. At most `capacity` leading blocks are kept.
        """
        h = self._as_hashes(hashes)
        if len(h) == 0:
            return 0
        if now - self._last_sweep >= _SWEEP_INTERVAL:
            self._last_sweep = now
            self._sweep(now, _SWEEP_BUDGET)
        added = self._upsert(h, self._pod_id(pod_key), now, newer_only=False)
        if self._track:
            self._record_addition(Addition(pod_key, h, now))
        return added

    def merge(self, hashes: np.ndarray | Iterable[int], pod_key: str, timestamp: float,
              now: float | None = None) -> int:
        """Apply a remote replica's "pod holds these hashes as of `timestamp`": per entry the newer
        timestamp wins, and nothing is recorded as a local addition. A delta already past the TTL
        at `now` is ignored. Returns how many entries were new."""
        h = self._as_hashes(hashes)
        if len(h) == 0 or (now is not None and timestamp < now - self.ttl_seconds):
            return 0
        return self._upsert(h, self._pod_id(pod_key), timestamp, newer_only=True)

    def match(self, hashes: np.ndarray, pod_keys: Iterable[str], now: float | None = None) -> dict[str, int]:
        """Per pod of `pod_keys`, how many leading blocks of the chain `hashes` it holds; pods
        holding none are left out. Entries older than the TTL at `now` do not count."""
        n = len(hashes)
        if n == 0 or self._live == 0:
            return {}
        names, salts = self._candidates(tuple(pod_keys))
        if not names:
            return {}
        cutoff = -math.inf if now is None else now - self.ttl_seconds
        # Stage 1, the first block for every candidate: usually one or two pods hold a given
        # prefix, and stage 2 looks up the rest of the chain for those alone.
        first = self._present(hashes[:1] ^ salts, cutoff)
        if not first.any():
            return {}
        idx = np.flatnonzero(first)
        if n == 1:
            return {names[i]: 1 for i in idx}
        keys = (hashes[1:, None] ^ salts[idx][None, :]).ravel()
        present = self._present(keys, cutoff).reshape(n - 1, len(idx))
        runs = np.where(present.all(axis=0), n - 1, present.argmin(axis=0)) + 1
        return {names[i]: int(r) for i, r in zip(idx, runs.tolist(), strict=True)}

    def remove_pod(self, pod_key: str) -> int:
        """Forget every entry of `pod_key` (the pod left the snapshot). Returns how many."""
        pid = self._pod_ids.pop(pod_key, None)
        if pid is None:
            return 0
        mask = self._pods == pid
        n = int(np.count_nonzero(mask))
        self._keys[mask] = 0
        self._pods[mask] = _EMPTY
        self._rec[mask] = -1
        self._live -= n
        self.stats.removed_pod += n
        del self._salts[pid]
        self._bk_count[pid] = 0
        self._bk_epoch[pid] = -1
        self._free_ids.append(pid)
        self._cand_cache.clear()
        return n

    def clear(self) -> int:
        """Drop every entry (pods keep their ids); returns how many were live."""
        n = self._live
        self._keys[:] = 0
        self._pods[:] = _EMPTY
        self._rec[:] = -1
        self._head = self._tail = 0
        self._live = 0
        self._additions, self._pending = [], 0
        self._bk_count[:] = 0
        self._bk_epoch[:] = -1
        return n

    def live_blocks(self, now: float) -> dict[str, int]:
        """Per pod, entries last touched within `live_horizon` before `now` (to one bucket's width,
        horizon / 30): the blocks a pod was sent lately and would still have to hold."""
        if not self._live:
            return {}
        lo = math.floor((now - self.live_horizon) / self._bw) + 1
        counts = np.where(self._bk_epoch >= lo, self._bk_count, 0).sum(axis=1)
        return {k: int(counts[i]) for k, i in self._pod_ids.items()}

    def retain_pods(self, keep: set[str]) -> int:
        """Remove every pod not in `keep`; returns the number of entries removed."""
        return sum(self.remove_pod(k) for k in [k for k in self._pod_ids if k not in keep])

    def evict_expired(self, now: float) -> int:
        """Drop entries last touched more than the TTL before `now`; returns how many."""
        return self._sweep(now, None)

    def drain_additions(self) -> list[Addition]:
        """Local additions since the last drain (only with `track_additions`), oldest first."""
        out, self._additions, self._pending = self._additions, [], 0
        return out

    @property
    def track_additions(self) -> bool:
        """Whether `add` records additions for `drain_additions`. Statesync turns it on for the index
        the strategies already own; turning it off discards what was not drained."""
        return self._track

    @track_additions.setter
    def track_additions(self, on: bool) -> None:
        self._track = on
        if not on:
            self.drain_additions()

    def entries(self, now: float | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Every live entry, per pod: (block hashes, wall-clock timestamps), in no particular order;
        entries past the TTL at `now` are left out. O(table size): for statesync's periodic
        snapshot, not the request path."""
        occupied = self._pods != _EMPTY
        if now is not None:
            occupied &= self._ts >= now - self.ttl_seconds
        slots = np.flatnonzero(occupied)
        pods = self._pods[slots]
        order = np.argsort(pods, kind="stable")  # a radix sort on uint16: one pass, not a mask per pod
        slots, pods = slots[order], pods[order]
        ids = np.fromiter(self._pod_ids.values(), dtype=np.uint16, count=len(self._pod_ids))
        lo, hi = np.searchsorted(pods, ids, "left"), np.searchsorted(pods, ids, "right")
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for key, pid, a, b in zip(self._pod_ids, ids.tolist(), lo.tolist(), hi.tolist(), strict=True):
            if b > a:
                mine = slots[a:b]
                out[key] = (self._keys[mine] ^ self._salts[pid], self._ts[mine])
        return out

    def pod_entry_counts(self) -> dict[str, int]:
        """Entries per pod. O(table size): for metrics scrapes, not the request path."""
        counts = np.bincount(self._pods, minlength=_EMPTY + 1)
        return {k: int(counts[i]) for k, i in self._pod_ids.items()}

    def nbytes(self) -> int:
        """Bytes held by the table and the log."""
        return sum(a.nbytes for a in (self._keys, self._pods, self._ts, self._rec, self._log))

    # -- internals -----------------------------------------------------------------------------
    def _as_hashes(self, hashes: np.ndarray | Iterable[int]) -> np.ndarray:
        h = hashes if isinstance(hashes, np.ndarray) else np.fromiter(hashes, dtype=np.uint64)
        if h.dtype != np.uint64:
            h = h.astype(np.uint64)
        # The leading blocks are the valuable ones: a chain longer than the index holds is cut.
        return h[: self.capacity]

    def _candidates(self, pod_keys: tuple[str, ...]) -> tuple[list[str], np.ndarray]:
        """The known pods among `pod_keys` and their salts; a model's ready set rarely changes, so
        this is cached until a pod id is assigned or freed."""
        hit = self._cand_cache.get(pod_keys)
        if hit is None:
            names = [k for k in pod_keys if k in self._pod_ids]
            hit = (names, np.array([self._salts[self._pod_ids[k]] for k in names], dtype=np.uint64))
            if len(self._cand_cache) >= 256:
                self._cand_cache.clear()
            self._cand_cache[pod_keys] = hit
        return hit

    def _pod_id(self, pod_key: str) -> int:
        pid = self._pod_ids.get(pod_key)
        if pid is None:
            if self._free_ids:
                pid = self._free_ids.pop()
            elif self._next_id < _MAX_PODS:
                pid = self._next_id
                self._next_id += 1
            else:
                raise RuntimeError(f"prefix index: more than {_MAX_PODS} pods")
            self._pod_ids[pod_key] = pid
            self._salts[pid] = _salt(pid)
            if pid >= len(self._bk_count):
                grow = max(pid + 1, 2 * len(self._bk_count))
                self._bk_count = np.concatenate([self._bk_count, np.zeros((grow - len(self._bk_count), _LIVE_BUCKETS),
                                                                           dtype=np.int64)])
                self._bk_epoch = np.concatenate([self._bk_epoch, np.full((grow - len(self._bk_epoch), _LIVE_BUCKETS),
                                                                          -1, dtype=np.int64)])
            self._cand_cache.clear()
        return pid

    def _probe(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Slot of each key (-1 where absent), its two buckets (n x 2), and their keys (n x 16).

        Written for few numpy calls: at a few hundred keys their fixed cost, not the data,
        is the price (`take` rather than fancy indexing, flat indices rather than axis reductions).
        """
        n = len(keys)
        buckets = np.empty((n, 2), dtype=np.intp)
        np.remainder(keys & _LOW32, self._nb, out=buckets[:, 0], casting="unsafe")
        np.remainder(keys >> _SHIFT32, self._nb, out=buckets[:, 1], casting="unsafe")
        rows = self._keys2d.take(buckets, axis=0).reshape(n, 2 * _SLOTS)
        hit = np.flatnonzero(rows == keys[:, None])
        slots = np.full(n, -1, dtype=np.intp)
        # Flat position in `rows` = key * 16 + bucket choice * 8 + column.
        slots[hit >> 4] = buckets.ravel().take(hit >> 3) * _SLOTS + (hit & 7)
        return slots, buckets, rows

    def _present(self, keys: np.ndarray, cutoff: float) -> np.ndarray:
        slots = self._probe(keys)[0]
        found = slots >= 0
        if cutoff != -math.inf and found.any():
            found[found] = self._ts.take(slots[found]) >= cutoff
        return found

    def _upsert(self, hashes: np.ndarray, pid: int, ts: float, *, newer_only: bool) -> int:
        keys = hashes ^ self._salts[pid]
        if not keys.all():
            keys = keys[keys != 0]
        slots, buckets, rows = self._probe(keys)
        new = slots < 0
        if newer_only:
            touched = new.copy()
            touched[~new] = self._ts.take(slots[~new]) < ts
        else:
            touched = np.ones(len(keys), dtype=bool)
        refreshed = slots[~new & touched]
        if len(refreshed):
            self._live_sub(self._pods.take(refreshed), self._ts.take(refreshed))
            self._live_add(pid, ts, len(refreshed))
        self._ts[refreshed] = ts
        n_new = int(np.count_nonzero(new))
        if n_new:
            need = self._live + n_new - self.capacity
            if need > 0:
                # Log the refreshed entries first, so that this eviction cannot take them.
                self._append(refreshed[::-1])
                self._evict_lru(min(need + self._evict_slack, self._live - len(refreshed)))
            slots[new], twins = self._place(keys[new], buckets[new], rows[new], pid, ts)
            n_new -= twins
        # Deepest blocks first: the LRU end of the log then trims a chain from its tail rather
        # than cutting its start (which would make the whole chain unmatchable).
        self._append(slots[touched][::-1])
        return n_new

    def _place(self, keys: np.ndarray, buckets: np.ndarray, rows: np.ndarray, pid: int,
               ts: float) -> tuple[np.ndarray, int]:
        """Store keys known to be absent; `rows` are their buckets' keys as probed. Returns their
        slots and how many were repeats: a key repeated in `keys` is stored once (its twins get
        the same slot)."""
        out = np.empty(len(keys), dtype=np.intp)
        twins = 0
        todo = np.arange(len(keys))
        while len(todo):
            n = len(todo)
            free = rows == 0
            # Free slots per bucket: the 8 flags of a bucket are 8 bytes of 0/1, and one multiply
            # sums the bytes of a uint64 into its top byte.
            nfree = (free.view(np.uint64) * _BYTE_SUM) >> _SHIFT56  # n x 2
            use2 = (nfree[:, 1] > nfree[:, 0]).astype(np.intp)
            pick = np.arange(n) * 2 + use2  # row of the chosen bucket in the n*2 x 8 view
            col = free.reshape(2 * n, _SLOTS).argmax(axis=1).take(pick)
            full = nfree.take(pick) == 0
            any_full = bool(full.any())
            if any_full:
                # Both buckets full (the emptier one is): the oldest of their 16 entries gives
                # way. Bends LRU locally, rarely.
                oldest = self._ts2d.take(buckets[full], axis=0).reshape(-1, 2 * _SLOTS).argmin(axis=1)
                use2[full] = oldest >> 3
                col[full] = oldest & 7
                pick = np.arange(n) * 2 + use2
            slot = buckets.ravel().take(pick) * _SLOTS + col
            # Keys of this batch that picked the same slot: the first one wins, the others retry.
            order = np.argsort(slot, kind="stable")
            ss = slot.take(order)
            win = np.ones(n, dtype=bool)
            win[order[1:]] = ss[1:] != ss[:-1]
            if any_full:
                self.stats.evicted_overflow += self._free(slot[win & full])
            placed = slot[win]
            self._keys[placed] = keys[win]
            self._pods[placed] = pid
            self._ts[placed] = ts
            self._live += len(placed)
            self._live_add(pid, ts, len(placed))
            out[todo[win]] = placed
            if win.all():
                break
            lose = ~win
            todo, keys, buckets, slot = todo[lose], keys[lose], buckets[lose], slot[lose]
            # A repeated key always picks its twin's slot, where it now finds itself stored.
            twin = self._keys.take(slot) == keys
            out[todo[twin]] = slot[twin]
            twins += int(np.count_nonzero(twin))
            keep = ~twin
            todo, keys, buckets = todo[keep], keys[keep], buckets[keep]
            rows = self._keys2d.take(buckets, axis=0).reshape(len(todo), 2 * _SLOTS)
        return out, twins

    def _free(self, slots: np.ndarray) -> int:
        """Clear the occupied slots among `slots`; returns how many were occupied."""
        slots = slots[self._pods[slots] != _EMPTY]
        if len(slots):
            self._live_sub(self._pods.take(slots), self._ts.take(slots))
        self._keys[slots] = 0
        self._pods[slots] = _EMPTY
        self._rec[slots] = -1
        self._live -= len(slots)
        return len(slots)

    def _live_add(self, pid: int, ts: float, n: int) -> None:
        epoch = math.floor(ts / self._bw)
        b = epoch % _LIVE_BUCKETS
        have = int(self._bk_epoch[pid, b])
        if have == epoch:
            self._bk_count[pid, b] += n
        elif have < epoch:  # the bucket's last interval has left the ring: reuse it
            self._bk_epoch[pid, b] = epoch
            self._bk_count[pid, b] = n
        # else: `ts` is older than the ring (a late remote merge): not live, not counted

    def _live_sub(self, pids: np.ndarray, ts: np.ndarray) -> None:
        """Entries of `pids` last touched at `ts` leave their buckets (refreshed or freed)."""
        epochs = np.floor(ts / self._bw).astype(np.int64)
        flat = pids.astype(np.int64) * _LIVE_BUCKETS + epochs % _LIVE_BUCKETS
        counted = self._bk_epoch.ravel().take(flat) == epochs
        if counted.all():
            if len(flat) == 1 or (flat == flat[0]).all():  # the common case: one pod, one bucket
                self._bk_count.ravel()[flat[0]] -= len(flat)
                return
        else:
            flat = flat[counted]
        np.subtract.at(self._bk_count.ravel(), flat, 1)

    def _append(self, slots: np.ndarray) -> None:
        # A slot freed within the same upsert (bucket overflow) must not get a record.
        slots = slots[self._pods[slots] != _EMPTY]
        m = len(slots)
        if m == 0:
            return
        if self._tail + m > len(self._log):
            self._compact_log()
        t = self._tail
        self._log[t:t + m] = slots
        self._rec[slots] = np.arange(t, t + m, dtype=self._rec.dtype)
        self._tail = t + m

    def _compact_log(self) -> None:
        h, t = self._head, self._tail
        slots = self._log[h:t]
        live = slots[(self._rec[slots] == np.arange(h, t, dtype=self._rec.dtype)) & (self._pods[slots] != _EMPTY)]
        n = len(live)
        self._log[:n] = live
        self._rec[live] = np.arange(n, dtype=self._rec.dtype)
        self._head, self._tail = 0, n

    def _live_records(self, start: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Positions (relative to `start`) and slots of the live records in a log window."""
        slots = self._log[start:start + width]
        live = np.flatnonzero((self._rec[slots] == np.arange(start, start + len(slots), dtype=self._rec.dtype))
                              & (self._pods[slots] != _EMPTY))
        return live, slots[live]

    def _evict_lru(self, need: int) -> None:
        evicted = 0
        while evicted < need and self._head < self._tail:
            width = min(self._tail - self._head, max(64, 2 * (need - evicted)))
            pos, slots = self._live_records(self._head, width)
            take = need - evicted
            if len(slots) > take:
                evicted += self._free(slots[:take])
                self._head += int(pos[take - 1]) + 1
            else:
                evicted += self._free(slots)
                self._head += width
        self.stats.evicted_capacity += evicted

    def _sweep(self, now: float, budget: int | None) -> int:
        """Evict expired entries from the LRU end, looking at up to `budget` log records."""
        cutoff = now - self.ttl_seconds
        removed = 0
        seen = 0
        width = 16  # the common case is a fresh head: look at a few records only
        while self._head < self._tail and (budget is None or seen < budget):
            width = min(width, self._tail - self._head)
            if budget is not None:
                width = min(width, budget - seen)
            pos, slots = self._live_records(self._head, width)
            seen += width
            expired = self._ts[slots] < cutoff
            if expired.all():
                removed += self._free(slots)
                self._head += width
                width = min(2 * width, 4096)
                continue
            # The log is (nearly) in time order: stop at the first live entry still fresh.
            stop = int(np.argmin(expired))
            if stop:
                removed += self._free(slots[:stop])
            self._head += int(pos[stop])
            break
        self.stats.evicted_ttl += removed
        return removed

    def _record_addition(self, addition: Addition) -> None:
        if not self._additions and self.on_additions is not None:
            self.on_additions()
        self._additions.append(addition)
        self._pending += len(addition.hashes)
        # Bounded like the index itself: if nobody drains, the oldest additions go.
        while self._pending > self.capacity and len(self._additions) > 1:
            dropped = self._additions.pop(0)
            self._pending -= len(dropped.hashes)
            self.stats.additions_dropped += len(dropped.hashes)
