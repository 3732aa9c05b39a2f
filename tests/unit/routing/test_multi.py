"""Weighted multi-strategy specs (routing/multi.py): parsing, normalising and combining scores."""

from __future__ import annotations

import random

import pytest

from routing.errors import RoutingError
from routing.multi import combine, normalise, parse_spec


def test_multi_spec_parsing() -> None:
    known = ["random", "least-request", "prefix-cache", "pd"]
    assert [(w.name, w.weight) for w in parse_spec("least-request:2,prefix-cache", known)] == [
        ("least-request", 2), ("prefix-cache", 1)]
    assert [w.name for w in parse_spec("least-request:0,random:3", known)] == ["random"]
    for bad in ("least-request:x", "least-request:-1", "nope:1", "random,,least-request", "random:1,random:2",
                "pd,random", "random:0", "random:1000001"):
        with pytest.raises(RoutingError) as exc:
            parse_spec(bad, known, solo={"pd"})
        assert exc.value.status == 400


def test_multi_scores_match_hand_computation() -> None:
    # Pods A, B, C. least-request in-flight 0, 2, 4 (lower better) weight 2; prefix match 0.0, 1.0, 0.5 weight 1.
    lr = normalise([0, 2, 4], higher_is_better=False)
    pc = normalise([0.0, 1.0, 0.5], higher_is_better=True)
    assert lr == [1.0, 0.5, 0.0] and pc == [0.0, 1.0, 0.5]
    # totals: A = 2*1 + 0 = 2.0, B = 2*0.5 + 1 = 2.0, C = 0 + 0.5 = 0.5 -> tie A/B broken at random
    winners = {combine([(2, lr), (1, pc)], random.Random(s)) for s in range(50)}
    assert winners == {0, 1}
    assert combine([(1, lr), (3, pc)], random.Random(0)) == 1  # A 1, B 3.5, C 1.5
