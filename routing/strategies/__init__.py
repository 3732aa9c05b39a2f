"""Strategy registry: one file per strategy, registered here by name."""

from __future__ import annotations

from routing.strategies.base import Strategy
from routing.strategies.least_request import LeastRequestStrategy
from routing.strategies.random import RandomStrategy


def builtin_strategies() -> dict[str, Strategy]:
    """Every strategy this build implements, by the name clients use in `routing-strategy`."""
    strategies: list[Strategy] = [RandomStrategy(), LeastRequestStrategy()]
    return {s.name: s for s in strategies}


__all__ = ["Strategy", "builtin_strategies"]
