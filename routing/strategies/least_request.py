"""`least-request`: fewest in-flight requests counted by this router, random tie-break."""

from __future__ import annotations

import random
from collections.abc import Sequence

from routing.load import LoadTracker
from routing.pods import Pod
from routing.request import RoutingRequest


class LeastRequestStrategy:
    name = "least-request"
    higher_is_better = False

    def pick(self, request: RoutingRequest, pods: Sequence[Pod], load: LoadTracker,
             rng: random.Random) -> Pod:
        best: list[Pod] = []
        best_n = -1
        for pod in pods:
            n = load.inflight(pod.key)
            if best_n < 0 or n < best_n:
                best, best_n = [pod], n
            elif n == best_n:
                best.append(pod)
        return best[rng.randrange(len(best))] if len(best) > 1 else best[0]

    def score(self, request: RoutingRequest, pods: Sequence[Pod], load: LoadTracker,
              rng: random.Random) -> list[float]:
        return [float(load.inflight(p.key)) for p in pods]
