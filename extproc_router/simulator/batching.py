"""The ``model`` timing engine: a paged KV cache with prefix caching under continuous batching.

One scheduler task per pod runs engine *steps*, like vLLM's v1 scheduler:

1. Running sequences are served first, oldest first: a decoding sequence gets one token per
   choice, a prefilling one the next chunk of its prompt, within the step's token budget
   (``max_num_batched_tokens``; 0 = unlimited, i.e. no chunked prefill). A sequence whose next
   tokens need a KV block when none is free preempts the newest running sequence (its blocks
   are freed and it goes back to the front of the queue, to be recomputed later).
2. Waiting sequences are admitted in FIFO order while fewer than ``max_num_seqs`` run and the
   budget lasts. Admission looks up the longest cached prefix of the prompt's block hashes,
   pins those blocks and allocates blocks for the first chunk; if the blocks cannot be
   allocated, the queue waits (head-of-line, as in vLLM) until a sequence frees some.
3. The step takes ``decode_step_s + decode_s_per_seq x decoding sequences + prefill tokens /
   prefill_tokens_per_s``: a step that carries prefill work is longer for every sequence in it,
   which is how a long prompt on a pod slows everyone's next token there (the interference that
   prefill/decode disaggregation removes). Only *uncached* prompt tokens are prefilled.
4. When the step's time is up, every sequence in it advances together: prefills that completed
   produce their first token, decodes their next; finished sequences free their blocks (full
   prompt blocks stay cached, evictable). One timer per pod per step, however many streams,
   which is what keeps hundreds of streams cheap.

Steps are real ``asyncio.sleep`` calls. Deadlines are absolute (a step that ended late makes its
successor shorter), so event-loop lag does not accumulate; if the process cannot keep up, the
achieved step rate falls below the model's, which `BatchingEngine.snapshot` reports
(``step_time_model_s`` vs ``step_time_wall_s``).

Prefill/decode disaggregation (wired to HTTP by `simulator.disagg` and `simulator.server`): a
`KVSequence` with ``kv_transferred=True`` arrives with its prompt's KV computed elsewhere;
admission allocates its blocks (reusing local prefix hits), the transfer of the rest takes
``kv_transfer_s_per_1k_tokens`` (off the GPU's critical path, so it slows no step), then one step
recomputes the last prompt token and samples the first output token. ``prefill_only=True`` ends
a sequence after its first token, as a prefill pod does; with ``hold_kv=True`` its blocks then
stay pinned (a *hold*, like vLLM's delayed free for ``do_remote_decode`` requests) until the
decode pod has fetched them (`BatchingEngine.release_hold`) or ``kv_hold_s`` has passed. Held
blocks count as used, so a prefill pod whose decode pods never fetch fills up and queues, as a
real one would.

KV-cache events (`BatchingEngine.attach_kv_events`): the cache changes of a step (blocks stored
when a prefill chunk fills them, blocks evicted to make room) go to the sink as one batch when the
step completes, as vLLM publishes each engine step's events; a reset's AllBlocksCleared goes at
once. Nothing is recorded while no sink is attached.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import math
import random
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from extproc_router.simulator.config import EngineConfig
from extproc_router.simulator.kv_cache import KVCache
from extproc_router.simulator.kv_events import Event, KVEventRecorder
from extproc_router.simulator.sequence import Sequence, count_by_model, lora_names

__all__ = ["BatchingEngine", "KVSequence"]

log = logging.getLogger("simulator.batching")


class State(enum.Enum):
    """Where a sequence is in the engine."""

    NEW = "new"
    WAITING = "waiting"
    TRANSFERRING = "transferring"
    """Admitted with remote KV that has not arrived yet."""
    RUNNING = "running"
    FINISHED = "finished"
    ABORTED = "aborted"


class KVSequence(Sequence):
    """A sequence with prompt block hashes and the scheduler's bookkeeping.

    Token accounting, per choice unless said otherwise: ``produced`` tokens have been sampled
    by the engine; ``generated`` (inherited) of them have been handed to the HTTP layer by
    `BatchingEngine.next_token`. ``kv_len`` tokens of KV are computed, counting every choice's
    generated tokens; the sequence is prefilling while ``kv_len < target``.
    """

    __slots__ = (
        "_counted",
        "_ready_at",
        "_registered",
        "_waiter",
        "block_hashes",
        "blocks",
        "hold_kv",
        "kv_len",
        "lora_id",
        "prefill_only",
        "produced",
        "state",
        "target",
        "token_ids",
    )

    def __init__(
        self,
        model: str,
        prompt_tokens: int,
        block_hashes: list[int],
        output_tokens: int,
        num_choices: int = 1,
        *,
        prefill_only: bool = False,
        kv_transferred: bool = False,
        hold_kv: bool = False,
        token_ids: list[int] | None = None,
        lora: str | None = None,
        lora_id: int | None = None,
    ) -> None:
        if hold_kv and not prefill_only:
            raise ValueError("hold_kv is for prefill_only sequences")
        super().__init__(
            model,
            max(1, prompt_tokens),
            1 if prefill_only else output_tokens,
            num_choices,
            kv_transferred=kv_transferred,
            lora=lora,
        )
        self.lora_id = lora_id
        """The adapter's integer id (vLLM's ``lora_int_id``), reported with its blocks in KV events."""
        self.block_hashes = block_hashes
        """Chained hashes of the prompt's full blocks (`simulator.tokenizer.block_hashes`)."""
        self.token_ids = token_ids
        """The prompt's token ids, kept only when KV events need them (BlockStored carries them)."""
        self.prefill_only = prefill_only
        """Ends after the first token (a prefill pod's half of a disaggregated request)."""
        self.hold_kv = hold_kv
        """On finishing, keep the prompt's blocks pinned for a decode pod (see `BatchingEngine.release_hold`)."""
        self.state = State.NEW
        self.produced = 0
        self.kv_len = 0
        self.target = self.prompt_tokens
        """KV tokens to compute before the next token is sampled: the prompt, or after a
        preemption the prompt plus everything generated so far."""
        self.blocks: list[int] = []
        self._registered = 0
        """Leading blocks whose hash is registered in (or was found in) the cache."""
        self._ready_at = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._counted = False


