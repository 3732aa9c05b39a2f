"""`prefix-cache` routing: tokenizers, chained block hashes, the prefix index, the strategy and its
load guards, settings, metrics, and one pass through the real stack."""

from __future__ import annotations

import random
import time
import tracemalloc

import aiohttp
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from ext_proc.metrics import PrefixCacheCollector
from extproc_router.config import ConfigError, build_config
from extproc_router.serve import prefix_cache_settings
from extproc_router.stack import LocalStack
from routing.block_hash import DEFAULT_HASH_SEED, chain_hashes
from routing.load import LoadTracker
from routing.pods import Pod, PodSnapshot
from routing.prefix_index import PrefixIndex
from routing.request import CHAT_PATH, COMPLETIONS_PATH, RoutingRequest, parse_body
from routing.router import Router, RoutingSettings
from routing.strategies.prefix_cache import MATCH_HEADER, PrefixCacheSettings, PrefixCacheStrategy
from routing.tokenizers import CharacterTokenizer

SYSTEM = "You are a careful assistant. Answer in full sentences and cite your sources. " * 40  # ~3 KiB


class Clock:
    """A settable wall clock for the strategy."""

    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_router(n: int = 4, *, model: str = "m", clock: Clock | None = None, seed: int = 7,
                **prefix: object) -> Router:
    clock = clock or Clock()
    settings = PrefixCacheSettings(**prefix)
    strategy = PrefixCacheStrategy(settings, clock=clock)
    load = LoadTracker(prefill_rate=settings.prefill_tokens_per_s, clock=clock)
    router = Router(RoutingSettings(prefix_cache=settings), rng=random.Random(seed), load=load)
    router.strategies[strategy.name] = strategy
    pods = [Pod(f"{model}-{i}", f"10.0.0.{i + 1}:8000", model) for i in range(n)]
    router.update_snapshot(PodSnapshot.build(pods, {p.key for p in pods}, {model: None}))
    return router


def strategy_of(router: Router) -> PrefixCacheStrategy:
    s = router.strategies["prefix-cache"]
    assert isinstance(s, PrefixCacheStrategy)
    return s


def chat(*contents: str, model: str = "m") -> RoutingRequest:
    msgs = [{"role": "system" if i == 0 else ("user" if i % 2 else "assistant"), "content": c}
            for i, c in enumerate(contents)]
    return parse_body(CHAT_PATH, orjson.dumps({"model": model, "messages": msgs}))


def route(router: Router, request: RoutingRequest, release: bool = True) -> tuple[str, str]:
    d = router.decide(request, "prefix-cache")
    if release:
        router.release(d)
    return d.pod.name, d.echo[MATCH_HEADER]


def selection(header: str) -> str:
    return header.rpartition("sel=")[2]


# -- hashing -------------------------------------------------------------------------------------

def test_chain_hashes_are_prefix_closed_model_scoped_and_stable() -> None:
    data = bytes(range(256)) * 4  # 1024 bytes: 8 blocks of 128
    h = chain_hashes(data, 128, "m")
    assert len(h) == 8 and h.dtype == np.uint64
    # A longer prompt with the same start has the same leading hashes; a change in block 2 changes
    # every hash from block 2 on, because each hash covers its parent.
    assert list(chain_hashes(data + b"more" * 100, 128, "m")[:8]) == list(h)
    changed = chain_hashes(data[:300] + b"X" + data[301:], 128, "m")
    assert list(changed[:2]) == list(h[:2]) and not set(changed[2:].tolist()) & set(h.tolist())
    # The model starts the chain: two models never share a hash.
    assert not set(chain_hashes(data, 128, "other").tolist()) & set(h.tolist())
    # Only full blocks; a cap on blocks hashed.
    assert len(chain_hashes(data[:127], 128, "m")) == 0 and len(chain_hashes(data, 128, "m", max_blocks=3)) == 3
    # The seed is fixed (not random per process): every replica, every version hashes alike.
    assert PrefixCacheSettings().hash_seed == DEFAULT_HASH_SEED
    assert int(chain_hashes(b"a" * 128, 128, "m")[0]) == 0xCBBCAC78B4308652
    assert int(chain_hashes(b"a" * 128, 128, "m", seed=1)[0]) != 0xCBBCAC78B4308652


