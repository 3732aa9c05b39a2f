"""Strategy registry: one file per strategy, registered here by name."""

from __future__ import annotations

from routing.strategies.base import Strategy
from routing.strategies.least_request import LeastRequestStrategy
from routing.strategies.prefix_cache import PrefixCacheSettings, PrefixCacheStrategy
from routing.strategies.random import RandomStrategy


def builtin_strategies(*, prefix_cache: PrefixCacheSettings | None = None) -> dict[str, Strategy]:
    """Every strategy this build implements, by the name clients use in `routing-strategy`.

    ValueError (naming the variable) for bad `AIBRIX_PREFIX_CACHE_*` settings."""
    strategies: list[Strategy] = [RandomStrategy(), LeastRequestStrategy(), PrefixCacheStrategy(prefix_cache)]
    return {s.name: s for s in strategies}


__all__ = ["Strategy", "builtin_strategies"]
