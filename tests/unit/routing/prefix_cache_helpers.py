"""Helpers of the `prefix-cache` tests: a router with the strategy on a settable clock, chat requests,
routing one and reading the match header, random hash chains."""

from __future__ import annotations

import random

import numpy as np
import orjson

from routing.load import LoadTracker
from routing.pods import Pod, PodSnapshot
from routing.request import CHAT_PATH, RoutingRequest, parse_body
from routing.router import Router, RoutingSettings
from routing.stats import EngineStats
from routing.strategies.base import DecisionContext
from routing.strategies.prefix_cache import MATCH_HEADER, PrefixCacheSettings, PrefixCacheStrategy

SYSTEM = "You are a careful assistant. Answer in full sentences and cite your sources. " * 40  # ~3 KiB


class Clock:
    """A settable wall clock for the strategy."""

    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_router(n: int = 4, *, model: str = "m", clock: Clock | None = None, seed: int = 7,
                **prefix: object) -> Router:
    clock = clock or Clock()
    settings = PrefixCacheSettings(**prefix)
    load = LoadTracker(prefill_rate=settings.prefill_tokens_per_s, clock=clock)
    router = Router(RoutingSettings(prefix_cache=settings), rng=random.Random(seed), load=load, clock=clock)
    pods = [Pod(f"{model}-{i}", f"10.0.0.{i + 1}:8000", model) for i in range(n)]
    router.update_snapshot(PodSnapshot.build(pods, {p.key for p in pods}, {model: None}))
    return router


def strategy_of(router: Router) -> PrefixCacheStrategy:
    s = router.strategies["prefix-cache"]
    assert isinstance(s, PrefixCacheStrategy)
    return s


def chat(*contents: str, model: str = "m") -> RoutingRequest:
    msgs = [{"role": "system" if i == 0 else ("user" if i % 2 else "assistant"), "content": c}
            for i, c in enumerate(contents)]
    return parse_body(CHAT_PATH, orjson.dumps({"model": model, "messages": msgs}))


def route(router: Router, request: RoutingRequest, release: bool = True) -> tuple[str, str]:
    d = router.decide(request, "prefix-cache")
    if release:
        router.release(d)
    return d.pod.name, d.echo[MATCH_HEADER]


def selection(header: str) -> str:
    return header.rpartition("sel=")[2]


def hashes(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 2**64 - 1, size=n, dtype=np.uint64)


def context(router: Router, request: RoutingRequest) -> DecisionContext:
    """A decision context over `router`'s state, for calling a strategy directly."""
    return DecisionContext(request, router.stats, router.rng)


def set_engine_waiting(router: Router, waiting: dict[str, float]) -> None:
    """As if the engine-metrics scrape had read these waiting queues (pod key -> requests)."""
    router.stats.update_engine({key: EngineStats(waiting=n) for key, n in waiting.items()})
