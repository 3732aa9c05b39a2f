"""Strategy registry: one file per strategy, registered here by name."""

from __future__ import annotations

from routing.strategies.base import Strategy
from routing.strategies.least_request import LeastRequestStrategy
from routing.strategies.pd import PDStrategy
from routing.strategies.prefix_cache import SEL_PD_PREFILL, PrefixCacheSettings, PrefixCacheStrategy
from routing.strategies.random import RandomStrategy
from routing.tokenizers import count_tokens


def builtin_strategies(*, prefix_cache: PrefixCacheSettings | None = None) -> dict[str, Strategy]:
    """Every strategy this build implements, by the name clients use in `routing-strategy`.

    ValueError (naming the variable) for bad `AIBRIX_PREFIX_CACHE_*` settings."""
    prefix = PrefixCacheStrategy(prefix_cache)
    # pd shares the prefix index: the prefill pod is chosen by what prefix-cache routing sent where,
    # and pd's prefill picks are recorded in the same index.
    pd = PDStrategy(prompt_tokens=count_tokens, prefill_match=prefix.match_shares,
                    observe_prefill=lambda request, pod: prefix.observe(request, pod, SEL_PD_PREFILL))
    strategies: list[Strategy] = [RandomStrategy(), LeastRequestStrategy(), prefix, pd]
    return {s.name: s for s in strategies}


__all__ = ["Strategy", "builtin_strategies"]
