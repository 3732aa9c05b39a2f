"""The prefix index (routing/prefix_index.py): longest-prefix match, TTL, capacity, merge, live blocks."""

from __future__ import annotations

import tracemalloc

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routing.prefix_index import PrefixIndex
from tests.unit.routing.prefix_cache_helpers import hashes


def test_index_match_is_longest_prefix_per_pod() -> None:
    idx = PrefixIndex(capacity=1000, ttl_seconds=60)
    h = hashes(20, 1)
    idx.add(h, "ns/a", 0.0)
    idx.add(h[:5], "ns/b", 0.0)
    assert idx.match(h, ["ns/a", "ns/b", "ns/unknown"], 1.0) == {"ns/a": 20, "ns/b": 5}
    other = h.copy()
    other[3] ^= np.uint64(1)  # diverges at block 3
    assert idx.match(other, ["ns/a", "ns/b"], 1.0) == {"ns/a": 3, "ns/b": 3}
    assert idx.match(hashes(20, 2), ["ns/a", "ns/b"], 1.0) == {}
    assert len(idx) == 25 and idx.pod_entry_counts() == {"ns/a": 20, "ns/b": 5}


def test_index_ttl_expiry() -> None:
    idx = PrefixIndex(capacity=1000, ttl_seconds=60)
    h = hashes(10, 1)
    idx.add(h, "ns/a", 0.0)
    idx.add(h[:4], "ns/a", 50.0)  # refreshes the first 4 blocks only
    assert idx.match(h, ["ns/a"], 59.0) == {"ns/a": 10}
    assert idx.match(h, ["ns/a"], 61.0) == {"ns/a": 4}  # expired entries never match, swept or not
    assert idx.evict_expired(61.0) == 6 and len(idx) == 4
    # Without anyone calling evict_expired, adds sweep what expired (at most once a second).
    idx.add(hashes(3, 9), "ns/b", 200.0)
    assert len(idx) == 3 and idx.stats.evicted_ttl == 10


def test_index_capacity_evicts_least_recently_used_and_trims_chains_from_the_tail() -> None:
    idx = PrefixIndex(capacity=64, ttl_seconds=1e9)
    a, b, c = hashes(24, 1), hashes(24, 2), hashes(24, 3)
    idx.add(a, "ns/p", 1.0)
    idx.add(b, "ns/p", 2.0)
    idx.add(a, "ns/p", 3.0)  # a is now more recent than b
    idx.add(c, "ns/p", 4.0)  # 72 > 64: b's entries go first, deepest blocks first
    assert len(idx) <= 64
    assert idx.match(a, ["ns/p"]) == {"ns/p": 24} and idx.match(c, ["ns/p"]) == {"ns/p": 24}
    kept = idx.match(b, ["ns/p"]).get("ns/p", 0)
    assert 0 < kept < 24  # b lost its tail, not its start, so its prefix still matches
    assert idx.stats.evicted_capacity == 48 + 24 - len(idx)


def test_index_remove_pod_and_merge_and_drain() -> None:
    idx = PrefixIndex(capacity=1000, track_additions=True)
    h = hashes(8, 1)
    idx.add(h, "ns/a", 10.0)
    idx.add(h, "ns/b", 10.0)
    assert idx.remove_pod("ns/a") == 8 and len(idx) == 8 and idx.match(h, ["ns/a", "ns/b"]) == {"ns/b": 8}
    drained = idx.drain_additions()
    assert [(d.pod_key, len(d.hashes), d.timestamp) for d in drained] == [("ns/a", 8, 10.0), ("ns/b", 8, 10.0)]
    assert idx.drain_additions() == []
    # A remote replica's delta: newer timestamps win, older ones do not rewind; not re-announced.
    assert idx.merge(h[:4], "ns/c", 20.0) == 4 and idx.merge(h[:4], "ns/b", 5.0) == 0
    assert idx.match(h, ["ns/b"], now=10.0 + idx.ttl_seconds - 1) == {"ns/b": 8}
    assert idx.drain_additions() == []
    assert idx.merge(h, "ns/d", 1.0, now=1.0 + idx.ttl_seconds + 1) == 0  # already expired: ignored


