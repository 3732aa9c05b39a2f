"""Synthetic traces in the Mooncake format (`loadtest.traces`) for tests and benchmarks.

Three kinds, each a known cache pattern (hash ids are handed out consecutively, as in Mooncake's
traces, so an id names one block after one prefix):

* ``multi-turn``: ``users`` conversations of ``turns`` turns behind one system prompt of
  ``system_blocks`` blocks shared by everyone. Turn k resends the conversation so far (every
  earlier question of ``question_blocks`` blocks and answer of ``answer_blocks`` blocks) plus a new
  question, so it extends turn k-1 exactly. Conversations start as Poisson arrivals at ``rate``
  per second; a user's turns are ``turn_gap_s`` apart on average (exponential), long enough for
  other users' traffic to push a conversation out of a small cache before its next turn.
* ``shared-prompts``: ``requests`` requests at Poisson ``rate``, each one of ``groups`` system
  prompts of ``system_blocks`` blocks (group popularity Zipf with exponent ``zipf``; 0: uniform)
  followed by a question of ``question_blocks`` blocks of its own.
* ``eviction``: documents of ``doc_blocks`` blocks whose total is ``working_set`` times the fleet's
  KV capacity ``capacity_tokens``, each request a document plus a question of its own. Requests
  sweep the documents in a fixed cycle (a scan: a document comes back only after every other one
  has passed, so under LRU it has always been evicted by then: the follow-ups after eviction);
  with probability ``hot_fraction`` a request instead revisits one of the few documents read
  last (which a cache of that capacity does still hold). ``requests`` defaults to two sweeps.

Every request's last block is cut short by a random part of a block (prompts are rarely
block-aligned); the next turn of a conversation still extends it exactly, since a cut block is
a prefix of the whole one. ``output_tokens`` is every request's ``output_length``.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from extproc_router.loadtest.traces import TraceRequest

__all__ = ["TRACE_KINDS", "TraceGenSpec", "generate_trace", "trace_stats"]

TraceKind = Literal["multi-turn", "shared-prompts", "eviction"]
TRACE_KINDS: tuple[str, ...] = ("multi-turn", "shared-prompts", "eviction")


@dataclass(frozen=True)
class TraceGenSpec:
    """What `generate_trace` makes. Lengths are in blocks of ``block_tokens`` tokens unless named tokens."""

    kind: TraceKind = "shared-prompts"
    seed: int = 0
    block_tokens: int = 512
    output_tokens: int = 64
    rate: float = 2.0
    """Poisson arrivals per second: requests (shared-prompts, eviction) or conversations (multi-turn)."""
    requests: int | None = None
    """shared-prompts: requests (default 200); eviction: requests (default two sweeps of the documents)."""
    # multi-turn
    users: int = 20
    turns: int = 5
    turn_gap_s: float = 60.0
    answer_blocks: int = 1
    # shared by multi-turn and shared-prompts
    system_blocks: int = 4
    question_blocks: int = 1
    # shared-prompts
    groups: int = 8
    zipf: float = 1.0
    # eviction
    capacity_tokens: int = 4 * 65536
    """The fleet's KV capacity the working set is sized against (pods x per-pod tokens)."""
    working_set: float = 4.0
    doc_blocks: int = 8
    hot_fraction: float = 0.25

    def validate(self) -> None:
        """ValueError for a spec that cannot make a trace."""
        if self.kind not in TRACE_KINDS:
            raise ValueError(f"unknown trace kind {self.kind!r}; choose one of {', '.join(TRACE_KINDS)}")
        positive = {
            "block_tokens": self.block_tokens, "output_tokens": self.output_tokens, "users": self.users,
            "turns": self.turns, "groups": self.groups, "doc_blocks": self.doc_blocks,
            "question_blocks": self.question_blocks, "capacity_tokens": self.capacity_tokens,
        }  # fmt: skip
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name, value in (("system_blocks", self.system_blocks), ("answer_blocks", self.answer_blocks)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not self.rate > 0 or not self.working_set > 0 or not self.turn_gap_s >= 0:
            raise ValueError("rate and working_set must be > 0, turn_gap_s >= 0")
        if not 0.0 <= self.hot_fraction <= 1.0 or not self.zipf >= 0:
            raise ValueError("hot_fraction must lie in [0, 1] and zipf be >= 0")
        if self.requests is not None and self.requests < 1:
            raise ValueError("requests must be >= 1")


class _Ids:
    """Consecutive hash ids, as Mooncake's traces hand them out."""

    def __init__(self) -> None:
        self._next = itertools.count()

    def take(self, n: int) -> list[int]:
        return [next(self._next) for _ in range(n)]


def _request(rng: random.Random, at_s: float, hash_ids: list[int], spec: TraceGenSpec) -> dict[str, Any]:
    # The last block is cut short by up to half a block: prompts are rarely block-aligned.
    cut = rng.randint(0, spec.block_tokens // 2) if hash_ids else 0
    length = max(1, len(hash_ids) * spec.block_tokens - cut)
    return {"at_s": at_s, "input_length": length, "hash_ids": hash_ids}


def _multi_turn(spec: TraceGenSpec, rng: random.Random) -> list[dict[str, Any]]:
    ids = _Ids()
    system = ids.take(spec.system_blocks)
    out = []
    start = 0.0
    for _ in range(spec.users):
        start += rng.expovariate(spec.rate)
        at, history = start, list(system)
        for turn in range(spec.turns):
            if turn:
                at += rng.expovariate(1.0 / spec.turn_gap_s) if spec.turn_gap_s > 0 else 0.0
            question = ids.take(spec.question_blocks)
            out.append(_request(rng, at, history + question, spec))
            history += question + ids.take(spec.answer_blocks)
    return out


def _zipf_weights(n: int, exponent: float) -> list[float]:
    return [1.0 / (rank**exponent) for rank in range(1, n + 1)]


def _shared_prompts(spec: TraceGenSpec, rng: random.Random) -> list[dict[str, Any]]:
    ids = _Ids()
    systems = [ids.take(spec.system_blocks) for _ in range(spec.groups)]
    weights = _zipf_weights(spec.groups, spec.zipf)
    out, at = [], 0.0
    for _ in range(spec.requests or 200):
        at += rng.expovariate(spec.rate)
        (group,) = rng.choices(range(spec.groups), weights)
        out.append(_request(rng, at, systems[group] + ids.take(spec.question_blocks), spec))
    return out


def _eviction(spec: TraceGenSpec, rng: random.Random) -> list[dict[str, Any]]:
    ids = _Ids()
    doc_tokens = spec.doc_blocks * spec.block_tokens
    n_docs = max(2, math.ceil(spec.working_set * spec.capacity_tokens / doc_tokens))
    docs = [ids.take(spec.doc_blocks) for _ in range(n_docs)]
    # The hot set: the documents read last that a cache of capacity_tokens still holds with room to spare.
    hot = max(1, spec.capacity_tokens // (4 * (doc_tokens + spec.question_blocks * spec.block_tokens)))
    recent: OrderedDict[int, None] = OrderedDict()
    sweep = itertools.cycle(range(n_docs))
    out, at = [], 0.0
    for _ in range(spec.requests or 2 * n_docs):
        at += rng.expovariate(spec.rate)
        revisit = recent and rng.random() < spec.hot_fraction
        doc = rng.choice(list(recent)) if revisit else next(sweep)
        recent[doc] = None
        recent.move_to_end(doc)
        if len(recent) > hot:
            recent.popitem(last=False)
        out.append(_request(rng, at, docs[doc] + ids.take(spec.question_blocks), spec))
    return out


def generate_trace(spec: TraceGenSpec) -> list[TraceRequest]:
    """The trace ``spec`` describes, in arrival order; the same spec always gives the same trace."""
    spec.validate()
    rng = random.Random(f"trace-gen:{spec.kind}:{spec.seed}")
    make = {"multi-turn": _multi_turn, "shared-prompts": _shared_prompts, "eviction": _eviction}[spec.kind]
    rows = sorted(make(spec, rng), key=lambda r: r["at_s"])  # stable: a conversation's ties keep their order
    return [
        TraceRequest(
            line=i + 1,
            timestamp_ms=float(round(row["at_s"] * 1000.0)),
            input_length=row["input_length"],
            output_length=spec.output_tokens,
            hash_ids=tuple(row["hash_ids"]),
        )
        for i, row in enumerate(rows)
    ]


def trace_stats(requests: Sequence[TraceRequest], block_tokens: int, capacity_tokens: int | None = None) -> dict:
    """What a trace asks of a cache, counted in its own blocks (no tokenizer).

    ``hit_infinite``: the share of prompt tokens in blocks an earlier request had (an infinite
    cache's hit rate); ``hit_lru``: the same with one LRU cache of ``capacity_tokens``.
    """
    from extproc_router.loadtest.oracle import lru_hits

    prompt = sum(r.input_length for r in requests)
    unique = len({h for r in requests for h in r.hash_ids})

    def covered(hits: Iterable[int]) -> int:
        return sum(min(r.input_length, n * block_tokens) for r, n in zip(requests, hits, strict=True))

    chains = [list(r.hash_ids) for r in requests]
    stats: dict[str, Any] = {
        "requests": len(requests),
        "duration_s": (requests[-1].timestamp_ms - requests[0].timestamp_ms) / 1000.0 if requests else 0.0,
        "prompt_tokens": prompt,
        "output_tokens": sum(r.output_length for r in requests),
        "unique_blocks": unique,
        "working_set_tokens": unique * block_tokens,
        "hit_infinite": round(covered(lru_hits(chains, None)) / prompt, 4) if prompt else None,
    }
    if capacity_tokens is not None:
        blocks = capacity_tokens // block_tokens
        stats["capacity_tokens"] = capacity_tokens
        stats["hit_lru"] = round(covered(lru_hits(chains, blocks)) / prompt, 4) if prompt else None
    return stats
