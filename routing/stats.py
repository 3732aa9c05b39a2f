"""Per-pod figures the strategies read: this router's own load, and what each engine last reported.

One store per router. The router process fills the engine part from its `/metrics` scrape of every
ready pod (`update_engine`); strategies only read it, through the decision context. Keeping it here,
not on the strategies, means a new strategy gets the same signals without the process knowing it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from routing.kv_index import KvBlockIndex
from routing.load import LoadTracker


@dataclass(frozen=True, slots=True)
class EngineStats:
    """One scrape of one pod's engine metrics (vLLM names, SGLang's equivalents)."""

    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0  # 0..1
    scraped_at: float = 0.0
    kv_capacity_tokens: float = 0.0  # KV-cache size the engine reports; 0 = unknown
    # LoRA adapters with requests running or waiting (vLLM's lora_requests_info); discovery reads them
    lora_adapters: frozenset[str] = frozenset()


class PodStats:
    """In-flight load (`load`), the last engine scrape per pod (`engine`), KV capacities, and the
    blocks each engine reports holding in its KV-cache events (`kv_blocks`, fed by the subscribers).

    A pod missing from `engine` was not reachable in the last scrape: unknown, not idle. Capacities
    are merged across scrapes (a pod whose scrape failed keeps the capacity it reported, which does
    not change while it runs) and dropped with the pod. `default_kv_tokens` stands in for a pod that
    never reported one (AIBRIX_PREFIX_CACHE_POD_KV_TOKENS; 0: unknown).
    """

    __slots__ = ("_known", "default_kv_tokens", "engine", "kv_blocks", "kv_capacity", "load")

    def __init__(self, load: LoadTracker, default_kv_tokens: float = 0.0,
                 kv_blocks: KvBlockIndex | None = None) -> None:
        self.load = load
        self.kv_blocks = kv_blocks if kv_blocks is not None else KvBlockIndex()
        self.default_kv_tokens = default_kv_tokens
        self.engine: Mapping[str, EngineStats] = {}
        self.kv_capacity: dict[str, float] = {}
        self._known: set[str] | None = None  # None: no snapshot yet, every reported pod is kept

    def retain(self, keep: Iterable[str]) -> None:
        """The pod snapshot changed: forget what is known of pods that are gone."""
        self._known = set(keep)
        self.load.forget(self._known)
        self.kv_blocks.retain_pods(self._known)
        if not self.kv_capacity.keys() <= self._known:
            self.kv_capacity = {k: c for k, c in self.kv_capacity.items() if k in self._known}
        if not self.engine.keys() <= self._known:
            self.engine = {k: m for k, m in self.engine.items() if k in self._known}

    def update_engine(self, metrics: Mapping[str, EngineStats]) -> None:
        """A scrape round's results, by pod key (pods whose scrape failed are absent)."""
        known = self._known
        self.engine = metrics if known is None else {k: m for k, m in metrics.items() if k in known}
        for key, m in self.engine.items():
            if m.kv_capacity_tokens > 0:
                self.kv_capacity[key] = m.kv_capacity_tokens

    def capacity(self, pod_key: str) -> float:
        """KV-cache capacity in tokens: the engine's figure, else the configured default, else 0."""
        return self.kv_capacity.get(pod_key) or self.default_kv_tokens

    def has_capacity(self) -> bool:
        """Whether any pod's capacity is known (else the KV-pressure term has nothing to work with)."""
        return bool(self.kv_capacity) or self.default_kv_tokens > 0