def test_index_memory_per_entry_is_small() -> None:
    n = 100_000
    tracemalloc.start()
    idx = PrefixIndex(capacity=n)
    for i in range(n // 1000):
        idx.add(hashes(1000, i), f"ns/pod-{i % 8}", 1.0)
    used = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(idx) >= n * 0.98
    assert used / len(idx) <= 100, used / len(idx)


ops = st.lists(st.tuples(st.sampled_from(["add", "add", "add", "repeat", "merge", "remove", "expire"]),
                         st.integers(0, 5), st.integers(1, 40), st.integers(0, 3)), max_size=60)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(capacity=st.integers(1, 100), ops=ops)
def test_index_never_exceeds_its_bound(capacity: int, ops: list[tuple[str, int, int, int]]) -> None:
    idx = PrefixIndex(capacity=capacity, ttl_seconds=30)
    now = 0.0
    for op, seed, n, pod in ops:
        now += 7.0
        h = hashes(n, seed)  # the same seed repeats chains: refreshes and shared prefixes
        key = f"ns/p{pod}"
        if op == "add":
            before = idx.stats.evicted_overflow
            idx.add(h, key, now)
            if idx.stats.evicted_overflow == before:
                assert idx.match(h, [key], now) == {key: min(n, capacity)}
        elif op == "repeat":  # a caller passing a hash twice must not get it stored twice
            idx.add(np.concatenate([h, h[:3]]), key, now)
        elif op == "merge":
            idx.merge(h, key, now - 10)
        elif op == "remove":
            idx.remove_pod(key)
            assert idx.match(h, [key], now) == {}
        else:
            idx.evict_expired(now)
        assert 0 <= len(idx) <= capacity
        live = idx._keys[idx._pods != 0xFFFF]
        assert len(idx) == len(live) == len(np.unique(live))
        assert idx.live_blocks(now) == brute_live(idx, now)


def brute_live(idx: PrefixIndex, now: float) -> dict[str, int]:
    """`live_blocks` by a scan of the table: entries whose last-access bucket is within the horizon."""
    if not len(idx):
        return {}
    bw = idx.live_horizon / 30
    lo = np.floor((now - idx.live_horizon) / bw) + 1
    out = {}
    for key, pid in idx._pod_ids.items():
        mine = idx._pods == pid
        out[key] = int(np.count_nonzero(mine & (np.floor(idx._ts / bw) >= lo)))
    return out


def test_live_blocks_follow_inserts_refreshes_and_evictions() -> None:
    idx = PrefixIndex(capacity=1000, ttl_seconds=600, live_horizon=300)
    idx.add(hashes(40, 1), "a", 0.0)
    idx.add(hashes(10, 2), "b", 0.0)
    assert idx.live_blocks(1.0) == {"a": 40, "b": 10}
    idx.add(hashes(20, 1), "a", 200.0)  # 20 of a's blocks touched again: still 40 distinct
    assert idx.live_blocks(200.0) == {"a": 40, "b": 10}
    # 320 s: the blocks last touched at 0 s have left the window, those touched at 200 s not.
    assert idx.live_blocks(320.0) == {"a": 20, "b": 0}
    idx.remove_pod("a")
    assert idx.live_blocks(320.0) == {"b": 0}
    idx.add(hashes(5, 3), "b", 321.0)
    idx.evict_expired(321.0 + 600 - 10)  # the 0 s blocks expire, the 321 s ones stay
    assert idx.live_blocks(330.0) == {"b": 5} == brute_live(idx, 330.0)
    idx.clear()
    assert idx.live_blocks(330.0) == {} and len(idx) == 0
    idx.add(hashes(3, 4), "b", 331.0)
    assert idx.live_blocks(331.0) == {"b": 3}
