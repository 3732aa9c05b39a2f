"""Strategy registry: one file per strategy, registered here by name in one explicit list."""

from __future__ import annotations

import time
from collections.abc import Callable

from routing.prefix_index import PrefixIndex
from routing.strategies.base import Choice, DecisionContext, Observer, Picker, Planner, Reporter, Scorer
from routing.strategies.least_request import LeastRequestStrategy
from routing.strategies.pd import PDStrategy
from routing.strategies.prefix_cache import SEL_PD_PREFILL, PrefixCacheSettings, PrefixCacheStrategy
from routing.strategies.random import RandomStrategy
from routing.strategies.session_affinity import SessionAffinityStrategy
from routing.tokenizers import count_tokens

Strategy = Picker | Planner


def builtin_strategies(*, prefix_cache: PrefixCacheSettings | None = None, index: PrefixIndex | None = None,
                       clock: Callable[[], float] = time.time) -> dict[str, Strategy]:
    """Every strategy this build implements, by the name clients use in `routing-strategy`.
    `index` is the router's prefix index, shared by `prefix-cache` and `pd`; `clock` the wall clock
    its entries are stamped with.

    ValueError (naming the variable) for bad `AIBRIX_PREFIX_CACHE_*` settings."""
    prefix = PrefixCacheStrategy(prefix_cache, index=index, clock=clock)
    # pd's prefill pod is chosen by what prefix-cache routing sent where, and pd's prefill picks are
    # recorded in the same index.
    pd = PDStrategy(prompt_tokens=count_tokens, prefill_match=prefix.match_shares,
                    observe_prefill=lambda ctx, pod: prefix.observe(ctx, pod, SEL_PD_PREFILL))
    strategies: list[Strategy] = [RandomStrategy(), LeastRequestStrategy(), prefix, pd, SessionAffinityStrategy()]
    return {s.name: s for s in strategies}


__all__ = ["Choice", "DecisionContext", "Observer", "Picker", "Planner", "Reporter", "Scorer", "Strategy",
           "builtin_strategies"]
