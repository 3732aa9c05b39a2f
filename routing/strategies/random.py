"""`random`: a uniform pick among ready pods (the default when nothing selects a strategy)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from routing.load import LoadTracker
from routing.pods import Pod
from routing.request import RoutingRequest


class RandomStrategy:
    name = "random"
    higher_is_better = True

    def pick(self, request: RoutingRequest, pods: Sequence[Pod], load: LoadTracker,
             rng: random.Random) -> Pod:
        return pods[rng.randrange(len(pods))] if len(pods) > 1 else pods[0]

    def score(self, request: RoutingRequest, pods: Sequence[Pod], load: LoadTracker,
              rng: random.Random) -> list[float]:
        return [rng.random() for _ in pods]