def test_character_tokenizer_caps_work_and_handles_unicode() -> None:
    tok = CharacterTokenizer()
    data, tokens = tok.encode("héllo wörld ✓ 日本語", 1000)
    assert data == "héllo wörld ✓ 日本語".encode() and tokens == len(data) / 4
    data, tokens = tok.encode("日本語" * 1000, 100)  # 9000 bytes: only the first 100 are encoded
    assert len(data) == 100 and tokens == pytest.approx(9000 / 4)
    data, _ = tok.encode("a\ud800b", 10)  # a lone surrogate is valid JSON; it must not raise
    assert len(data) == 5


# -- the index -----------------------------------------------------------------------------------

def hashes(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 2**64 - 1, size=n, dtype=np.uint64)


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


# -- the strategy ----------------------------------------------------------------------------------

@pytest.mark.parametrize("guard", ["cost", "stddev"])
def test_same_prefix_same_pod_while_load_is_even(guard: str) -> None:
    router = make_router(load_guard=guard)
    first, header = route(router, chat(SYSTEM, "question 0"))
    assert header.startswith("0.00;tokens=0;")
    for i in range(1, 10):
        pod, header = route(router, chat(SYSTEM, f"question {i}"))
        assert pod == first and selection(header) == "prefix_match"
        assert float(header.split(";")[0]) > 0.9


@pytest.mark.parametrize("guard", ["cost", "stddev"])
def test_growing_conversations_stick(guard: str) -> None:
    router = make_router(n=4, load_guard=guard)
    rng = random.Random(3)
    convs = [[f"conversation {c} opens with its own long context: " + "lorem ipsum " * 60] for c in range(6)]
    homes: dict[int, str] = {}
    for turn in range(5):
        for c, msgs in enumerate(convs):
            pod, header = route(router, chat(*msgs))
            if turn == 0:
                homes[c] = pod
            else:
                assert pod == homes[c], (c, turn, header)
                assert selection(header) == "prefix_match"
            msgs += ["assistant reply " * rng.randint(5, 30), f"user turn {turn}: " + "more text " * 20]


def test_different_models_never_share_entries() -> None:
    router = make_router(n=2, model="a")
    s = strategy_of(router)
    pods_a = router.snapshot.model("a").ready
    route(router, chat(SYSTEM, "hi", model="a"))
    assert s.match_shares(chat(SYSTEM, "hi", model="a"), pods_a)
    # Same pods, same prompt, another model name: nothing matches.
    assert s.match_shares(chat(SYSTEM, "hi", model="b"), pods_a) == {}


@pytest.mark.parametrize("guard", ["cost", "stddev"])
def test_min_match_ignores_tiny_matches(guard: str) -> None:
    # A prompt sharing 2 of its ~50 blocks with one routed earlier: 4% < 10%, so it is no match.
    head = "shared template header " * 12  # 276 bytes: 2 full blocks of 128
    for pct, expected in ((10.0, {"least_cost_fallback", "least_request_fallback"}), (0.0, {"prefix_match"})):
        router = make_router(load_guard=guard, min_match_pct=pct)
        first, _ = route(router, chat(head + "a" * 6000))
        pod, header = route(router, chat(head + "b" * 6000))
        assert selection(header) in expected, header
        if pct == 0.0:
            assert pod == first
        else:
            assert strategy_of(router).ignored_matches == {"m": 1}


