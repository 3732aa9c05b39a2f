"""Prompt tokenizers for prefix hashing: they turn `RoutingRequest.prompt` into the unit stream
that is cut into fixed-size blocks.

Both keep only what hashing needs: the first `max_units` units as bytes (so a 1 MiB prompt costs
no more than the cap), and an estimate of the whole prompt's length in model tokens (for the
cost model's uncached-token count). Neither needs to match the serving engine's tokenizer: the
index only has to give the same blocks to the same prompt prefix, on every router replica.
"""

from __future__ import annotations

import warnings
from typing import Protocol

import numpy as np

CHARACTER = "character"
TIKTOKEN = "tiktoken"
TOKENIZER_TYPES = (CHARACTER, TIKTOKEN)

# English text averages about four UTF-8 bytes per BPE token (cl100k and the Llama tokenizers
# alike); only the cost model's token estimate uses this, never the hashing.
BYTES_PER_TOKEN = 4.0


class Tokenizer(Protocol):
    """Turns a prompt into hashable units."""

    name: str
    unit_bytes: int  # bytes per unit in the encoded stream (1 for characters, 4 per token id)
    units_per_token: float  # units per model token, for converting matched blocks to tokens

    def encode(self, text: str, max_units: int) -> tuple[bytes, float]:
        """The first `max_units` units of `text` as bytes, and the whole text's estimated length
        in model tokens."""
        ...


class CharacterTokenizer:
    """UTF-8 bytes of the prompt: free to compute, stable across replicas and versions.

    A block of 128 bytes is about 32 model tokens, i.e. two vLLM KV blocks of 16 tokens.
    """

    name = CHARACTER
    unit_bytes = 1
    units_per_token = BYTES_PER_TOKEN

    def encode(self, text: str, max_units: int) -> tuple[bytes, float]:
        if text.isascii():  # O(1) in CPython; the common case needs no UTF-8 work at all
            return text[:max_units].encode("ascii"), len(text) / BYTES_PER_TOKEN
        # A character is at least one byte, so `max_units` characters hold at least `max_units`
        # bytes; slicing first keeps a 1 MiB prompt from being encoded whole. Lone surrogates are
        # valid in JSON strings, so they must not raise here.
        head_chars = text[:max_units]
        head = head_chars.encode("utf-8", "surrogatepass")
        if len(head_chars) == len(text):
            total = float(len(head))
        else:  # extrapolate the rest at the head's bytes per character
            total = len(head) + (len(text) - len(head_chars)) * len(head) / len(head_chars)
        return head[:max_units], total / BYTES_PER_TOKEN


class TiktokenTokenizer:
    """cl100k_base token ids (via `bpe-openai`, which ships its vocabulary and works offline), each
    as a 4-byte big-endian integer, as the reference gateway lays them out.

    Costs ~100 ns per prompt byte (3.2 ms for 32 KiB of English-like text on the 2-core development
    machine, `bench/decision_latency.py`) and 0.7 s to load the vocabulary, once, when the strategy
    is built. At most `max_units * 6` characters are encoded, so a 1 MiB prompt costs ~11 ms.
    """

    name = TIKTOKEN
    unit_bytes = 4
    units_per_token = 1.0

    # Characters fed to the BPE per wanted token: cl100k averages ~4 characters per token on
    # English, fewer on code and CJK. Cutting the text (rather than the token list) is what keeps
    # the cost bounded; the cut is at a fixed character count, so equal prefixes still encode equal.
    _CHARS_PER_TOKEN_BUDGET = 6

    def __init__(self) -> None:
        with warnings.catch_warnings():
            # bpe-openai 0.1 reads its vocabulary (at import) with a deprecated importlib.resources call.
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                import bpe_openai
            except ImportError as exc:  # pragma: no cover - depends on the installation
                raise ValueError("AIBRIX_PREFIX_CACHE_TOKENIZER_TYPE=tiktoken needs the `bpe-openai` package") from exc
            self._encoding = bpe_openai.get_encoding("cl100k_base")

    def encode(self, text: str, max_units: int) -> tuple[bytes, float]:
        # bpe-openai refuses texts of a million characters or more.
        budget = min(max_units * self._CHARS_PER_TOKEN_BUDGET, 999_999)
        head = text[:budget]
        # encode_ordinary: special-token strings in user text are plain text, never an error.
        ids = self._encoding.encode_ordinary(head)
        if len(head) == len(text):
            total = float(len(ids))
        else:
            total = len(ids) + (len(text) - len(head)) * len(ids) / max(len(head), 1)
        del ids[max_units:]
        return np.asarray(ids, dtype=">u4").tobytes(), total


def make_tokenizer(name: str) -> Tokenizer:
    """The tokenizer for `AIBRIX_PREFIX_CACHE_TOKENIZER_TYPE`; ValueError names the valid ones."""
    if name == CHARACTER:
        return CharacterTokenizer()
    if name == TIKTOKEN:
        return TiktokenTokenizer()
    raise ValueError(f"unknown prefix-cache tokenizer {name!r}; valid: {', '.join(TOKENIZER_TYPES)}")


_COUNTER: TiktokenTokenizer | None = None


def count_tokens(text: str) -> int:
    """cl100k token count of `text` (the reference counts prompts this way for `auto` profiles and
    pd prompt-length buckets); ~100 ns per byte, so callers only use it where a count is needed.
    Falls back to the 4-bytes-per-token estimate when bpe-openai is missing."""
    global _COUNTER
    if _COUNTER is None:
        try:
            _COUNTER = TiktokenTokenizer()
        except ValueError:
            return max(1, int(len(text.encode("utf-8", "replace")) / BYTES_PER_TOKEN))
    return int(_COUNTER.encode(text, 1 << 30)[1])
