"""Weighted multi-strategy values such as `least-request:2,prefix-cache:1` (reference §4 item 17).

Every listed strategy scores every candidate pod; scores are min-max normalised per strategy (a
lower-is-better score is inverted), multiplied by the weight and summed; the top pod wins, ties
broken at random. A strategy that only makes sense alone (a planner such as `pd`) cannot be mixed.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from routing.errors import RoutingError

MAX_WEIGHT = 1_000_000


@dataclass(frozen=True, slots=True)
class WeightedStrategy:
    name: str
    weight: int


def _bad(message: str) -> RoutingError:
    return RoutingError(400, message, code="invalid_routing_strategy", param="routing-strategy", cause="routing")


def is_multi(spec: str) -> bool:
    return "," in spec or ":" in spec


def parse_spec(spec: str, known: Sequence[str], solo: Collection[str] = ()) -> list[WeightedStrategy]:
    """Parse `name[:weight],...`; a missing weight is 1, weight 0 drops the entry; names in `solo`
    cannot be combined. Raises RoutingError."""
    out: list[WeightedStrategy] = []
    seen: set[str] = set()
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            raise _bad(f"empty entry in routing strategy {spec!r}; expected name[:weight],name[:weight]")
        name, sep, weight_s = item.partition(":")
        name = name.strip()
        if name not in known:
            raise _bad(f"incorrect routing strategy {name!r} in {spec!r}; valid strategies: {', '.join(sorted(known))}")
        if name in seen:
            raise _bad(f"routing strategy {name!r} listed twice in {spec!r}")
        seen.add(name)
        weight = 1
        if sep:
            weight_s = weight_s.strip()
            if not weight_s.isdigit() or int(weight_s) > MAX_WEIGHT:
                raise _bad(f"weight {weight_s!r} of {name!r} must be an integer from 0 to {MAX_WEIGHT}")
            weight = int(weight_s)
        if name in solo and len(spec.split(",")) > 1:
            raise _bad(f"{name!r} cannot be combined with other strategies")
        if weight:
            out.append(WeightedStrategy(name, weight))
    if not out:
        raise _bad(f"every weight in {spec!r} is 0; at least one strategy needs a positive weight")
    return out


def normalise(scores: Sequence[float], higher_is_better: bool) -> list[float]:
    """Min-max to [0, 1] with 1 = best; all-equal scores give every pod 1."""
    lo, hi = min(scores), max(scores)
    if hi == lo:
        return [1.0] * len(scores)
    span = hi - lo
    if higher_is_better:
        return [(s - lo) / span for s in scores]
    return [(hi - s) / span for s in scores]


def combine(per_strategy: Sequence[tuple[int, list[float]]], rng: random.Random) -> int:
    """Index of the winning pod given (weight, normalised scores) per strategy."""
    n = len(per_strategy[0][1])
    totals = [0.0] * n
    for weight, scores in per_strategy:
        for i, s in enumerate(scores):
            totals[i] += weight * s
    best = max(totals)
    winners = [i for i, t in enumerate(totals) if t >= best - 1e-12]
    return winners[rng.randrange(len(winners))] if len(winners) > 1 else winners[0]