class _Hold:
    """A finished prefill's KV blocks, pinned until the decode pod fetched them or the hold expired."""

    __slots__ = ("block_ids", "blocks", "model", "timer")

    def __init__(self, blocks: list[int], block_ids: list[int], model: str, timer: asyncio.TimerHandle) -> None:
        self.blocks = blocks
        """Every block of the prompt (each holds one reference), the partial last one included."""
        self.block_ids = block_ids
        """The full blocks offered to the decode pod (vLLM's ``remote_block_ids``)."""
        self.model = model
        self.timer = timer


class _Batch:
    """What one step computes: (sequence, new KV tokens) pairs and the step's token counts."""

    __slots__ = ("decode_tokens", "items", "prefill_tokens")

    def __init__(self) -> None:
        self.items: list[tuple[KVSequence, int]] = []
        self.decode_tokens = 0
        self.prefill_tokens = 0


class BatchingEngine:
    """Continuous batching over a prefix-caching KV cache; see the module docstring.

    Usage from the HTTP layer is the same as for `simulator.engine.Engine`::

        seq = KVSequence(model, len(ids), block_hashes(ids, block_size), output_tokens)
        async with engine.admit(seq):
            while not seq.finished:
                await engine.next_token(seq)
    """

    def __init__(self, config: EngineConfig) -> None:
        if config.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if config.prefill_tokens_per_s <= 0:
            raise ValueError("prefill_tokens_per_s must be > 0")
        self.config = config
        num_blocks = config.kv_capacity_tokens // config.block_size
        if num_blocks < 1:
            raise ValueError("kv_capacity_tokens must hold at least one block")
        self.cache = KVCache(num_blocks, config.block_size, config.prefix_caching)
        self._budget = config.max_num_batched_tokens or math.inf
        self._rng = random.Random(config.seed)
        self._waiting: deque[KVSequence] = deque()
        self._running: list[KVSequence] = []
        """Admitted sequences in admission order (the oldest is served first, the newest preempted first)."""
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._queried: dict[str, int] = {}
        self._hit: dict[str, int] = {}
        self._holds: dict[int, _Hold] = {}
        """Held KV by hold id, oldest first."""
        self._holds_by_blocks: dict[tuple[int, ...], list[int]] = {}
        """Hold ids by offered block ids: how a vLLM-style release (block ids only) finds its hold."""
        self._hold_ids = itertools.count(1)
        self._held_blocks = 0
        self._kv_sink: Callable[[list[Event]], object] | None = None
        self._zero_counters()

    def _zero_counters(self) -> None:
        self._queried.clear()
        self._hit.clear()
        self.steps = 0
        self.preemptions = 0
        self.step_time_model_s = 0.0
        """Sum of the modelled step durations."""
        self.step_time_wall_s = 0.0
        """Wall time those steps took; above the model's when the process cannot keep up."""
        self.holds_released = 0
        """Holds ended by `release_hold` (the decode pod fetched the KV)."""
        self.holds_expired = 0
        """Holds ended by ``kv_hold_s`` running out (nobody fetched the KV)."""

    # ----------------------------------------------------------------- state seen by /metrics

    @property
    def num_running(self) -> int:
        """Sequences admitted: prefilling, decoding or receiving their KV."""
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        """Sequences queued for admission (a slot, budget or KV blocks)."""
        return len(self._waiting)

    @property
    def kv_usage(self) -> float:
        """Fraction (0..1) of KV blocks referenced by admitted sequences."""
        return self.cache.usage

    def running_by_model(self) -> dict[str, int]:
        """Running sequence count per model name."""
        return count_by_model(self._running)

    def waiting_by_model(self) -> dict[str, int]:
        """Waiting sequence count per model name."""
        return count_by_model(self._waiting)

    def running_loras(self) -> list[str]:
        return lora_names(self._running)

    def waiting_loras(self) -> list[str]:
        return lora_names(self._waiting)

    def prefix_cache_by_model(self) -> dict[str, tuple[int, int]]:
        """(prompt tokens queried, prompt tokens found cached) per model since the last reset."""
        return {model: (queried, self._hit.get(model, 0)) for model, queried in self._queried.items()}

    def snapshot(self) -> dict[str, Any]:
        """Engine state and step statistics for ``GET /sim/stats``."""
        cache = self.cache
        return {
            "timing": "model",
            "running": self.num_running,
            "waiting": self.num_waiting,
            "kv_usage": self.kv_usage,
            "blocks_total": cache.num_blocks,
            "blocks_used": cache.num_used,
            "blocks_cached": cache.num_cached,
            "evictions": cache.evictions,
            "prefix_cache_queries": sum(self._queried.values()),
            "prefix_cache_hits": sum(self._hit.values()),
            "preemptions": self.preemptions,
            "steps": self.steps,
            "step_time_model_s": self.step_time_model_s,
            "step_time_wall_s": self.step_time_wall_s,
            **self.hold_stats(),
        }

    def hold_stats(self) -> dict[str, int]:
        """``holds``, ``held_blocks`` (gauges), ``holds_released``, ``holds_expired`` (counters)."""
        return {
            "holds": len(self._holds),
            "held_blocks": self._held_blocks,
            "holds_released": self.holds_released,
            "holds_expired": self.holds_expired,
        }

    # ----------------------------------------------------------------- HTTP-facing API

    def admission_error(self, seq: Sequence) -> str | None:
        """Why ``seq`` can never run here: its prompt plus output exceed the whole KV cache.

        This plays the part of vLLM's ``max_model_len`` check, and it guarantees that a sequence
        running alone always finds its blocks (so preemption always makes progress).
        """
        capacity = self.cache.num_blocks * self.cache.block_size
        needed = seq.prompt_tokens + seq.num_choices * seq.output_tokens
        if needed > capacity:
            return (
                f"This model's maximum context length is {capacity} tokens. However, you requested "
                f"{needed} tokens ({seq.prompt_tokens} in the prompt, {needed - seq.prompt_tokens} in the "
                "completion). Please reduce the length of the prompt or completion."
            )
        return None

    @asynccontextmanager
    async def admit(self, seq: Sequence) -> AsyncIterator[Sequence]:
        """Queue ``seq`` for the scheduler; on exit (done, error or client gone) drop it and free its blocks."""
        if not isinstance(seq, KVSequence):
            raise TypeError("the model timing engine serves KVSequence objects")
        if seq.state is not State.NEW:
            raise RuntimeError("a sequence is admitted once")
        error = self.admission_error(seq)
        if error is not None:
            raise ValueError(error)
        seq.state = State.WAITING
        self._waiting.append(seq)
        self._ensure_scheduler()
        try:
            yield seq
        finally:
            self._abort(seq)

    async def next_token(self, seq: Sequence) -> None:
        """Wait until the engine has produced the sequence's next token, then hand it over.

        Tokens produced while the caller was busy are handed over without waiting, so a slow
        client sees a burst rather than a slower engine.
        """
        assert isinstance(seq, KVSequence)
        while seq.generated >= seq.produced:
            if seq.state in (State.ABORTED, State.FINISHED, State.NEW):
                raise RuntimeError(f"sequence is {seq.state.value}; no more tokens will come")
            waiter = asyncio.get_running_loop().create_future()
            seq._waiter = waiter
            try:
                await waiter
            finally:
                seq._waiter = None
        seq.generated += 1

    def release_hold(self, hold_id: int) -> str | None:
        """Unpin a prefill's held KV blocks because the decode pod fetched them.

        Returns the hold's model, or None when there is no such hold (released or expired before).
        """
        hold = self._drop_hold(hold_id)
        if hold is None:
            return None
        self.holds_released += 1
        return hold.model

    def hold_for_blocks(self, block_ids: list[int]) -> int | None:
        """The oldest hold offering exactly ``block_ids``, or None.

        Two holds can offer the same blocks (two prefills of one prompt share its cached blocks);
        they are interchangeable, each holding one reference per block.
        """
        ids = self._holds_by_blocks.get(tuple(block_ids))
        return ids[0] if ids else None

    def reset(self) -> None:
        """Flush the prefix cache, drop the KV holds and zero the counters; admitted sequences keep running.

        A decode pod's later release of a dropped hold is simply not found. With KV events, the
        events still pending and then AllBlocksCleared go to the sink at once.
        """
        for hold_id in list(self._holds):
            self._drop_hold(hold_id)
        self.cache.reset()
        for seq in self._running:
            seq._registered = len(seq.block_hashes)  # nothing computed before the reset gets cached
        self._zero_counters()
        self._flush_kv_events()

    def attach_kv_events(self, sink: Callable[[list[Event]], object]) -> None:
        """Record the cache's KV events from now on and hand each step's batch to ``sink``.

        Sequences then need their ``token_ids`` (a BlockStored carries the tokens of its blocks);
        a sequence without them is reported with empty ``token_ids``.
        """
        self.cache.recorder = KVEventRecorder()
        self._kv_sink = sink

    def _flush_kv_events(self) -> None:
        recorder, sink = self.cache.recorder, self._kv_sink
        if recorder is not None and sink is not None and recorder.pending:
            sink(recorder.take())

    async def aclose(self) -> None:
        """Stop the scheduler task and the hold timers."""
        for hold in self._holds.values():
            hold.timer.cancel()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ----------------------------------------------------------------- scheduler loop

    def _ensure_scheduler(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-scheduler")
        self._wake.set()

    async def _run(self) -> None:
        try:
            await self._loop()
        except asyncio.CancelledError:
            raise
        except Exception:
            # A scheduler bug must not leave every stream hanging: fail them loudly instead.
            log.exception("scheduler crashed; failing the admitted and waiting requests")
            for seq in [*self._running, *self._waiting]:
                self._drop(seq, State.ABORTED)
            raise

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            now = loop.time()
            batch = self._schedule(now)
            if batch is None:
                self._flush_kv_events()  # evictions of an admission that computes nothing this step
                await self._idle(now)
                deadline = loop.time()
                continue
            duration = self._step_duration(batch)
            started = now
            # Absolute deadlines: lateness of the previous step is taken off this one.
            deadline = max(deadline + duration, now)
            if deadline > now:
                await asyncio.sleep(deadline - now)
            self._complete(batch)
            self._flush_kv_events()
            self.steps += 1
            self.step_time_model_s += duration
            self.step_time_wall_s += loop.time() - started

    async def _idle(self, now: float) -> None:
        """Sleep until a request arrives or the next KV transfer completes."""
        self._wake.clear()
        pending = [seq._ready_at for seq in self._running if seq.state is State.TRANSFERRING]
        timeout = max(0.0, min(pending) - now) if pending else None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    def _step_duration(self, batch: _Batch) -> float:
        config = self.config
        duration = (
            config.decode_step_s
            + config.decode_s_per_seq * batch.decode_tokens
            + batch.prefill_tokens / config.prefill_tokens_per_s
        )
        jitter = config.jitter
        if jitter > 0.0:
            duration *= 1.0 + self._rng.uniform(-jitter, jitter)
        return max(0.0, duration)

    # ----------------------------------------------------------------- one step

    def _schedule(self, now: float) -> _Batch | None:
        """Pick this step's work; None when there is none (idle, or only transfers in flight)."""
        batch = _Batch()
        budget = self._budget
        running = self._running
        preemptions_before = self.preemptions
        i = 0
        while i < len(running):
            seq = running[i]
            i += 1
            if seq.state is State.TRANSFERRING:
                if seq._ready_at > now:
                    continue
                seq.state = State.RUNNING
            prefilling = seq.kv_len < seq.target
            if prefilling:
                new = min(seq.target - seq.kv_len, budget)
                if new <= 0:
                    continue  # budget spent: this chunk waits for the next step
            else:
                # Decodes are never starved by the budget (vLLM requires it >= max_num_seqs anyway).
                new = seq.num_choices
            if not self._grow(seq, new):
                break  # seq preempted itself: it was the newest, nothing after it
            budget -= new
            batch.items.append((seq, new))
            if prefilling:
                batch.prefill_tokens += new
            else:
                batch.decode_tokens += new

        # After a preemption the cache is full: admitting now would only preempt again (vLLM skips too).
        while (
            self._waiting
            and len(running) < self.config.max_num_seqs
            and budget > 0
            and self.preemptions == preemptions_before
        ):
            seq = self._waiting[0]
            new = self._try_admit(seq, budget, now)
            if new is None:
                break  # head-of-line blocking: wait for blocks to free up, as vLLM does
            self._waiting.popleft()
            running.append(seq)
            if new:
                budget -= new
                batch.items.append((seq, new))
                batch.prefill_tokens += new
        return batch if batch.items else None

    def _blocks_for(self, kv_tokens: int) -> int:
        return -(-kv_tokens // self.cache.block_size)

    def _grow(self, seq: KVSequence, new: int) -> bool:
        """Allocate the blocks ``new`` more KV tokens need, preempting the newest sequences if needed.

        Returns False when ``seq`` itself had to be preempted.
        """
        needed = self._blocks_for(seq.kv_len + new) - len(seq.blocks)
        if needed <= 0:
            return True
        cache = self.cache
        while needed > cache.num_free:
            victim = self._running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        seq.blocks.extend(cache.allocate(needed))
        return True

    def _try_admit(self, seq: KVSequence, budget: float, now: float) -> int | None:
        """Admit the queue head if its blocks fit; return its prefill tokens this step, None if not admitted."""
        cache = self.cache
        block_size = cache.block_size
        # At least the last prompt token is always computed: its logits give the next token.
        max_hit = min(len(seq.block_hashes), (seq.target - 1) // block_size)
        hits = cache.lookup(seq.block_hashes, max_hit)
        hit_tokens = len(hits) * block_size
        transfer = seq.kv_transferred and seq.produced == 0
        # A transferred prompt arrives whole; a local one gets blocks for its first chunk only.
        kv_after = seq.target if transfer else hit_tokens + min(seq.target - hit_tokens, budget)
        new_blocks = self._blocks_for(kv_after) - len(hits)
        if not cache.can_allocate(new_blocks, hits):
            return None
        cache.acquire(hits)
        seq.blocks = hits + cache.allocate(new_blocks)
        seq._registered = len(hits)
        seq.kv_len = hit_tokens
        first = not seq._counted  # a preempted sequence's re-admission is not a new query
        if first:
            seq._counted = True
            self._count_query(seq, hit_tokens)
        if transfer:
            # The last prompt token is recomputed locally once the rest has arrived.
            seq.kv_len = seq.target - 1
            remote_tokens = seq.kv_len - hit_tokens
            if first:
                seq.remote_tokens = remote_tokens
            seq._ready_at = now + self.config.transfer_s(remote_tokens)
            seq.state = State.TRANSFERRING
            return 0
        seq.state = State.RUNNING
        return kv_after - hit_tokens

    def _count_query(self, seq: KVSequence, hit_tokens: int) -> None:
        model = seq.model
        self._queried[model] = self._queried.get(model, 0) + seq.prompt_tokens
        self._hit[model] = self._hit.get(model, 0) + hit_tokens
        seq.cached_tokens = hit_tokens

    def _complete(self, batch: _Batch) -> None:
        """Apply a finished step: advance KV, cache full prompt blocks, hand out tokens."""
        cache = self.cache
        block_size = cache.block_size
        finished = False
        for seq, new in batch.items:
            if seq.state is not State.RUNNING:
                continue  # aborted (client gone) while the step ran
            seq.kv_len += new
            full = min(seq.kv_len // block_size, len(seq.block_hashes))
            if full > seq._registered:
                if cache.recorder is None:
                    hashes, blocks = seq.block_hashes, seq.blocks
                    for b in range(seq._registered, full):
                        cache.register(blocks[b], hashes[b])
                else:
                    self._register_recorded(seq, full)
                seq._registered = full
            if seq.kv_len < seq.target:
                continue  # more prompt chunks to go
            seq.produced += 1
            waiter = seq._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            if seq.produced >= seq.output_tokens:
                if seq.hold_kv:
                    self._hold(seq)
                self._release(seq, State.FINISHED)
                finished = True
        if finished:
            self._running = [seq for seq in self._running if seq.state is not State.FINISHED]

    def _register_recorded(self, seq: KVSequence, full: int) -> None:
        """Register blocks ``seq._registered .. full - 1`` and record a BlockStored per run of new ones.

        A block whose hash another block already holds is not stored again (it stays anonymous), so
        it ends a run; the next run names the block before it as its parent all the same.
        """
        cache = self.cache
        recorder = cache.recorder
        assert recorder is not None
        block_size = cache.block_size
        hashes, blocks, tokens = seq.block_hashes, seq.blocks, seq.token_ids
        run_start: int | None = None
        for b in range(seq._registered, full + 1):
            stored = b < full and cache.register(blocks[b], hashes[b])
            if stored and run_start is None:
                run_start = b
            elif not stored and run_start is not None:
                recorder.stored(
                    hashes[run_start:b],
                    hashes[run_start - 1] if run_start else None,
                    tokens[run_start * block_size : b * block_size] if tokens is not None else [],
                    block_size,
                    lora_id=seq.lora_id,
                    lora_name=seq.lora,
                )
                run_start = None

    # ----------------------------------------------------------------- leaving the engine

    def _hold(self, seq: KVSequence) -> None:
        """Keep a finished prefill's blocks pinned for the decode pod: they move from ``seq`` to a hold.

        As vLLM's NIXL connector does, only full prompt blocks are offered, and a prompt shorter
        than one block has nothing to transfer, so its blocks are freed at once.
        """
        full = min(seq.prompt_tokens // self.cache.block_size, len(seq.blocks))
        seq.held_block_ids = seq.blocks[:full]
        if not full or self.config.kv_hold_s <= 0:
            return
        hold_id = next(self._hold_ids)
        timer = asyncio.get_running_loop().call_later(self.config.kv_hold_s, self._expire_hold, hold_id)
        self._holds[hold_id] = _Hold(seq.blocks, seq.held_block_ids, seq.model, timer)
        self._holds_by_blocks.setdefault(tuple(seq.held_block_ids), []).append(hold_id)
        self._held_blocks += len(seq.blocks)
        seq.hold_id = hold_id
        seq.blocks = []  # the hold owns the references now; _release frees nothing

    def _expire_hold(self, hold_id: int) -> None:
        if self._drop_hold(hold_id) is not None:
            self.holds_expired += 1

    def _drop_hold(self, hold_id: int) -> _Hold | None:
        hold = self._holds.pop(hold_id, None)
        if hold is None:
            return None
        hold.timer.cancel()
        key = tuple(hold.block_ids)
        same = self._holds_by_blocks[key]
        same.remove(hold_id)
        if not same:
            del self._holds_by_blocks[key]
        self.cache.release(hold.blocks)
        self._held_blocks -= len(hold.blocks)
        # Freed blocks may let the queue head in; make sure an idle scheduler looks again.
        self._wake.set()
        return hold

    def _release(self, seq: KVSequence, state: State) -> None:
        """Free the sequence's blocks and mark it ``state`` (the caller unlinks it)."""
        if seq.blocks:
            self.cache.release(seq.blocks)
            seq.blocks = []
        seq.state = state

    def _preempt(self, seq: KVSequence) -> None:
        """Recompute preemption: free the blocks, requeue at the front; tokens already sent stay sent."""
        self._running.remove(seq)
        self._release(seq, State.WAITING)
        seq.kv_len = 0
        seq._registered = 0
        seq.target = seq.prompt_tokens + seq.num_choices * seq.produced
        self._waiting.appendleft(seq)
        self.preemptions += 1

    def _abort(self, seq: KVSequence) -> None:
        """The HTTP side is done with ``seq`` (normally after its last token; or the client left)."""
        if seq.state in (State.FINISHED, State.ABORTED):
            return
        self._drop(seq, State.ABORTED)

    def _drop(self, seq: KVSequence, state: State) -> None:
        if seq.state is State.WAITING:
            with contextlib.suppress(ValueError):
                self._waiting.remove(seq)  # O(n), only on disconnects while queued
        elif seq.state in (State.RUNNING, State.TRANSFERRING):
            with contextlib.suppress(ValueError):
                self._running.remove(seq)
        self._release(seq, state)
        waiter = seq._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)  # next_token then sees the state and raises
        # Freed blocks may let the queue head in; make sure an idle scheduler looks again.
        self._wake.set()
