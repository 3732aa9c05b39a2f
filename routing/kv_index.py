"""The precise prefix index: which KV-cache blocks each pod's engine holds, from its own events.

Engines (vLLM, the simulator) publish BlockStored / BlockRemoved / AllBlocksCleared events; the
subscriber (`extproc_router/kv_events.py`) decodes them and calls `store`, `remove` and `clear_pod`
here. Unlike the approximate `PrefixIndex` (what the router sent where), this is engine truth:
a block evicted by the engine stops attracting traffic as soon as its event is applied.

Keys are the router's own hashes, never the engine's. A BlockStored event carries the token ids of
its blocks, and they are re-hashed here exactly as a request's prompt is (`routing/block_hash.py`:
a chain seeded by the index's seed and the model, or the LoRA adapter, over 4-byte big-endian token
ids per block), so the router depends neither on the engine's hash function nor on its seed (vLLM
draws a random one per process unless PYTHONHASHSEED is fixed). The engine's hashes are kept per pod
only to translate a later BlockRemoved(engine hash) and the parent of a later BlockStored.

Structure (exact, per pod):

* per pod: engine block key -> router hash, and router hash -> how many engine blocks map to it
  (two engine blocks with the same tokens but another cache salt are one router block);
* for all pods: router hash -> bit mask of the pods holding it. A request's chain is matched in one
  pass over its blocks with one dict lookup per block (not per pod): the candidates' mask is
  narrowed block by block and a pod's match ends where its bit drops out.

A pod counts as precise (`is_precise`) once its subscriber has proven the publisher alive (a replay
answer or a first event); until then, and for pods that publish nothing, `prefix-cache` uses the
approximate index. (Blocks routed to a precise pod but not yet confirmed by its events are the
strategy's business: it reads them from the approximate index's last seconds, and `cleared_since`
tells it when a pod's cache was emptied after that.)

Not thread safe; the router process has one event loop, and nothing here awaits.
"""

from __future__ import annotations

import math
import sys
from array import array
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

import xxhash

from routing.block_hash import DEFAULT_HASH_SEED, chain_hashes
from routing.tokenizers import EngineTokenizer

MEDIUM_GPU = "GPU"
# Tokens per block of a pod that has not stored a block yet (a fresh engine): vLLM's default. The
# first BlockStored replaces it with the engine's own.
DEFAULT_ENGINE_BLOCK_SIZE = 16
_digest = xxhash.xxh64_digest
_BIG_ENDIAN = sys.byteorder == "big"


class MalformedEvent(ValueError):
    """An event whose fields contradict each other (token count, block size, token id range)."""


@dataclass(slots=True)
class PodEventCounts:
    """What the index did with one pod's events since it was tracked."""

    stored: int = 0  # blocks stored (new router blocks on the pod)
    removed: int = 0  # blocks removed
    cleared: int = 0  # AllBlocksCleared (and state drops by the subscriber)
    orphaned: int = 0  # blocks whose parent block is unknown (stored before the router subscribed)
    unknown_removed: int = 0  # removals of blocks the index never saw stored
    overflow: int = 0  # blocks dropped because the pod reached `max_blocks_per_pod`
    skipped: int = 0  # blocks of other KV-cache groups (hybrid models: only group 0 is indexed)


@dataclass(slots=True)
class _Pod:
    key: str
    model: str
    bit: int
    engine: dict[Hashable, int] = field(default_factory=dict)  # engine block key -> router hash
    refs: dict[int, int] = field(default_factory=dict)  # router hash -> engine blocks mapping to it
    block_size: int = DEFAULT_ENGINE_BLOCK_SIZE  # tokens per block, from the last BlockStored
    precise: bool = False
    counts: PodEventCounts = field(default_factory=PodEventCounts)


@dataclass(slots=True)
class PreciseMatch:
    """One request matched against the precise index: per precise candidate (leading blocks held,
    blocks hashed, tokens per block), and the prompt's length in engine tokens."""

    pods: tuple[str, ...]  # the candidates served by events, in the candidates' order
    runs: dict[str, tuple[int, int, int]]  # pod -> (leading blocks held, blocks hashed, tokens per block)
    tokens: float


