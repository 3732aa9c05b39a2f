"""A request as the engines see it: token counts and progress, no HTTP details.

Both engines (`simulator.engine.Engine`, `simulator.batching.BatchingEngine`) and the HTTP layer
share this type; it imports nothing of the simulator, so neither engine needs the other.
"""

from __future__ import annotations

from collections.abc import Iterable


class Sequence:
    """One request as the engine sees it: token counts and progress, no HTTP details."""

    __slots__ = (
        "_next_token_at",
        "cached_tokens",
        "generated",
        "held_block_ids",
        "hold_id",
        "kv_transferred",
        "lora",
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
        lora: str | None = None,
    ) -> None:
        self.model = model
        self.lora = lora
        """The LoRA adapter the request asked for (its name); None: the base model."""
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


def lora_names(seqs: Iterable[Sequence]) -> list[str]:
    """The distinct adapters of ``seqs``, in first-seen order (as vLLM lists them in lora_requests_info)."""
    return list(dict.fromkeys(seq.lora for seq in seqs if seq.lora is not None))


def count_by_model(seqs: Iterable[Sequence]) -> dict[str, int]:
    """How many of ``seqs`` there are per model name."""
    counts: dict[str, int] = {}
    for seq in seqs:
        counts[seq.model] = counts.get(seq.model, 0) + 1
    return counts
