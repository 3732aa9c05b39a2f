"""`random`: a uniform pick among ready pods (the default when nothing selects a strategy)."""

from __future__ import annotations

from collections.abc import Sequence

from routing.pods import Pod
from routing.strategies.base import Choice, DecisionContext


class RandomStrategy:
    name = "random"
    higher_is_better = True

    def pick(self, ctx: DecisionContext, pods: Sequence[Pod]) -> Choice:
        return Choice(pods[ctx.rng.randrange(len(pods))] if len(pods) > 1 else pods[0])

    def score(self, ctx: DecisionContext, pods: Sequence[Pod]) -> list[float]:
        rng = ctx.rng
        return [rng.random() for _ in pods]
