"""The `prefix-cache` strategy (routing/strategies/prefix_cache.py): stickiness, its load guards, KV
pressure, booked prefill, index upkeep, the weighted combination and its settings."""

from __future__ import annotations

import random
import time

import pytest

from extproc_router.config import ConfigError, build_config
from extproc_router.serve import prefix_cache_settings
from routing.block_hash import DEFAULT_HASH_SEED
from routing.errors import RoutingError
from routing.pods import Pod, PodSnapshot
from routing.request import COMPLETIONS_PATH, parse_body
from routing.router import Router, RoutingSettings
from routing.strategies.prefix_cache import MATCH_HEADER, PrefixCacheSettings
from tests.unit.routing.prefix_cache_helpers import (
    SYSTEM,
    Clock,
    chat,
    context,
    hashes,
    make_router,
    route,
    selection,
    set_engine_waiting,
    strategy_of,
)


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
    assert s.match_shares(context(router, chat(SYSTEM, "hi", model="a")), pods_a)
    # Same pods, same prompt, another model name: nothing matches.
    assert s.match_shares(context(router, chat(SYSTEM, "hi", model="b")), pods_a) == {}


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
        router.stats.kv_capacity = {f"default/m-{i}": capacity for i in range(2)} if capacity else {}
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
    router.stats.kv_capacity = {"default/m-0": 4000, "default/m-1": 4000}
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
    system = SYSTEM * 2
    home, _ = route(router, chat(system, "q"))
    other = next(p.name for p in router.snapshot.model("m").ready if p.name != home)
    set_engine_waiting(router, {f"default/{home}": 1.0, f"default/{other}": 0.0})
    pod, header = route(router, chat(system, "q2"))
    assert pod == home and selection(header) == "prefix_match", header
    set_engine_waiting(router, {f"default/{home}": 5.0, f"default/{other}": 0.0})
    pod, header = route(router, chat(system, "q3"))
    assert pod == other and selection(header) == "prefix_match_skipped", header
    # The larger of the two queue estimates, not their sum: 2,000 booked tokens and 1 waiting
    # request are one queue (max 2,000 < 800 + 1,540 elsewhere; a sum, 2,800, would spill).
    router = make_router(n=2, cost_request_tokens=0)
    home, _ = route(router, chat(system, "q"))
    other = next(p.name for p in router.snapshot.model("m").ready if p.name != home)
    set_engine_waiting(router, {f"default/{home}": 1.0, f"default/{other}": 1.0})
    router.load.acquire(f"default/{home}", 2000)
    pod, header = route(router, chat(system, "q4"))
    assert pod == home, header


def test_kv_pressure_share_and_fallback_capacity() -> None:
    clock = Clock()
    router = make_router(n=2, clock=clock, pod_kv_tokens=10_000)
    s = strategy_of(router)
    route(router, chat("x" * 12_800))  # 100 blocks of 128 bytes, ~32 tokens each
    pressure = s.kv_pressure(["default/m-0", "default/m-1"], router.stats, clock.t)
    assert sorted(pressure.values()) == [0.0, pytest.approx(0.32)]
    router.stats.kv_capacity["default/m-0"] = 1000.0  # engine-reported capacity wins over the fallback
    router.stats.kv_capacity["default/m-1"] = 1000.0
    assert sorted(s.kv_pressure(["default/m-0", "default/m-1"], router.stats, clock.t).values()) == [0.0, 1.0]
    clock.t += 400  # past the 300 s window: nothing it holds counts as in use any more
    assert set(s.kv_pressure(["default/m-0", "default/m-1"], router.stats, clock.t).values()) == {0.0}
    off = make_router(n=2, kv_window_s=0, pod_kv_tokens=10_000)
    assert strategy_of(off).kv_pressure(["default/m-0"], off.stats, clock.t) == {}


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
    ready = router.snapshot.model("m").ready
    assert s.match_shares(context(router, chat(SYSTEM, "q")), ready).get(f"default/{pod}") is None


def test_unicode_and_megabyte_prompts() -> None:
    router = make_router(n=4)
    text = "日本語のテキストと絵文字 🚀🎉 und Umlaute äöü. " * 200
    first, _ = route(router, chat(text, "q1"))
    pod, header = route(router, chat(text, "q2"))
    assert pod == first and selection(header) == "prefix_match"
    # A lone surrogate is no UTF-8 text: the pods would refuse it, so the router does too (400).
    with pytest.raises(RoutingError) as exc:
        parse_body(COMPLETIONS_PATH, b'{"model": "m", "prompt": "' + b"x" * 300 + b'\\ud800 tail"}')
    assert exc.value.status == 400
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
