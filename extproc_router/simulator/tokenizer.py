"""Prompt rendering, tokenization and chained block hashing of the simulated engine.

The load-test harness imports this module to compute the oracle prefix-cache hit rate, so the
three public functions are a shared API: the harness and the simulator must cut a prompt into
exactly the same blocks.

* `render_prompt` turns a request body into the text the engine tokenizes. Chat messages are
  rendered like a chat template (``<|role|>\\n{content}\\n`` per message, concatenated), so a
  multi-turn follow-up's text extends the previous turn's text and shares its blocks.
* `tokenize` gives exact cl100k ids (the ``bpe-openai`` package: Rust BPE with the vocabulary
  bundled, no download) or, as a fast fallback, UTF-8 bytes as ids.
* `block_hashes` cuts token ids into full blocks and hashes each block together with its
  parent's hash, as vLLM's prefix cache does, so equal hashes mean equal prefixes.
"""

from __future__ import annotations

import functools
import re
import sys
from array import array
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import xxhash

__all__ = ["TOKENIZER_KINDS", "block_hashes", "render_prompt", "tokenize"]

TOKENIZER_KINDS = ("cl100k", "bytes")
"""Values accepted by `tokenize` (and the simulator's ``--tokenizer``)."""

_ROOT_HASH = 0
"""Parent hash of block 0."""


# ----------------------------------------------------------------------------- rendering


def render_prompt(kind: str, body: dict[str, Any]) -> str:
    """The text the engine tokenizes for a request body.

    ``kind`` is ``"chat"`` (``/v1/chat/completions``) or ``"completions"`` (``/v1/completions``;
    ``"completion"`` is accepted too).

    * chat: ``<|role|>\\n{content}\\n`` for every message, concatenated; content given as an array
      of parts contributes its text parts joined with ``\\n`` (images and other parts carry no
      text). Turn N+1's rendering therefore starts with turn N's.
    * completions: the prompt; a list of prompts is joined with ``\\n``.

    Raises ValueError for an unknown kind or a completion prompt that is not text (token ids
    are already tokens: use them as they are).
    """
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise ValueError("chat body has no 'messages' array")
        return "".join(
            f"<|{message.get('role', '')}|>\n{_content_text(message.get('content'))}\n"
            for message in messages
            if isinstance(message, dict)
        )
    if kind in ("completions", "completion"):
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
            return "\n".join(prompt)
        raise ValueError("completion 'prompt' is not text (a string or an array of strings)")
    raise ValueError(f"unknown prompt kind {kind!r} (expected 'chat' or 'completions')")


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        )
    return ""


# ----------------------------------------------------------------------------- tokenization


def tokenize(text: str, kind: str = "cl100k") -> list[int]:
    """Token ids of ``text``: exact cl100k ids (``"cl100k"``) or its UTF-8 bytes (``"bytes"``).

    cl100k treats special-token text such as ``<|endoftext|>`` as ordinary text, as a server
    does with user content. Results of long texts are assembled from cached pieces (see
    `_Cl100k`), so a repeated prefix is not re-encoded; the ids are identical to encoding the
    whole text at once.
    """
    if kind == "bytes":
        return list(text.encode("utf-8", "surrogatepass"))
    if kind == "cl100k":
        return _cl100k().encode(text)
    raise ValueError(f"unknown tokenizer {kind!r} (expected one of {', '.join(TOKENIZER_KINDS)})")


@functools.cache
def _cl100k() -> _Cl100k:
    # Loading the vocabulary takes ~0.7 s, so it happens once per process, on first use.
    return _Cl100k()