def test_stddev_guard_abs_imbalance_and_sigma_rule() -> None:
    router = make_router(n=4, load_guard="stddev", imbalance_abs_count=8, stddev_factor=1.0)
    home, _ = route(router, chat(SYSTEM, "q"))
    home_key = f"default/{home}"
    # Slightly busier than the rest: mean + 1 sigma over (2, 0, 0, 0) is 1.5 < 2, so the match is skipped.
    for _ in range(2):
        router.load.acquire(home_key)
    pod, header = route(router, chat(SYSTEM, "q2"))
    assert pod != home and selection(header) == "prefix_match_skipped"
    # Far busier (spread 10 > 8): only the least-loaded pods remain candidates at all.
    for _ in range(8):
        router.load.acquire(home_key)
    pod, header = route(router, chat(SYSTEM, "q3"))
    assert pod != home and strategy_of(router).imbalance == {"m": 1}
    # Load even again: the prefix wins again (the pods that served q2/q3 hold it too now).
    for _ in range(10):
        router.load.release(home_key)
    _, header = route(router, chat(SYSTEM, "q4"))
    assert selection(header) == "prefix_match"


def test_cost_guard_trades_cache_against_queued_prefill() -> None:
    clock = Clock()
    router = make_router(n=2, load_guard="cost", cost_request_tokens=256, clock=clock)
    home, _ = route(router, chat(SYSTEM, "q"))
    other = next(p.name for p in router.snapshot.model("m").ready if p.name != home)
    # ~3 KiB of cached prefix saves ~760 prefill tokens: a few open requests do not outweigh it ...
    router.load.acquire(f"default/{home}", 100)
    router.load.acquire(f"default/{home}", 100)
    pod, header = route(router, chat(SYSTEM, "q2"))
    assert pod == home and selection(header) == "prefix_match"
    # ... a queue of 5,000 uncached tokens on the home pod does: recomputing elsewhere is faster.
    router.load.acquire(f"default/{home}", 5000)
    pod, header = route(router, chat(SYSTEM, "q3"))
    assert pod == other and selection(header) == "prefix_match_skipped"
    # Half a second later the home pod (16,000 tokens/s) has worked through that queue; its open
    # requests still count, but not as prefill waiting ahead of a new one.
    clock.t += 0.5
    assert router.load.queued_prefill(f"default/{home}") == 0 < router.load.prefill_tokens(f"default/{home}")


def test_kv_pressure_sends_new_prompts_where_the_cache_has_room() -> None:
    # Two pods of 4,000 tokens of KV. Conversations share a ~3 KiB system prompt (~760 tokens) and
    # open with ~2,000 tokens of their own; without the pressure term every one of them follows
    # the system prompt to the first pod, far past what it holds.
    def run(capacity: float) -> list[str]:
        router = make_router(n=2, cost_request_tokens=0)
        strategy_of(router).kv_capacity = {f"default/m-{i}": capacity for i in range(2)} if capacity else {}
        pods = []
        for c in range(6):
            pod, _ = route(router, chat(SYSTEM, f"user {c} context: " + f"detail {c} " * 900))
            pods.append(pod)
        return pods

    assert len(set(run(0))) == 1  # unknown capacity: the system prompt's pod takes them all
    spread = run(4000)
    assert spread.count("m-0") == 3 and spread.count("m-1") == 3, spread
    # A continuation still goes home: the pressure term only prices what has to be computed.
    router = make_router(n=2, cost_request_tokens=0)
    strategy_of(router).kv_capacity = {"default/m-0": 4000, "default/m-1": 4000}
    convs = [[SYSTEM, f"user {c} context: " + f"detail {c} " * 900] for c in range(4)]
    homes = [route(router, chat(*msgs))[0] for msgs in convs]
    for c, msgs in enumerate(convs):
        msgs += ["an answer " * 30, "a follow-up " * 10]
        pod, header = route(router, chat(*msgs))
        assert pod == homes[c] and selection(header) == "prefix_match", header


