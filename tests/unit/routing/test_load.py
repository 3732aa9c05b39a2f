"""In-flight load and booked prefill per pod (routing/load.py)."""

from __future__ import annotations

from routing.load import LoadTracker
from tests.unit.routing.prefix_cache_helpers import Clock

P0, P1 = "default/pod-0", "default/pod-1"


def test_queued_prefill_drains_but_never_exceeds_what_is_booked() -> None:
    clock = Clock(0.0)
    load = LoadTracker(prefill_rate=1000.0, clock=clock)
    load.acquire("p", 3000)
    clock.t = 1.0
    load.acquire("p", 500)  # 2000 left + 500
    assert load.queued_prefill("p") == 2500 and load.prefill_tokens("p") == 3500
    load.release("p", 3000)  # the first request ended early: at most 500 can still be queued
    assert load.queued_prefill("p") == 500
    clock.t = 10.0
    assert load.queued_prefill("p") == 0 and load.inflight("p") == 1
    assert LoadTracker().queued_prefill("x") == 0  # rate 0: booked tokens count until release


def test_load_tracker_adds_the_remote_part_and_keeps_its_own() -> None:
    now = [100.0]
    load = LoadTracker(prefill_rate=1000.0, clock=lambda: now[0])
    load.acquire(P0, 500)
    load.set_remote({P0: 3, P1: 1}, {P0: 2000}, {P0: 1500.0})
    assert load.inflight(P0) == 4 and load.inflight(P1) == 1
    assert load.prefill_tokens(P0) == 2500
    assert load.queued_prefill(P0) == 2000.0
    now[0] += 1.0  # both parts drain at the prefill rate
    assert load.queued_prefill(P0) == 500.0
    assert load.snapshot() == {P0: 1} and load.prefill_snapshot() == {P0: 500} and load.total == 1
    load.set_remote({})  # replaced wholesale
    assert load.inflight(P1) == 0 and load.queued_prefill(P0) == 0.0
