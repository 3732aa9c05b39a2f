"""The simulated inference engine: request admission and token timing.

This is the only place that decides *when* things happen. The HTTP layer (`server.py`) asks the
engine to admit a sequence and then awaits `next_token` once per generated token; it never
sleeps on its own. A later KV-cache / prefix-caching / continuous-batching model replaces the
internals of this module (``ttft_s``, ``itl_s``, admission) without touching the HTTP layer.

The current model is deliberately simple:

* at most ``max_num_seqs`` sequences run at once; later arrivals wait in FIFO order (this is
  what vLLM reports as ``num_requests_waiting``);
* the first token arrives ``ttft`` after admission, every further token ``itl`` after the
  previous one, each optionally scaled by a seeded uniform jitter;
* KV-cache usage is the number of tokens held by running sequences (prompt plus generated)
  divided by ``kv_capacity_tokens``.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Timing and capacity knobs of the simulated engine (times in seconds)."""

    ttft_s: float = 0.020
    itl_s: float = 0.005
    jitter: float = 0.0
    """Each delay is multiplied by a uniform factor in [1 - jitter, 1 + jitter] (floored at 0)."""
    seed: int | None = 0
    max_num_seqs: int = 256
    kv_capacity_tokens: int = 65536


class Sequence:
    """One request as the engine sees it: token counts and progress, no HTTP details."""

    __slots__ = (
        "_next_token_at",
        "cached_tokens",
        "generated",
        "model",
        "num_choices",
        "output_tokens",
        "prompt_tokens",
    )

    def __init__(self, model: str, prompt_tokens: int, output_tokens: int, num_choices: int = 1) -> None:
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        """Tokens to generate per choice."""
        self.num_choices = num_choices
        """Parallel samples (OpenAI ``n`` times the number of batched prompts); they advance together."""
        self.generated = 0
        """Tokens generated so far per choice."""
        self.cached_tokens = 0
        """Prompt tokens served from a prefix cache; always 0 until a cache model exists."""
        self._next_token_at = 0.0

    @property
    def finished(self) -> bool:
        """True once every token of the sequence has been generated."""
        return self.generated >= self.output_tokens

    @property
    def kv_tokens(self) -> int:
        """Tokens this sequence currently holds in the KV cache."""
        return self.prompt_tokens + self.generated * self.num_choices


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
        counts: dict[str, int] = {}
        for seq in self._running:
            counts[seq.model] = counts.get(seq.model, 0) + 1
        return counts

    def waiting_by_model(self) -> dict[str, int]:
        """Waiting sequence count per model name."""
        counts: dict[str, int] = {}
        for seq, _ in self._waiting:
            counts[seq.model] = counts.get(seq.model, 0) + 1
        return counts

    # ----------------------------------------------------------------- timing model

    def ttft_s(self, seq: Sequence) -> float:
        """Delay between admission and the first token of ``seq``."""
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
        self._running.add(seq)
        self._running_tokens += seq.kv_tokens

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
