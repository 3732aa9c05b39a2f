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


# -- engine token ids (precise prefix matching from the engines' KV-cache events) ---------------
#
# The precise index (`routing/kv_index.py`) re-hashes the token ids an engine reports in its
# BlockStored events, so the router must produce the very ids the engine cached: the engine's
# tokenizer applied to the text the engine tokenized (its chat template's rendering). Every
# tokenizer below lays ids out as 4-byte big-endian integers, as `TiktokenTokenizer` does, so one
# `chain_hashes` call hashes a request and an event's blocks alike.

ENGINE_TOKENIZERS = ("cl100k", "bytes")  # besides a path to a tokenizer.json
CHAT_SIMULATOR = "simulator"
CHAT_CHATML = "chatml"
CHAT_FORMATS = (CHAT_SIMULATOR, CHAT_CHATML)


class ByteIdsTokenizer:
    """UTF-8 bytes as token ids (the simulator's `--tokenizer bytes`): free, exact for that engine."""

    name = "bytes"
    unit_bytes = 4
    units_per_token = 1.0

    def encode(self, text: str, max_units: int) -> tuple[bytes, float]:
        head_chars = text[:max_units]  # a character is at least one byte
        raw = head_chars.encode("utf-8", "surrogatepass")
        total = float(len(raw)) if len(head_chars) == len(text) else len(raw) * len(text) / max(len(head_chars), 1)
        return np.frombuffer(raw[:max_units], dtype=np.uint8).astype(">u4").tobytes(), total


class HuggingFaceTokenizer:
    """A model's own tokenizer from the text of its `tokenizer.json` (the `tokenizers` package, which
    is optional: imported here, never at module load). Nothing is downloaded: the application reads
    the file and hands its text over.

    `add_special_tokens` False by default: a chat template's rendering already holds the BOS and
    role tokens, and vLLM tokenizes it without adding more.
    """

    name = "tokenizer.json"
    unit_bytes = 4
    units_per_token = 1.0
    _CHARS_PER_TOKEN_BUDGET = 6  # as TiktokenTokenizer: the cut is at a fixed character count

    def __init__(self, json_text: str, *, add_special_tokens: bool = False) -> None:
        try:
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise ValueError("a tokenizer.json needs the `tokenizers` package (pip install tokenizers)") from exc
        try:
            self._tok = _HFTokenizer.from_str(json_text)
        except Exception as exc:  # the library raises its own exception type
            raise ValueError(f"not a usable tokenizer.json: {exc}") from None
        self._tok.no_truncation()
        self._tok.no_padding()
        self._special = add_special_tokens

    def encode(self, text: str, max_units: int) -> tuple[bytes, float]:
        head = text[: max_units * self._CHARS_PER_TOKEN_BUDGET]
        ids = self._tok.encode(head, add_special_tokens=self._special).ids
        total = float(len(ids)) if len(head) == len(text) else len(ids) * len(text) / max(len(head), 1)
        return np.asarray(ids[:max_units], dtype=">u4").tobytes(), total


def render_chat(messages: list, chat_format: str) -> str:
    """The text an engine tokenizes for a chat, in one of `CHAT_FORMATS`.

    * `simulator`: ``<|role|>\\n{content}\\n`` per message, as `extproc_router.simulator` renders it;
    * `chatml`: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message and the generation prompt
      ``<|im_start|>assistant\\n`` (Qwen-style templates that add no default system prompt).

    Content given as parts contributes its text parts joined with a newline. A template the router
    does not reproduce gives no precise match at all (never a wrong one): the pods are then routed
    by load and the approximate index's history is not used for them.
    """
    parts: list[str] = []
    for message in messages:
        if not isinstance(message, dict):
            continue
        role = message.get("role", "")
        content = message.get("content")
        if isinstance(content, list):
            content = "\n".join(p["text"] for p in content
                                if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str))
        elif not isinstance(content, str):
            content = ""
        if chat_format == CHAT_CHATML:
            parts.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
        else:
            parts.append(f"<|{role}|>\n{content}\n")
    if chat_format == CHAT_CHATML:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


class EngineTokenizer:
    """A request's prompt as the engine's token ids: chat rendered in `chat_format`, completion text
    as it is (a list of strings joined by newlines), token-id prompts used as they are."""

    __slots__ = ("chat_format", "tokenizer")

    def __init__(self, tokenizer: Tokenizer, chat_format: str = CHAT_SIMULATOR) -> None:
        if chat_format not in CHAT_FORMATS:
            raise ValueError(f"unknown chat format {chat_format!r}; valid: {', '.join(CHAT_FORMATS)}")
        if tokenizer.unit_bytes != 4:
            raise ValueError("an engine tokenizer must produce token ids (4 bytes each)")
        self.tokenizer = tokenizer
        self.chat_format = chat_format

    def encode_body(self, body: dict | None, max_tokens: int) -> tuple[bytes, float] | None:
        """The first `max_tokens` ids as 4-byte big-endian integers and the prompt's length in
        tokens; None when the body holds nothing this tokenizer can render."""
        if not body:
            return None
        messages = body.get("messages")
        if isinstance(messages, list):
            return self.tokenizer.encode(render_chat(messages, self.chat_format), max_tokens)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, max_tokens)
        if isinstance(prompt, list) and prompt:
            if all(isinstance(p, str) for p in prompt):
                return self.tokenizer.encode("\n".join(prompt), max_tokens)
            flat = [t for p in prompt for t in p] if isinstance(prompt[0], list) else prompt
            try:
                ids = np.asarray(flat[:max_tokens], dtype=np.int64)
            except (TypeError, ValueError, OverflowError):
                return None
            if ids.ndim != 1 or (len(ids) and (ids.min() < 0 or ids.max() >= 2**32)):
                return None
            return ids.astype(">u4").tobytes(), float(len(flat))
        return None


def make_engine_tokenizer(spec: str, chat_format: str = CHAT_SIMULATOR, *,
                          json_text: str | None = None) -> EngineTokenizer:
    """`cl100k`, `bytes`, or (with the file's `json_text`, read by the caller) a tokenizer.json."""
    if json_text is not None:
        return EngineTokenizer(HuggingFaceTokenizer(json_text), chat_format)
    if spec == "cl100k":
        return EngineTokenizer(TiktokenTokenizer(), chat_format)
    if spec == "bytes":
        return EngineTokenizer(ByteIdsTokenizer(), chat_format)
    raise ValueError(f"unknown engine tokenizer {spec!r}; valid: {', '.join(ENGINE_TOKENIZERS)} or a tokenizer.json")
