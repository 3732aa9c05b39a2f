"""The simulated inference engine: request admission and token timing.

This is the only place that decides *when* things happen. The HTTP layer (`server.py`) asks the
engine to admit a sequence and then awaits `next_token` once per generated token; it never
sleeps on its own. Two engines implement that contract (`SimEngine`); `make_engine` picks one
from ``EngineConfig.timing``:

``fixed`` (`Engine`, this module; the default, cheap enough for the local stack and the router
overhead benchmark):

* at most ``max_num_seqs`` sequences run at once; later arrivals wait in FIFO order (this is
  what vLLM reports as ``num_requests_waiting``);
* the first token arrives ``ttft`` after admission, every further token ``itl`` after the
  previous one, each optionally scaled by a seeded uniform jitter;
* KV-cache usage is the number of tokens held by running sequences (prompt plus generated)
  divided by ``kv_capacity_tokens``; there is no prefix cache;
* prefill/decode disaggregation is timing only: a prefill pod's sequence simply has one output
  token (it answers after ``ttft``), and a sequence whose prompt KV was transferred in
  (``kv_transferred``) gets its first token after the transfer time plus one ``itl`` instead of
  ``ttft``. No KV blocks exist, so nothing is held for a decode pod.

``model`` (`simulator.batching.BatchingEngine`): a paged KV cache with prefix caching and a
continuous-batching step loop whose step times follow from the work in each step.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol

from extproc_router.simulator.batching import BatchingEngine
from extproc_router.simulator.config import EngineConfig
from extproc_router.simulator.sequence import Sequence, count_by_model, lora_names

# EngineConfig (simulator.config) and Sequence (simulator.sequence) are defined where both engines
# can import them without importing each other; this module is where the HTTP layer finds them.
__all__ = ["Engine", "EngineConfig", "Sequence", "SimEngine", "make_engine"]


class SimEngine(Protocol):
    """What the HTTP layer and the metrics need from an engine (`Engine` or `BatchingEngine`)."""

    config: EngineConfig

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    @property
    def kv_usage(self) -> float: ...

    def running_by_model(self) -> dict[str, int]: ...

    def waiting_by_model(self) -> dict[str, int]: ...

    def running_loras(self) -> list[str]:
        """LoRA adapters of the running sequences."""
        ...

    def waiting_loras(self) -> list[str]:
        """LoRA adapters of the waiting sequences."""
        ...

    def prefix_cache_by_model(self) -> dict[str, tuple[int, int]]:
        """(prompt tokens queried, prompt tokens hit) per model since the last reset."""
        ...

    def admission_error(self, seq: Sequence) -> str | None:
        """Why ``seq`` can never be served (too long for the KV cache), or None."""
        ...

    def admit(self, seq: Sequence) -> AbstractAsyncContextManager[Sequence]: ...

    async def next_token(self, seq: Sequence) -> None: ...

    def reset(self) -> None:
        """Flush the prefix cache, drop KV holds, zero the counters (running sequences are not touched)."""
        ...

    def release_hold(self, hold_id: int) -> str | None:
        """Unpin a prefill's held KV blocks (the decode pod fetched them); the hold's model, None if unknown."""
        ...

    def hold_for_blocks(self, block_ids: list[int]) -> int | None:
        """The oldest hold whose reported block ids are exactly ``block_ids``, or None."""
        ...

    def hold_stats(self) -> dict[str, int]:
        """``holds``, ``held_blocks`` (gauges), ``holds_released``, ``holds_expired`` (counters)."""
        ...

    def snapshot(self) -> dict[str, Any]:
        """Engine state for ``GET /sim/stats``."""
        ...

    async def aclose(self) -> None:
        """Stop background work (the scheduler task)."""
        ...


def make_engine(config: EngineConfig) -> SimEngine:
    """The engine that ``config.timing`` selects."""
    if config.timing == "model":
        return BatchingEngine(config)
    if config.timing == "fixed":
        return Engine(config)
    raise ValueError(f"unknown timing mode {config.timing!r}")


class Engine:
    """Admission control and token timing for the simulated model pod.

    Usage from the HTTP layer::

        seq = Sequence(model, prompt_tokens, output_tokens)
        async with engine.admit(seq):
            while not seq.finished:
                await engine.next_token(seq)
                ...  # emit token number seq.generated
    """

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self._rng = random.Random(self.config.seed)
        self._running: set[Sequence] = set()
        self._waiting: deque[tuple[Sequence, asyncio.Future[None]]] = deque()
        self._running_tokens = 0
        self._queried: dict[str, int] = {}

    # ----------------------------------------------------------------- state seen by /metrics

    @property
    def num_running(self) -> int:
        """Sequences admitted and generating."""
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        """Sequences queued because ``max_num_seqs`` are already running."""
        return len(self._waiting)

    @property
    def kv_usage(self) -> float:
        """Fraction (0..1) of the simulated KV cache held by running sequences."""
        return min(1.0, self._running_tokens / self.config.kv_capacity_tokens)

    def running_by_model(self) -> dict[str, int]:
        """Running sequence count per model name."""
        return count_by_model(self._running)

    def waiting_by_model(self) -> dict[str, int]:
        """Waiting sequence count per model name."""
        return count_by_model(seq for seq, _ in self._waiting)

    def running_loras(self) -> list[str]:
        return lora_names(self._running)

    def waiting_loras(self) -> list[str]:
        return lora_names(seq for seq, _ in self._waiting)

    def prefix_cache_by_model(self) -> dict[str, tuple[int, int]]:
        """(prompt tokens queried, 0) per model: fixed timing has no prefix cache, so nothing hits."""
        return {model: (queried, 0) for model, queried in self._queried.items()}

    def admission_error(self, seq: Sequence) -> str | None:
        """Fixed timing serves any size."""
        return None

    def reset(self) -> None:
        """Zero the counters (there is no cache to flush)."""
        self._queried.clear()

    def release_hold(self, hold_id: int) -> str | None:
        """Fixed timing holds no KV blocks."""
        return None

    def hold_for_blocks(self, block_ids: list[int]) -> int | None:
        """Fixed timing holds no KV blocks."""
        return None

    def hold_stats(self) -> dict[str, int]:
        """All zero: fixed timing holds no KV blocks."""
        return {"holds": 0, "held_blocks": 0, "holds_released": 0, "holds_expired": 0}

    def snapshot(self) -> dict[str, Any]:
        """Engine state for ``GET /sim/stats``."""
        return {"timing": "fixed", "running": self.num_running, "waiting": self.num_waiting, "kv_usage": self.kv_usage}

    async def aclose(self) -> None:
        """Nothing runs in the background."""

    # ----------------------------------------------------------------- timing model

    def ttft_s(self, seq: Sequence) -> float:
        """Delay between admission and the first token of ``seq``.

        A transferred prompt skips the prefill: its KV arrives, then one decode step (``itl``)
        computes the last prompt token and samples the first output token.
        """
        if seq.kv_transferred:
            return self._jittered(self.config.transfer_s(seq.remote_tokens) + self.config.itl_s)
        return self._jittered(self.config.ttft_s)

    def itl_s(self, seq: Sequence) -> float:
        """Delay between two consecutive tokens of ``seq``."""
        return self._jittered(self.config.itl_s)

    def _jittered(self, base: float) -> float:
        jitter = self.config.jitter
        if jitter <= 0.0 or base <= 0.0:
            return base
        return max(0.0, base * (1.0 + self._rng.uniform(-jitter, jitter)))

    # ----------------------------------------------------------------- admission and stepping

    @asynccontextmanager
    async def admit(self, seq: Sequence) -> AsyncIterator[Sequence]:
        """Hold a running slot for ``seq``; waits (FIFO) while ``max_num_seqs`` are running.

        The slot and the sequence's KV tokens are released on exit, including when the caller
        is cancelled (client disconnect), so the running/waiting counts never drift.
        """
        if len(self._running) >= self.config.max_num_seqs or self._waiting:
            await self._wait_for_slot(seq)
        else:
            self._start(seq)
        try:
            yield seq
        finally:
            self._finish(seq)

    async def next_token(self, seq: Sequence) -> None:
        """Wait until the next token of ``seq`` is due, then account for it.

        Deadlines are absolute (previous deadline + delay) so that small event-loop lateness
        on one token is made up on the next instead of accumulating over a long stream.
        """
        loop = asyncio.get_running_loop()
        now = loop.time()
        # After the first token, deadlines are floored at "now": after a stall longer than one
        # interval (overloaded loop, slow client) the normal pace resumes instead of a burst.
        due = now + self.ttft_s(seq) if seq.generated == 0 else max(seq._next_token_at + self.itl_s(seq), now)
        seq._next_token_at = due
        delay = due - now
        if delay > 0.0:
            await asyncio.sleep(delay)
        seq.generated += 1
        self._running_tokens += seq.num_choices

    def _start(self, seq: Sequence) -> None:
        if seq.kv_transferred:
            # Everything but the last prompt token arrives from the prefill pod (as in vLLM).
            seq.remote_tokens = max(0, seq.prompt_tokens - 1)
        self._running.add(seq)
        self._running_tokens += seq.kv_tokens
        self._queried[seq.model] = self._queried.get(seq.model, 0) + seq.prompt_tokens

    def _finish(self, seq: Sequence) -> None:
        if seq in self._running:
            self._running.remove(seq)
            self._running_tokens -= seq.kv_tokens
            self._admit_waiters()

    def _admit_waiters(self) -> None:
        while self._waiting and len(self._running) < self.config.max_num_seqs:
            seq, fut = self._waiting.popleft()
            if fut.done():  # its waiter was cancelled; the slot goes to the next one
                continue
            self._start(seq)
            fut.set_result(None)

    async def _wait_for_slot(self, seq: Sequence) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (seq, fut)
        self._waiting.append(entry)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # The slot was handed over in the same loop iteration as the cancellation.
                self._finish(seq)
            else:
                fut.cancel()
                # Removal keeps num_waiting exact; O(n) but only on cancellation.
                self._waiting.remove(entry)
            raise
