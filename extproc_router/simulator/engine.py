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
from dataclasses import dataclass
from typing import Any, Literal, Protocol

Timing = Literal["fixed", "model"]


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Timing and capacity knobs of the simulated engine (times in seconds).

    The ``model`` timing defaults describe roughly an 8B dense model (Llama-3-8B shape: 32
    layers, 8 KV heads of 128 dims, bf16) on one H100 SXM under vLLM:

    * prefill 12 000 tokens/s: a prompt token costs ~2 x 8e9 = 16 GFLOP; 12k tokens/s is ~20 % of
      the H100's 989 dense bf16 TFLOPS, a conservative allowance for attention, chunking and
      kernel overheads on long prompts (a 6000-token prompt takes 0.5 s to first token);
    * decode step 8 ms + 0.08 ms per running sequence: every step streams the 16 GB of weights
      (4.8 ms at 3.35 TB/s) plus launch, sampling and scheduling overhead (~125 tokens/s for a
      lone stream), and each sequence adds its KV read, 128 KiB per context token, i.e. ~256 MiB
      or ~0.08 ms for a ~2k-token context; 256 sequences then take ~28 ms a step (~9k tokens/s);
    * ``max_num_batched_tokens`` 8192: vLLM's OpenAI-server default on >= 70 GB GPUs such as
      the H100; ``max_num_seqs`` 256: vLLM's long-standing default;
    * KV transfer 3 ms per 1k tokens: 1k tokens of KV are 128 MiB, ~2.7 ms over one 400 Gb/s NIC;
    * ``kv_capacity_tokens`` 65 536: deliberately ~1/7 of what that H100 holds (~450k tokens
      after weights and activations at 0.9 memory utilisation). Routing quality shows once the
      shared prefixes need more KV than one pod holds; at this size a shared-prefix benchmark
      that overflows one pod (e.g. 24 groups x 6000-token prefixes = 144k tokens) but fits in
      four stays small enough to run in seconds per arm on two CPU cores, where an H100-sized
      cache would need > 450k distinct prefix tokens per pod, minutes of simulated prefill per
      arm and millions of tokens to tokenize. Use ``--kv-capacity-tokens 450000`` for H100 scale.
    """

    ttft_s: float = 0.020
    itl_s: float = 0.005
    jitter: float = 0.0
    """Each delay (fixed) or step time (model) is multiplied by a uniform factor in [1 - jitter, 1 + jitter]."""
    seed: int | None = 0
    max_num_seqs: int = 256
    kv_capacity_tokens: int = 65536
    timing: Timing = "fixed"
    """``fixed``: constant TTFT/ITL (`Engine`); ``model``: KV cache + continuous batching (`BatchingEngine`)."""
    block_size: int = 16
    prefix_caching: bool = True
    max_num_batched_tokens: int = 8192
    """Token budget of one step (prefill chunk + decodes); 0 = unlimited, i.e. no chunked prefill."""
    prefill_tokens_per_s: float = 12000.0
    decode_step_s: float = 0.008
    decode_s_per_seq: float = 0.00008
    kv_transfer_s_per_1k_tokens: float = 0.003
    kv_hold_s: float = 30.0
    """How long a prefill pod keeps a finished prompt's KV blocks pinned for the decode pod to
    fetch (vLLM's NIXL producer waits ``VLLM_NIXL_ABORT_REQUEST_TIMEOUT``); 0 = not at all."""

    def transfer_s(self, tokens: int) -> float:
        """Time to receive ``tokens`` tokens of KV computed by another pod."""
        return tokens / 1000.0 * self.kv_transfer_s_per_1k_tokens


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
        from extproc_router.simulator.batching import BatchingEngine

        return BatchingEngine(config)
    if config.timing == "fixed":
        return Engine(config)
    raise ValueError(f"unknown timing mode {config.timing!r}")


class Sequence:
    """One request as the engine sees it: token counts and progress, no HTTP details."""

    __slots__ = (
        "_next_token_at",
        "cached_tokens",
        "generated",
        "held_block_ids",
        "hold_id",
        "kv_transferred",
        "model",
        "num_choices",
        "output_tokens",
        "prompt_tokens",
        "remote_tokens",
    )

    def __init__(
        self,
        model: str,
        prompt_tokens: int,
        output_tokens: int,
        num_choices: int = 1,
        *,
        kv_transferred: bool = False,
    ) -> None:
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        """Tokens to generate per choice."""
        self.num_choices = num_choices
        """Parallel samples (OpenAI ``n`` times the number of batched prompts); they advance together."""
        self.generated = 0
        """Tokens generated so far per choice."""
        self.kv_transferred = kv_transferred
        """The prompt's KV is computed by a prefill pod and transferred in (a decode pod's half)."""
        self.cached_tokens = 0
        """Prompt tokens served from the local prefix cache (block-aligned); always 0 in fixed timing."""
        self.remote_tokens = 0
        """Prompt tokens whose KV was transferred in from a prefill pod (set at admission)."""
        self.hold_id: int | None = None
        """Set when a prefill pod keeps this finished sequence's KV blocks for a decode pod."""
        self.held_block_ids: list[int] = []
        """Ids of the full prompt blocks a prefill pod offers (``kv_transfer_params.remote_block_ids``)."""
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
