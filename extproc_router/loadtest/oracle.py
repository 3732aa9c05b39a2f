"""The oracle hit rates: what an ideal router could reach with an infinite cache, and with a finite one.

*Infinite cache* (`Oracle.run`): an ideal router sends every request to a pod that already holds
the longest cached prefix of its prompt, and no block is ever evicted, so a prompt's cached part
is the longest run of its leading blocks that some earlier request also had.

*Finite cache* (`Oracle.run_finite`, `lru_hits`): the same ideal router, but in front of one cache
as large as the whole fleet (pods x tokens per pod) that evicts like a pod does: least recently
used block first, where serving a request uses all its blocks and leaves its first block the most
recent and its last the least (vLLM frees a finished request's blocks tail first, so the end of
a prompt goes before its beginning). Requests are served one at a time in sending order, and no
request pins blocks while another one needs room. This is what is *reachable*: blocks evicted
before their reuse cost any router the hit. It is a reference rather than a strict bound: the
fleet's caches are separate (a prefix copied onto two pods takes room twice, and a router can
also isolate a scan on one pod, which a single LRU cannot).

Blocks are cut and hashed exactly as the simulated pods do it (``simulator.tokenizer``), so the
oracles and the pods' reported ``cached_tokens`` count the same thing and the achieved/oracle
ratios are meaningful.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
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
        return self.run_finite(bodies, None)

    def run_finite(self, bodies: Iterable[dict[str, Any]], capacity_tokens: int | None) -> list[tuple[int, int]]:
        """`run` with one LRU cache of ``capacity_tokens`` (see the module docstring); None: infinite."""
        blocks = [self.blocks(body) for body in bodies]
        capacity = None if capacity_tokens is None else capacity_tokens // self.block_size
        hits = lru_hits((hashes for _, hashes in blocks), capacity)
        return [(n, min(n, matched * self.block_size)) for (n, _), matched in zip(blocks, hits, strict=True)]


def lru_hits(chains: Iterable[Sequence[int]], capacity_blocks: int | None) -> list[int]:
    """Leading blocks of each chain found cached, serving the chains in order through one LRU cache.

    ``chains`` are chained block hashes (equal hashes mean equal prefixes). After a chain is
    served its blocks are the most recently used, its first block most of all; then the least
    recently used blocks go until ``capacity_blocks`` remain (None: nothing is ever evicted).
    """
    cache: OrderedDict[int, None] = OrderedDict()
    out: list[int] = []
    for hashes in chains:
        # Hashes are chained, so a block can only match if every block before it matched too.
        matched = 0
        for h in hashes:
            if h not in cache:
                break
            matched += 1
        out.append(matched)
        for h in reversed(hashes):
            cache[h] = None
            cache.move_to_end(h)
        if capacity_blocks is not None:
            while len(cache) > capacity_blocks:
                cache.popitem(last=False)
    return out


def hit_rate(pairs: Iterable[tuple[int, int]]) -> float | None:
    """Σ cached / Σ prompt tokens over (prompt, cached) pairs; None when there are no prompt tokens."""
    prompt = cached = 0
    for p, c in pairs:
        prompt += p
        cached += c
    return cached / prompt if prompt else None