def test_engine_waiting_queue_spills_a_cached_prefix() -> None:
    # A memory-bound pod: the router's own books say idle (nothing booked), its engine says
    # requests wait for KV. ~1,540 cached tokens outweigh 1 x 800 tokens of waiting, not 5.
    router = make_router(n=2, cost_request_tokens=0)
    s = strategy_of(router)
    system = SYSTEM * 2
    home, _ = route(router, chat(system, "q"))
    other = next(p.name for p in router.snapshot.model("m").ready if p.name != home)
    s.engine_waiting = {f"default/{home}": 1.0, f"default/{other}": 0.0}
    pod, header = route(router, chat(system, "q2"))
    assert pod == home and selection(header) == "prefix_match", header
    s.engine_waiting = {f"default/{home}": 5.0, f"default/{other}": 0.0}
    pod, header = route(router, chat(system, "q3"))
    assert pod == other and selection(header) == "prefix_match_skipped", header
    # The larger of the two queue estimates, not their sum: 2,000 booked tokens and 1 waiting
    # request are one queue (max 2,000 < 800 + 1,540 elsewhere; a sum, 2,800, would spill).
    router = make_router(n=2, cost_request_tokens=0)
    s = strategy_of(router)
    home, _ = route(router, chat(system, "q"))
    other = next(p.name for p in router.snapshot.model("m").ready if p.name != home)
    s.engine_waiting = {f"default/{home}": 1.0, f"default/{other}": 1.0}
    router.load.acquire(f"default/{home}", 2000)
    pod, header = route(router, chat(system, "q4"))
    assert pod == home, header


def test_kv_pressure_share_and_fallback_capacity() -> None:
    clock = Clock()
    router = make_router(n=2, clock=clock, pod_kv_tokens=10_000)
    s = strategy_of(router)
    route(router, chat("x" * 12_800))  # 100 blocks of 128 bytes, ~32 tokens each
    pressure = s.kv_pressure(["default/m-0", "default/m-1"], clock.t)
    assert sorted(pressure.values()) == [0.0, pytest.approx(0.32)]
    s.kv_capacity["default/m-0"] = 1000.0  # engine-reported capacity wins over the fallback
    s.kv_capacity["default/m-1"] = 1000.0
    assert sorted(s.kv_pressure(["default/m-0", "default/m-1"], clock.t).values()) == [0.0, 1.0]
    clock.t += 400  # past the 300 s window: nothing it holds counts as in use any more
    assert set(s.kv_pressure(["default/m-0", "default/m-1"], clock.t).values()) == {0.0}
    off = strategy_of(make_router(n=2, kv_window_s=0, pod_kv_tokens=10_000))
    assert off.kv_pressure(["default/m-0"], clock.t) == {}


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


def test_prefill_tokens_are_booked_until_release() -> None:
    router = make_router(n=1)
    d1 = router.decide(chat(SYSTEM, "q"), "prefix-cache")
    assert d1.prefill_tokens == pytest.approx(len(chat(SYSTEM, "q").prompt) / 4, abs=1)
    d2 = router.decide(chat(SYSTEM, "q2"), "prefix-cache")
    assert d2.prefill_tokens < 40  # only what follows the cached blocks
    assert router.load.prefill_tokens("default/m-0") == d1.prefill_tokens + d2.prefill_tokens
    router.release(d1)
    router.release(d2)
    router.release(d2)
    assert router.load.prefill_tokens("default/m-0") == 0 and router.load.inflight("default/m-0") == 0
    # Other strategies book the whole prompt, so the cost guard sees their work too.
    d3 = router.decide(chat(SYSTEM, "q3"), "least-request")
    assert d3.prefill_tokens == int(len(chat(SYSTEM, "q3").prompt) / 4)


def test_index_is_updated_with_one_ready_pod_and_with_ttl() -> None:
    clock = Clock()
    router = make_router(n=1, clock=clock)
    s = strategy_of(router)
    route(router, chat(SYSTEM, "q"))
    assert len(s.index) > 0
    _, header = route(router, chat(SYSTEM, "q"))
    assert header.startswith("1.00;")
    clock.t += 20 * 60 + 1  # the default TTL is 20 minutes
    _, header = route(router, chat(SYSTEM, "q"))
    assert header.startswith("0.00;")