class KvBlockIndex:
    """Exact per-pod block sets fed by KV-cache events; see the module docstring."""

    def __init__(self, *, seed: int = DEFAULT_HASH_SEED, max_blocks_per_pod: int = 1 << 20,
                 max_prefix_blocks: int = 1024) -> None:
        if max_blocks_per_pod < 1:
            raise ValueError("max_blocks_per_pod must be at least 1")
        self.seed = seed
        self.max_blocks_per_pod = max_blocks_per_pod
        self.max_prefix_blocks = max_prefix_blocks
        self._pods: dict[str, _Pod] = {}
        self._by_bit: dict[int, _Pod] = {}
        self._held: dict[int, int] = {}  # router hash -> bit mask of the pods holding it
        self._roots: dict[str, bytes] = {}  # chain root digest per model / adapter name
        self._tokenizers: dict[str, EngineTokenizer] = {}
        self._default_tokenizer: EngineTokenizer | None = None
        self._cleared_at: dict[str, float] = {}  # pod -> when its state was last dropped (wall clock)
        self.precise_count = 0  # pods currently precise: 0 keeps the request path free of any work

    # -- configuration -------------------------------------------------------------------------
    def set_tokenizers(self, per_model: dict[str, EngineTokenizer], default: EngineTokenizer | None = None) -> None:
        """The engine tokenizer of each model (`default` for the others; None: such models' pods stay
        approximate)."""
        self._tokenizers = dict(per_model)
        self._default_tokenizer = default

    def tokenizer_for(self, model: str) -> EngineTokenizer | None:
        return self._tokenizers.get(model, self._default_tokenizer)

    # -- pods --------------------------------------------------------------------------------
    def track_pod(self, pod_key: str, model: str) -> None:
        """Start indexing `pod_key` (serving `model`); a pod tracked for another model starts over."""
        pod = self._pods.get(pod_key)
        if pod is not None:
            if pod.model == model:
                return
            self.forget_pod(pod_key)
        bit = 0
        while bit in self._by_bit:
            bit += 1
        pod = _Pod(pod_key, model, bit)
        self._pods[pod_key] = pod
        self._by_bit[bit] = pod

    def forget_pod(self, pod_key: str) -> int:
        """Stop indexing `pod_key` (gone, unready, restarted): its blocks are dropped. Returns how many."""
        pod = self._pods.get(pod_key)
        if pod is None:
            return 0
        n = self._drop_blocks(pod)
        self.set_precise(pod_key, False)
        self._cleared_at.pop(pod_key, None)
        del self._pods[pod_key]
        del self._by_bit[pod.bit]
        return n

    def retain_pods(self, keep: Iterable[str]) -> int:
        """Forget every tracked pod not in `keep`; returns the blocks dropped."""
        keep = set(keep)
        return sum(self.forget_pod(k) for k in [k for k in self._pods if k not in keep])

    def set_precise(self, pod_key: str, precise: bool) -> None:
        """Whether `prefix-cache` trusts this pod's events (its subscriber is live and in sequence)."""
        pod = self._pods.get(pod_key)
        if pod is None or pod.precise == precise:
            return
        pod.precise = precise
        self.precise_count += 1 if precise else -1

    def is_precise(self, pod_key: str) -> bool:
        pod = self._pods.get(pod_key)
        return pod is not None and pod.precise

    @property
    def pod_keys(self) -> list[str]:
        return list(self._pods)

    def counts(self, pod_key: str) -> PodEventCounts | None:
        pod = self._pods.get(pod_key)
        return pod.counts if pod is not None else None

    def pod_blocks(self) -> dict[str, int]:
        """Router blocks held per tracked pod."""
        return {k: len(p.refs) for k, p in self._pods.items()}

    def __len__(self) -> int:
        """(block, pod) entries."""
        return sum(len(p.refs) for p in self._pods.values())

    # -- events ------------------------------------------------------------------------------
    def store(self, pod_key: str, engine_hashes: Sequence[Hashable], parent: Hashable | None,
              token_ids: Sequence[int], block_size: int, *, lora_name: str | None = None,
              lora_id: int | None = None, medium: str | None = None, group: int | None = None,
              extra_keys: Sequence[object] | None = None) -> int:
        """Apply BlockStored: `engine_hashes` (chain order) hold `token_ids`, `block_size` per block,
        after the block `parent` (None: at the start of a sequence). Returns the router blocks that
        are new on the pod. MalformedEvent when the fields disagree; an unknown parent stores nothing
        (the chain's start is not known, so no request could match these blocks)."""
        pod = self._pods.get(pod_key)
        n = len(engine_hashes)
        if pod is None or n == 0:
            return 0
        if group:
            pod.counts.skipped += n
            return 0
        if block_size < 1 or len(token_ids) != n * block_size:
            raise MalformedEvent(f"{len(token_ids)} token ids for {n} blocks of {block_size}")
        try:
            ids = array("I", token_ids)
        except (OverflowError, TypeError):
            raise MalformedEvent("token ids must be integers in 0..2**32-1") from None
        if not _BIG_ENDIAN:
            ids.byteswap()
        data = ids.tobytes()
        gpu = medium is None or medium == MEDIUM_GPU
        if parent is None:
            prev = self._root(_adapter_root(pod.model, lora_name, lora_id))
        else:
            up = pod.engine.get(parent if gpu else (medium, parent))
            if up is None:
                pod.counts.orphaned += n
                return 0
            prev = up.to_bytes(8, "big")
        pod.block_size = block_size
        engine, refs, held, bit = pod.engine, pod.refs, self._held, 1 << pod.bit
        room = self.max_blocks_per_pod - len(engine)
        seed = self.seed
        step = block_size * 4
        new = 0
        if extra_keys is not None and not any(e is not None for e in extra_keys):
            extra_keys = None  # vLLM sends one None per plain block
        keys: Iterable[Hashable] = engine_hashes if gpu else [(medium, eh) for eh in engine_hashes]
        get = engine.get
        for i, (key, start) in enumerate(zip(keys, range(0, n * step, step), strict=True)):
            if extra_keys is None:
                prev = _digest(prev + data[start:start + step], seed)
            else:
                chunk = data[start:start + step]
                if i < len(extra_keys) and extra_keys[i] is not None:
                    # Multimodal inputs, cache salts: blocks whose tokens alone do not identify them.
                    chunk += repr(extra_keys[i]).encode("utf-8", "backslashreplace")
                prev = _digest(prev + chunk, seed)
            rh = int.from_bytes(prev, "big")
            old = get(key)
            if old == rh:
                continue
            if old is None:
                if room <= 0:
                    pod.counts.overflow += n - i
                    break
                room -= 1
            else:
                self._unref(pod, old)
            engine[key] = rh
            c = refs.get(rh, 0)
            refs[rh] = c + 1
            if not c:
                held[rh] = held.get(rh, 0) | bit
                new += 1
        pod.counts.stored += new
        return new

    def remove(self, pod_key: str, engine_hashes: Iterable[Hashable], *, medium: str | None = None,
               group: int | None = None) -> int:
        """Apply BlockRemoved; returns the router blocks the pod no longer holds."""
        pod = self._pods.get(pod_key)
        if pod is None:
            return 0
        if group:
            return 0
        gpu = medium is None or medium == MEDIUM_GPU
        engine = pod.engine
        gone = 0
        unknown = 0
        for eh in engine_hashes:
            rh = engine.pop(eh if gpu else (medium, eh), None)
            if rh is None:
                unknown += 1
            else:
                gone += self._unref(pod, rh)
        pod.counts.removed += gone
        pod.counts.unknown_removed += unknown
        return gone

    def clear_pod(self, pod_key: str, now: float | None = None) -> int:
        """Apply AllBlocksCleared (or drop a pod's state whose event stream broke) at wall-clock `now`;
        the pod stays tracked. Returns the blocks dropped."""
        pod = self._pods.get(pod_key)
        if pod is None:
            return 0
        pod.counts.cleared += 1
        if now is not None:
            self._cleared_at[pod_key] = now
        return self._drop_blocks(pod)

    def cleared_since(self, pod_key: str, since: float) -> bool:
        """Whether the pod's state was dropped at or after `since` (what was routed there before is gone)."""
        return self._cleared_at.get(pod_key, -math.inf) >= since

    def cleared_at(self, pod_key: str) -> float:
        """When the pod's state was last dropped (-inf: never)."""
        return self._cleared_at.get(pod_key, -math.inf)

    # -- requests ----------------------------------------------------------------------------
    def precise_pods(self, model: str, pod_keys: Sequence[str], *, engine_model: str | None = None) -> list[str]:
        """The pods among `pod_keys` whose events `prefix-cache` uses for `model` (`engine_model`: the
        model the pods' engines run, whose tokenizer applies, when `model` is one of its LoRA adapters)."""
        if not self.precise_count or self.tokenizer_for(engine_model or model) is None:
            return []
        pods = self._pods
        return [k for k in pod_keys if (p := pods.get(k)) is not None and p.precise]

    def match(self, model: str, body: dict | None, pod_keys: Sequence[str], *,
              engine_model: str | None = None) -> PreciseMatch | None:
        """Leading blocks of the request's token chain each precise pod among `pod_keys` holds. None
        when no candidate is precise or the body cannot be tokenized for the model.

        The chain is salted with `model` (a LoRA adapter's name for an adapter's request, as the
        engine names its blocks) and tokenized with `engine_model`'s tokenizer (default: `model`'s):
        an adapter shares its base model's tokenizer but never its KV blocks."""
        keys = self.precise_pods(model, pod_keys, engine_model=engine_model)
        if not keys:
            return None
        tokenizer = self.tokenizer_for(engine_model or model)
        assert tokenizer is not None
        by_size: dict[int, list[_Pod]] = {}
        for k in keys:
            pod = self._pods[k]
            by_size.setdefault(pod.block_size, []).append(pod)
        limit = self.max_prefix_blocks * max(by_size)
        encoded = tokenizer.encode_body(body, limit)
        if encoded is None:
            return None
        data, tokens = encoded
        runs: dict[str, tuple[int, int, int]] = {}
        held = self._held
        seed = self.seed
        root = self._root(model)  # chain_hashes' start: block 0's hash is the same
        for size, pods in by_size.items():
            step = size * 4
            n = min(len(data) // step, self.max_prefix_blocks)
            remaining = 0
            for pod in pods:
                remaining |= 1 << pod.bit
            found: dict[int, int] = {}
            # Block 0 alone first: a prompt no candidate has seen costs one hash, not the whole chain.
            chain: list[int] = [int.from_bytes(_digest(root + data[:step], seed), "big")] if n else []
            for i in range(n):
                if i == 1:
                    chain = chain_hashes(data, step, model, seed, n).tolist()
                m = held.get(chain[i], 0) & remaining
                if m != remaining:
                    out = remaining & ~m
                    while out:
                        low = out & -out
                        found[low.bit_length() - 1] = i
                        out ^= low
                    remaining = m
                    if not remaining:
                        break
            for pod in pods:
                runs[pod.key] = (found.get(pod.bit, n), n, size)
        return PreciseMatch(tuple(keys), runs, tokens)

    # -- internals -----------------------------------------------------------------------------
    def _root(self, name: str) -> bytes:
        root = self._roots.get(name)
        if root is None:
            # As chain_hashes starts a chain: the same bytes, so a request and an event agree.
            root = _digest(name.encode("utf-8", "surrogatepass"), self.seed)
            if len(self._roots) < 4096:
                self._roots[name] = root
        return root

    def _unref(self, pod: _Pod, rh: int) -> int:
        c = pod.refs[rh] - 1
        if c:
            pod.refs[rh] = c
            return 0
        del pod.refs[rh]
        mask = self._held[rh] & ~(1 << pod.bit)
        if mask:
            self._held[rh] = mask
        else:
            del self._held[rh]
        return 1

    def _drop_blocks(self, pod: _Pod) -> int:
        n = len(pod.refs)
        held, clear = self._held, ~(1 << pod.bit)
        for rh in pod.refs:
            mask = held[rh] & clear
            if mask:
                held[rh] = mask
            else:
                del held[rh]
        pod.refs = {}
        pod.engine = {}
        return n


def _adapter_root(model: str, lora_name: str | None, lora_id: int | None) -> str:
    """The chain root of a block: the adapter's name when the engine gives it (requests for an adapter
    name it as their model), else the model; an adapter known only by id gets a root no request has."""
    if lora_name:
        return lora_name
    if lora_id is not None and lora_id > 0:
        return f"{model}\x00lora-id:{lora_id}"
    return model