class _Cl100k:
    """cl100k encoder with a cache of text pieces.

    Long texts are cut at points where cl100k's pre-tokenizer always starts a new pre-token
    (BPE merges never cross those), so encoding the pieces separately and concatenating gives
    the same ids as encoding the whole text. The cut points are found greedily from the start of
    the text, so two prompts sharing a long prefix share their leading pieces, and the cache
    turns the shared prefix (system prompt, document, earlier turns) into dictionary lookups.

    Safe cut points (the cl100k pattern is ``'s|'t|…|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}|
    ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+``):

    * after a newline that is followed by a non-space: no alternative continues past a newline
      into a non-newline character, and every whitespace run ending in that newline ends there;
    * before a space that sits between two letters: letter runs end at the space, and
      ``" word"`` starts a pre-token.
    """

    PIECE_CHARS = 2048
    """A piece is at least this long (the last one excepted); shorter texts are one piece."""
    CACHE_PIECES = 8192
    """Cached pieces (LRU); ~2 KiB of text and ~2 KiB of ids each, ~32 MiB at most."""
    MAX_ENCODE_CHARS = 200_000
    """bpe-openai refuses texts of 1M characters or 200k tokens; longer pieces are split further."""

    _CUT = re.compile(r"(?<=\n)(?=\S)|(?<=[^\W\d_])(?= [^\W\d_])")

    def __init__(self) -> None:
        import bpe_openai

        self._encoding = bpe_openai.get_encoding("cl100k_base")
        self._pieces: OrderedDict[str, array[int]] = OrderedDict()

    def encode(self, text: str) -> list[int]:
        if len(text) < self.PIECE_CHARS:
            return self._encode_uncached(text)
        ids: list[int] = []
        cache = self._pieces
        for piece in self._split(text):
            cached = cache.get(piece)
            if cached is None:
                cached = array("I", self._encode_uncached(piece))
                cache[piece] = cached
                if len(cache) > self.CACHE_PIECES:
                    cache.popitem(last=False)
            else:
                cache.move_to_end(piece)
            ids.extend(cached)
        return ids

    def _split(self, text: str) -> Iterator[str]:
        start, end = 0, len(text)
        while end - start >= 2 * self.PIECE_CHARS:
            cut = self._next_cut(text, start + self.PIECE_CHARS)
            if cut is None:
                break
            yield text[start:cut]
            start = cut
        yield text[start:]

    def _next_cut(self, text: str, pos: int) -> int | None:
        for match in self._CUT.finditer(text, pos):
            cut = match.start()
            # [^\W\d_] also matches a few non-letter numerics (e.g. "²"); cl100k's \p{L} does not.
            if text[cut - 1] == "\n" or (text[cut - 1].isalpha() and text[cut + 1].isalpha()):
                return cut
        return None

    def _encode_uncached(self, text: str) -> list[int]:
        if len(text) <= self.MAX_ENCODE_CHARS:
            return self._encoding.encode_ordinary(text)
        # Only a pathological prompt (a 200k-character piece without a safe cut point) gets
        # here; cutting it at arbitrary points changes a few ids near the cuts, nothing else.
        ids: list[int] = []
        for i in range(0, len(text), self.MAX_ENCODE_CHARS):
            ids.extend(self._encoding.encode_ordinary(text[i : i + self.MAX_ENCODE_CHARS]))
        return ids


# ----------------------------------------------------------------------------- block hashing


def block_hashes(tokens: Sequence[int], block_size: int, lora: str | None = None) -> list[int]:
    """Chained 64-bit hashes of the full ``block_size``-token blocks of ``tokens``.

    Block i's hash is ``xxh3_64(parent hash as 8 little-endian bytes + the block's token ids as
    uint32 little-endian)``, the parent of block 0 being 0; so a hash identifies the whole prefix
    up to the end of its block, not just the block. A trailing partial block is not hashed (vLLM
    only caches full blocks). Token ids must lie in 0..2**32-1.

    A LoRA adapter's request (``lora``: its name) starts the chain from a hash of that name instead:
    as in vLLM, whose block hashes include the adapter, its KV blocks are never the base model's nor
    another adapter's, whatever the tokens.
    """
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    num_blocks = len(tokens) // block_size
    if num_blocks == 0:
        return []
    try:
        packed = array("I", tokens[: num_blocks * block_size])
    except OverflowError:
        raise ValueError("token ids must lie in 0..2**32-1") from None
    if sys.byteorder == "big":
        packed.byteswap()
    data = packed.tobytes()
    stride = block_size * packed.itemsize
    digest = xxhash.xxh3_64_intdigest
    parent = _ROOT_HASH if lora is None else digest(b"lora\x00" + lora.encode("utf-8", "surrogatepass"))
    hashes: list[int] = []
    for offset in range(0, len(data), stride):
        parent = digest(parent.to_bytes(8, "little") + data[offset : offset + stride])
        hashes.append(parent)
    return hashes
