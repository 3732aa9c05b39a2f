"""The strategy interface every routing algorithm implements."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

from routing.load import LoadTracker
from routing.pods import Pod
from routing.request import RoutingRequest


class Strategy(Protocol):
    """Picks one pod among ready candidates. Synchronous, no I/O: a pure function of its inputs."""

    name: str

    def pick(self, request: RoutingRequest, pods: Sequence[Pod], load: LoadTracker,
             rng: random.Random) -> Pod:
        """Return one of `pods` (never empty) for `request`."""
        ...


class ScoringStrategy(Strategy, Protocol):
    """A strategy that can also rank every pod, so it can be mixed with others by weight
    (`least-request:2,prefix-cache:1`)."""

    higher_is_better: bool

    def score(self, request: RoutingRequest, pods: Sequence[Pod], load: LoadTracker,
              rng: random.Random) -> list[float]:
        """One raw score per pod, in the order of `pods`."""
        ...
