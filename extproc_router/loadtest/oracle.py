"""The oracle hit rate: the prefix-cache hit rate of an ideal router with an infinite cache.

Such a router would send every request to a pod that already holds the longest cached prefix of
its prompt, and no block would ever be evicted, so a prompt's cached part is the longest run of
its leading blocks that some earlier request also had. Blocks are cut and hashed exactly as the
simulated pods do it (``simulator.tokenizer``), so the oracle and the pods' reported
``cached_tokens`` count the same thing and the achieved/oracle ratio is meaningful.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import orjson


class Tokenizer(Protocol):
    """The part of ``simulator.tokenizer`` the oracle needs (a test may pass a stand-in)."""

    def render_prompt(self, kind: str, body: dict) -> str: ...

    def tokenize(self, text: str, kind: str = "cl100k") -> list[int]: ...

    def block_hashes(self, tokens: Sequence[int], block_size: int) -> list[int]: ...


def load_tokenizer() -> Tokenizer | None:
    """``simulator.tokenizer`` if it is there, else None (the report then says the oracle is n/a)."""
    try:
        return importlib.import_module("extproc_router.simulator.tokenizer")  # type: ignore[return-value]
    except ImportError:
        return None


class Oracle:
    """Counts, for requests in the order they were sent, the prompt tokens an ideal cache would hold.

    Tokenisation is memoised by body, so the arms of a ``--compare`` run (the same requests) pay
    for it once.
    """

    def __init__(self, tokenizer: Tokenizer, path: str, block_size: int = 16, tokenizer_kind: str = "cl100k") -> None:
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.tokenizer = tokenizer
        self.path = path
        self.block_size = block_size
        self.tokenizer_kind = tokenizer_kind
        self._memo: dict[bytes, tuple[int, list[int]]] = {}

    def blocks(self, body: dict[str, Any]) -> tuple[int, list[int]]:
        """(prompt tokens, chained hashes of its full blocks) of one request body."""
        key = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
        hit = self._memo.get(key)
        if hit is None:
            text = self.tokenizer.render_prompt(self.path, body)
            tokens = self.tokenizer.tokenize(text, self.tokenizer_kind)
            hit = (len(tokens), self.tokenizer.block_hashes(tokens, self.block_size))
            self._memo[key] = hit
        return hit

    def run(self, bodies: Iterable[dict[str, Any]]) -> list[tuple[int, int]]:
        """(prompt tokens, oracle-cached tokens) per body, for bodies in sending order, from a cold cache."""
        seen: set[int] = set()
        out: list[tuple[int, int]] = []
        for body in bodies:
            n_tokens, hashes = self.blocks(body)
            # Hashes are chained, so a block can only match if every block before it matched too.
            matched = 0
            for h in hashes:
                if h not in seen:
                    break
                matched += 1
            seen.update(hashes)
            out.append((n_tokens, min(n_tokens, matched * self.block_size)))
        return out


def hit_rate(pairs: Iterable[tuple[int, int]]) -> float | None:
    """Σ cached / Σ prompt tokens over (prompt, cached) pairs; None when there are no prompt tokens."""
    prompt = cached = 0
    for p, c in pairs:
        prompt += p
        cached += c
    return cached / prompt if prompt else None