def test_removed_pods_lose_their_entries() -> None:
    router = make_router(n=3)
    s = strategy_of(router)
    home, _ = route(router, chat(SYSTEM, "q"))
    assert s.index.pod_entry_counts()[f"default/{home}"] > 0
    remaining = [p for p in router.snapshot.model("m").pods if p.name != home]
    router.update_snapshot(PodSnapshot.build(remaining, {p.key for p in remaining}, {"m": None}))
    assert f"default/{home}" not in s.index.pod_entry_counts() and len(s.index) == 0
    # A pod that stops being ready loses them too (a restarted engine's cache is empty); it starts
    # over when it is back, and the pods that stayed ready keep theirs.
    pod, _ = route(router, chat(SYSTEM, "q"))
    other = next(p for p in remaining if p.name != pod)
    s.index.add(hashes(5, 9), other.key, time.time())
    router.update_snapshot(PodSnapshot.build(remaining, {other.key}, {"m": None}))
    assert f"default/{pod}" not in s.index.pod_entry_counts() and s.index.pod_entry_counts()[other.key] == 5
    router.update_snapshot(PodSnapshot.build(remaining, {p.key for p in remaining}, {"m": None}))
    assert s.match_shares(chat(SYSTEM, "q"), router.snapshot.model("m").ready).get(f"default/{pod}") is None


def test_unicode_and_megabyte_prompts() -> None:
    router = make_router(n=4)
    text = "日本語のテキストと絵文字 🚀🎉 und Umlaute äöü. " * 200
    first, _ = route(router, chat(text, "q1"))
    pod, header = route(router, chat(text, "q2"))
    assert pod == first and selection(header) == "prefix_match"
    lone = parse_body(COMPLETIONS_PATH, b'{"model": "m", "prompt": "' + b"x" * 300 + b'\\ud800 tail"}')
    route(router, lone)  # a lone surrogate in JSON is accepted and hashed
    big = chat("q" * (1 << 20))
    t0 = time.perf_counter()
    route(router, big)
    _, header = route(router, chat("q" * (1 << 20)))
    elapsed = time.perf_counter() - t0
    assert header.startswith("1.00;")  # matched over the hashed prefix (the first 1024 blocks)
    assert elapsed < 0.5, elapsed  # two decisions; ~5 ms each on a quiet machine
    assert len(strategy_of(router).index) <= 3 * 1024 + 200


def test_weighted_combination_scores_and_learns() -> None:
    router = make_router(n=3)
    s = strategy_of(router)
    first = router.decide(chat(SYSTEM, "q"), "least-request:1,prefix-cache:4")
    router.release(first)
    assert len(s.index) > 0 and first.echo[MATCH_HEADER].endswith("sel=weighted")
    again = router.decide(chat(SYSTEM, "q2"), "least-request:1,prefix-cache:4")
    assert again.pod == first.pod and again.echo[MATCH_HEADER].startswith("1.00")


