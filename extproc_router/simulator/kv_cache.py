"""A paged KV cache with automatic prefix caching, modelled on vLLM's block pool.

The cache is ``num_blocks`` blocks of ``block_size`` tokens. A block is *used* while at least
one running sequence references it (reference count > 0) and *free* otherwise. A free block that
holds a full prompt block keeps its chained hash and stays findable: it is *evictable*, and the
least recently freed evictable block is the first to be reused for new data. So:

* a new sequence reuses its longest cached prefix (consecutive block hashes from block 0),
  whether those blocks are used by other sequences or sitting evictable;
* blocks referenced by a running sequence are never evicted;
* a finished sequence's blocks are freed tail first, so under pressure the end of a prompt is
  evicted before its beginning, and a shared beginning survives longest (as in vLLM).

This module is pure bookkeeping (no asyncio, no timing); the scheduler in `simulator.batching`
decides when to call it. With a `recorder` attached (`simulator.kv_events.KVEventRecorder`), the
cache records vLLM's events for what it does itself: evictions (BlockRemoved, one event per
`allocate` call) and `reset` (AllBlocksCleared); the scheduler records the stores, which need
the blocks' tokens.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from extproc_router.simulator.kv_events import KVEventRecorder

__all__ = ["KVCache"]


class KVCache:
    """Block pool with reference counts, a hash index of cached blocks and an LRU of free ones."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._refs = [0] * num_blocks
        self._hash_of: list[int | None] = [None] * num_blocks
        self._by_hash: dict[int, int] = {}
        """Block id of every cached block hash, used or evictable."""
        self._evictable: OrderedDict[int, None] = OrderedDict()
        """Free blocks that still hold a cached block, least recently freed first."""
        self._empty: list[int] = list(range(num_blocks - 1, -1, -1))
        """Free blocks holding nothing worth keeping; taken before any evictable block."""
        self.evictions = 0
        """Cached blocks overwritten since the last reset."""
        self.recorder: KVEventRecorder | None = None
        """Where evictions and resets are recorded as KV events; None: nowhere."""

    # ----------------------------------------------------------------- state

    @property
    def num_free(self) -> int:
        """Blocks that can be allocated now (empty plus evictable)."""
        return len(self._empty) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks findable by hash (used or evictable)."""
        return len(self._by_hash)

    @property
    def usage(self) -> float:
        """Used blocks / all blocks: what vLLM reports as ``gpu_cache_usage_perc``."""
        return self.num_used / self.num_blocks

    def is_cached(self, block_hash: int) -> bool:
        """True when a block with this chained hash is in the cache."""
        return block_hash in self._by_hash

    # ----------------------------------------------------------------- operations

    def lookup(self, hashes: Sequence[int], max_blocks: int) -> list[int]:
        """Block ids of the longest cached prefix of ``hashes`` (at most ``max_blocks``); no side effect."""
        if not self.prefix_caching:
            return []
        found: list[int] = []
        by_hash = self._by_hash
        for block_hash in hashes[:max_blocks]:
            block = by_hash.get(block_hash)
            if block is None:
                break
            found.append(block)
        return found

    def can_allocate(self, num_new: int, reused: Iterable[int] = ()) -> bool:
        """Whether ``num_new`` fresh blocks fit after pinning the cached blocks ``reused``.

        Pinning an evictable block takes it out of the free pool, so it counts against the room.
        """
        pinned_from_free = sum(1 for block in reused if self._refs[block] == 0)
        return num_new <= self.num_free - pinned_from_free

    def acquire(self, blocks: Iterable[int]) -> None:
        """Add a reference to each of ``blocks`` (cache hits); an evictable block becomes used."""
        refs = self._refs
        for block in blocks:
            if refs[block] == 0:
                del self._evictable[block]
            refs[block] += 1

    def allocate(self, count: int) -> list[int]:
        """Take ``count`` free blocks (empty ones first, then the least recently freed cached ones).

        Raises RuntimeError when fewer are free: callers check `can_allocate` or `num_free` first.
        """
        if count > self.num_free:
            raise RuntimeError(f"cannot allocate {count} blocks, {self.num_free} free")
        blocks: list[int] = []
        evicted: list[int] | None = [] if self.recorder is not None else None
        for _ in range(count):
            if self._empty:
                block = self._empty.pop()
            else:
                block, _ = self._evictable.popitem(last=False)
                old_hash = self._hash_of[block]
                if old_hash is not None:
                    del self._by_hash[old_hash]
                    self._hash_of[block] = None
                    if evicted is not None:
                        evicted.append(old_hash)
                self.evictions += 1
            self._refs[block] = 1
            blocks.append(block)
        if evicted:
            assert self.recorder is not None
            self.recorder.removed(evicted)
        return blocks

    def register(self, block: int, block_hash: int) -> bool:
        """Record that used block ``block`` now holds the full prompt block with ``block_hash``.

        If another block already holds that hash (two sequences computed the same prefix at the
        same time), this one stays anonymous and is simply freed later. Returns whether the hash
        entered the cache (False as well without prefix caching).
        """
        if not self.prefix_caching or block_hash in self._by_hash or self._hash_of[block] is not None:
            return False
        self._by_hash[block_hash] = block
        self._hash_of[block] = block_hash
        return True

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference from each of a sequence's ``blocks`` (given in prompt order).

        Blocks are freed tail first so that a prompt's end is evicted before its beginning.
        """
        refs = self._refs
        for block in reversed(blocks):
            refs[block] -= 1
            if refs[block] == 0:
                if self._hash_of[block] is None:
                    self._empty.append(block)
                else:
                    self._evictable[block] = None

    def reset(self) -> None:
        """Forget every cached block. Used blocks stay allocated to their sequences, but anonymous."""
        for block in self._evictable:
            self._empty.append(block)
        self._evictable.clear()
        for block in self._by_hash.values():
            self._hash_of[block] = None
        self._by_hash.clear()
        self.evictions = 0
        if self.recorder is not None:
            self.recorder.cleared()
