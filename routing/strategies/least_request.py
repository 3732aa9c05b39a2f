"""`least-request`: fewest in-flight requests counted by this router, random tie-break."""

from __future__ import annotations

from collections.abc import Sequence

from routing.pods import Pod
from routing.strategies.base import Choice, DecisionContext


class LeastRequestStrategy:
    name = "least-request"
    higher_is_better = False

    def pick(self, ctx: DecisionContext, pods: Sequence[Pod]) -> Choice:
        load = ctx.load
        best: list[Pod] = []
        best_n = -1
        for pod in pods:
            n = load.inflight(pod.key)
            if best_n < 0 or n < best_n:
                best, best_n = [pod], n
            elif n == best_n:
                best.append(pod)
        return Choice(best[ctx.rng.randrange(len(best))] if len(best) > 1 else best[0])

    def score(self, ctx: DecisionContext, pods: Sequence[Pod]) -> list[float]:
        load = ctx.load
        return [float(load.inflight(p.key)) for p in pods]