def test_settings_tokenizer_choice_and_validation() -> None:
    cfg = build_config(env={"AIBRIX_PREFIX_CACHE_TOKENIZER_TYPE": "tiktoken", "AIBRIX_PREFIX_CACHE_HASH_SEED": "0",
                            "AIBRIX_PREFIX_CACHE_MIN_MATCH_PCT": "0", "AIBRIX_PREFIX_CACHE_LOAD_GUARD": "stddev",
                            "AIBRIX_PREFIX_CACHE_BLOCK_NUMBER": "5000",
                            "AIBRIX_PREFIX_CACHE_PREFILL_TOKENS_PER_SEC": "0"})
    ps = prefix_cache_settings(cfg)
    assert (ps.tokenizer_type, ps.hash_seed, ps.min_match_pct, ps.load_guard, ps.block_number,
            ps.prefill_tokens_per_s) == ("tiktoken", 0, 0.0, "stddev", 5000, 0.0)
    router = Router(RoutingSettings(prefix_cache=ps), rng=random.Random(1))
    s = strategy_of(router)
    assert s.tokenizer.name == "tiktoken" and s.block_size == 16 and s.index.capacity == 5000
    assert router.load.prefill_rate == 0.0
    pods = [Pod(f"p{i}", f"10.0.0.{i + 1}:8000", "m") for i in range(2)]
    router.update_snapshot(PodSnapshot.build(pods, {p.key for p in pods}, {"m": None}))
    first, _ = route(router, chat(SYSTEM, "q1"))
    pod, header = route(router, chat(SYSTEM, "q2"))
    assert pod == first and selection(header) == "prefix_match"
    assert prefix_cache_settings(build_config(env={})).hash_seed == DEFAULT_HASH_SEED
    for var, bad in (("AIBRIX_PREFIX_CACHE_BLOCK_SIZE", "0"), ("AIBRIX_PREFIX_CACHE_MIN_MATCH_PCT", "-1"),
                     ("AIBRIX_PREFIX_CACHE_HASH_SEED", "x")):
        with pytest.raises(ConfigError, match=var):
            build_config(env={var: bad})
    with pytest.raises(ValueError, match="AIBRIX_PREFIX_CACHE_LOAD_GUARD"):
        Router(RoutingSettings(prefix_cache=PrefixCacheSettings(load_guard="bogus")))
    with pytest.raises(ValueError, match="AIBRIX_PREFIX_CACHE_TOKENIZER_TYPE"):
        Router(RoutingSettings(prefix_cache=PrefixCacheSettings(tokenizer_type="sentencepiece")))


def test_metrics_collector_exposes_the_counters() -> None:
    router = make_router(n=2)
    route(router, chat(SYSTEM, "q"))
    route(router, chat(SYSTEM, "q2"))
    registry = CollectorRegistry()
    registry.register(PrefixCacheCollector(lambda: router))
    text = generate_latest(registry).decode()
    assert 'extproc_prefix_cache_routing_decisions_total{match_percent_bucket="76-100",model="m"} 1.0' in text
    assert 'extproc_prefix_cache_routing_selection_total{model="m",selection="prefix_match"} 1.0' in text
    assert "extproc_prefix_cache_index_entries " in text and 'extproc_inflight_prefill_tokens{' in text
    assert "extproc_pod_kv_capacity_tokens{" not in text  # capacity unknown: no series, no pressure
    strategy_of(router).kv_capacity = {"default/m-0": 1000.0, "default/m-1": 1000.0}
    text = generate_latest(registry).decode()
    assert 'extproc_pod_kv_capacity_tokens{model="m",pod="m-0"} 1000.0' in text
    pressures = [line for line in text.splitlines() if line.startswith("extproc_prefix_cache_kv_pressure{")]
    assert sorted(line.rpartition(" ")[2] for line in pressures) == ["0.0", "0.768"], pressures  # 24 blocks x 32


# -- through the real stack --------------------------------------------------------------------------

async def test_real_stack_routes_by_prefix_and_echoes_the_match(stack: LocalStack) -> None:
    body = {"model": "demo-model", "max_tokens": 4,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "first"}]}
    async with aiohttp.ClientSession() as s:
        seen = []
        for question in ("first", "second", "third"):
            body["messages"][1]["content"] = question
            async with s.post(stack.url + "/v1/chat/completions", json=body,
                              headers={"routing-strategy": "prefix-cache"}) as resp:
                assert resp.status == 200, await resp.text()
                seen.append((resp.headers["target-pod"], resp.headers[MATCH_HEADER]))
    assert len({pod for pod, _ in seen}) == 1, seen
    assert seen[0][1].startswith("0.00;") and all(float(h.split(";")[0]) > 0.9 for _, h in seen[1:])
