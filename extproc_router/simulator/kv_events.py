"""vLLM's KV-cache events: what the simulated engine records and how a batch of them is encoded.

The engine (`simulator.batching`, `simulator.kv_cache`) records an event whenever its prefix cache
changes, and `simulator.kv_publisher` sends each engine step's events as one batch. The wire
format is vLLM's (``vllm/distributed/kv_events.py``), so any subscriber of vLLM's events can
follow a simulated pod:

* a batch is a msgpack array ``[ts, events, data_parallel_rank]``: ``ts`` the wall-clock time in
  seconds (float), ``events`` the step's events in order, ``data_parallel_rank`` 0;
* ``BlockStored``: full blocks of ``block_size`` tokens entered the cache. ``block_hashes`` are
  the chained hashes of consecutive blocks (unsigned 64-bit integers, vLLM's default
  ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``), ``parent_block_hash`` the hash of the block just
  before the first one (None at the start of a prompt), ``token_ids`` the tokens of those blocks,
  ``block_size``; ``lora_id`` and ``lora_name`` the LoRA adapter's id and name for an adapter's
  blocks (None for the base model's), ``medium`` is ``"GPU"``;
* ``BlockRemoved``: cached blocks were evicted (``block_hashes``, ``medium``);
* ``AllBlocksCleared``: the whole prefix cache was dropped (``POST /sim/reset``, and once at start).

Two layouts of an event, chosen with `KVEventsConfig.format`:

* ``map`` (vLLM's current one, since vllm-project/vllm#42892): a msgpack map whose ``"type"`` key
  holds the tag, then the fields by name. A real vLLM single-group full-attention engine also
  sends ``extra_keys`` (one None per block), ``group_idx`` 0 and ``kv_cache_spec_kind``
  ``"full_attention"`` on stores and ``group_idx`` on removals; so does the simulator.
* ``array`` (earlier releases): a msgpack array, the tag first, then the fields in declaration
  order: ``["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id,
  medium, lora_name]``, ``["BlockRemoved", block_hashes, medium]``, ``["AllBlocksCleared"]``.
  Decoders of any array-era release read these (msgspec ignores trailing fields it does not know).

This module imports no ZeroMQ; msgspec (vLLM's own msgpack library) is imported on first encode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from extproc_router.simulator.config import KVEventsFormat

__all__ = ["ALL_BLOCKS_CLEARED", "BLOCK_REMOVED", "BLOCK_STORED", "MEDIUM_GPU", "KVEventRecorder", "encode_batch"]

BLOCK_STORED = "BlockStored"
BLOCK_REMOVED = "BlockRemoved"
ALL_BLOCKS_CLEARED = "AllBlocksCleared"
MEDIUM_GPU = "GPU"
"""vLLM's ``MEDIUM_GPU``: the tier the simulated cache stands for."""

Event = tuple[Any, ...]
"""``(BLOCK_STORED, hashes, parent, token_ids, block_size, lora_id, lora_name)``, ``(BLOCK_REMOVED, hashes)``,
``(ALL_BLOCKS_CLEARED,)``."""


class KVEventRecorder:
    """Collects the cache's events between two engine steps; `take` hands them over in order."""

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending: list[Event] = []

    def stored(
        self,
        block_hashes: list[int],
        parent: int | None,
        token_ids: list[int],
        block_size: int,
        *,
        lora_id: int | None = None,
        lora_name: str | None = None,
    ) -> None:
        """Consecutive full blocks entered the cache; ``parent`` is the hash of the block before the first.
        ``lora_id`` / ``lora_name``: the LoRA adapter whose request computed them (None: the base model)."""
        self.pending.append((BLOCK_STORED, block_hashes, parent, token_ids, block_size, lora_id, lora_name))

    def removed(self, block_hashes: list[int]) -> None:
        """Cached blocks were evicted."""
        self.pending.append((BLOCK_REMOVED, block_hashes))

    def cleared(self) -> None:
        """Every cached block was dropped."""
        self.pending.append((ALL_BLOCKS_CLEARED,))

    def take(self) -> list[Event]:
        """The events recorded since the last call, oldest first."""
        events, self.pending = self.pending, []
        return events


def _as_map(event: Event) -> dict[str, Any]:
    kind = event[0]
    if kind == BLOCK_STORED:
        _, hashes, parent, tokens, block_size, lora_id, lora_name = event
        return {
            "type": BLOCK_STORED,
            "block_hashes": hashes,
            "parent_block_hash": parent,
            "token_ids": tokens,
            "block_size": block_size,
            "lora_id": lora_id,
            "medium": MEDIUM_GPU,
            "lora_name": lora_name,
            "extra_keys": [None] * len(hashes),
            "group_idx": 0,
            "kv_cache_spec_kind": "full_attention",
        }
    if kind == BLOCK_REMOVED:
        return {"type": BLOCK_REMOVED, "block_hashes": event[1], "medium": MEDIUM_GPU, "group_idx": 0}
    return {"type": ALL_BLOCKS_CLEARED}


def _as_array(event: Event) -> list[Any]:
    kind = event[0]
    if kind == BLOCK_STORED:
        _, hashes, parent, tokens, block_size, lora_id, lora_name = event
        return [BLOCK_STORED, hashes, parent, tokens, block_size, lora_id, MEDIUM_GPU, lora_name]
    if kind == BLOCK_REMOVED:
        return [BLOCK_REMOVED, event[1], MEDIUM_GPU]
    return [ALL_BLOCKS_CLEARED]


_encoder: Any = None


def encode_batch(
    ts: float, events: Sequence[Event], format: KVEventsFormat = "map", data_parallel_rank: int = 0
) -> bytes:
    """The msgpack payload of one batch: ``[ts, [event, ...], data_parallel_rank]``."""
    global _encoder
    if _encoder is None:
        import msgspec

        _encoder = msgspec.msgpack.Encoder()
    layout = _as_map if format == "map" else _as_array
    return _encoder.encode([float(ts), [layout(e) for e in events], data_parallel_rank])
