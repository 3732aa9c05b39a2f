"""The pd strategy's choices (rolesets, buckets, combined fallback, load) without a network."""

from __future__ import annotations

import json
import random

import pytest

from routing.errors import RoutingError
from routing.load import LoadTracker
from routing.pods import ANNOTATION_CONFIG, ModelEntry, Pod
from routing.request import RoutingRequest
from routing.stats import EngineStats, PodStats
from routing.strategies.base import Choice, DecisionContext
from routing.strategies.pd import PREFILL_LOAD_PREFIX, PDStrategy


def pod(name: str, role: str, roleset: str = "rs0", config: dict | None = None, **labels: str) -> Pod:
    ann = {ANNOTATION_CONFIG: json.dumps(config)} if config else {}
    return Pod(name, f"10.0.0.{abs(hash(name)) % 250 + 1}:8000", "m",
               labels={"role-name": role, "roleset-name": roleset, **labels}, annotations=ann)


def entry(*pods: Pod, ready: list[Pod] | None = None) -> ModelEntry:
    return ModelEntry("m", tuple(pods), tuple(ready if ready is not None else pods))


def req(prompt: str = "hello") -> RoutingRequest:
    return RoutingRequest(path="/v1/chat/completions", model="m", prompt=prompt)


def strategy(**kw) -> PDStrategy:
    return PDStrategy(prompt_tokens=lambda text: len(text), **kw)


def plan_for(s: PDStrategy, request: RoutingRequest, e: ModelEntry, load: LoadTracker, rng: random.Random,
         engine: dict[str, EngineStats] | None = None) -> Choice:
    """`s.plan` with this router's load and the engines' last scrape; the chosen pod is the decode pod."""
    stats = PodStats(load)
    stats.update_engine(engine or {})
    return s.plan(DecisionContext(request, stats, rng), e)


def test_pairs_come_from_one_complete_roleset() -> None:
    pods = [pod("p0", "prefill", "a"), pod("d0", "decode", "a"), pod("p1", "prefill", "b")]  # b has no decode
    for seed in range(20):
        plan = plan_for(strategy(), req(), entry(*pods), LoadTracker(), random.Random(seed))
        assert (plan.prefill.name, plan.pod.name, plan.pod.roleset) == ("p0", "d0", "a")


def test_roleset_losing_its_decode_pod_drops_out() -> None:
    p0, d0 = pod("p0", "prefill", "a"), pod("d0", "decode", "a")
    p1, d1 = pod("p1", "prefill", "b"), pod("d1", "decode", "b")
    e = entry(p0, d0, p1, d1, ready=[p0, d0, p1])
    assert {plan_for(strategy(), req(), e, LoadTracker(), random.Random(s)).pod.roleset for s in range(20)} == {"a"}
    with pytest.raises(RoutingError) as exc:
        plan_for(strategy(), req(), entry(p0, d0, ready=[p0]), LoadTracker(), random.Random(0))
    assert exc.value.status == 503


def test_no_complete_roleset_uses_a_combined_pod() -> None:
    c = pod("c0", "combined", "")
    plan = plan_for(strategy(), req(), entry(pod("p0", "prefill"), c), LoadTracker(), random.Random(0))
    assert plan.prefill is None and plan.pod.name == "c0"


def test_decode_by_load_and_engine_metrics() -> None:
    p0, d0, d1 = pod("p0", "prefill"), pod("d0", "decode"), pod("d1", "decode")
    load = LoadTracker()
    for _ in range(3):
        load.acquire(d0.key)
    assert plan_for(strategy(), req(), entry(p0, d0, d1), load, random.Random(0)).pod.name == "d1"
    s = strategy()
    busy = {d1.key: EngineStats(running=40, waiting=5, kv_usage=0.9)}  # busy with other routers' work
    assert plan_for(s, req(), entry(p0, d0, d1), load, random.Random(0), busy).pod.name == "d0"


def test_prefill_by_prefix_match_then_load() -> None:
    p0, p1, d0 = pod("p0", "prefill"), pod("p1", "prefill"), pod("d0", "decode")
    s = strategy(prefill_match=lambda r, pods: {p1.key: 0.9})
    assert plan_for(s, req(), entry(p0, p1, d0), LoadTracker(), random.Random(0)).prefill.name == "p1"
    load = LoadTracker()
    for _ in range(10):
        load.acquire(PREFILL_LOAD_PREFIX + p0.key)
    assert plan_for(strategy(), req(), entry(p0, p1, d0), load, random.Random(0)).prefill.name == "p1"


def test_prompt_length_buckets_and_combined_fallback() -> None:
    short_cfg = {"profiles": {"default": {"routingConfig": {"promptLenBucketMaxLength": 100}}}}
    long_cfg = {"profiles": {"default": {"routingConfig": {"promptLenBucketMinLength": 101,
                                                            "promptLenBucketMaxLength": 1000}}}}
    combined_cfg = {"profiles": {"default": {"routingConfig": {"combined": True}}}}
    pods = [pod("ps", "prefill", "short", short_cfg), pod("ds", "decode", "short", short_cfg),
            pod("pl", "prefill", "long", long_cfg), pod("dl", "decode", "long", long_cfg),
            pod("c", "other", "", combined_cfg)]
    e = entry(*pods)
    assert plan_for(strategy(), req("x" * 50), e, LoadTracker(), random.Random(0)).pod.roleset == "short"
    assert plan_for(strategy(), req("x" * 500), e, LoadTracker(), random.Random(0)).pod.roleset == "long"
    plan = plan_for(strategy(), req("x" * 5000), e, LoadTracker(), random.Random(0))
    assert plan.prefill is None and plan.pod.name == "c"
    with pytest.raises(RoutingError):
        plan_for(strategy(), req("x" * 5000), entry(*pods[:4]), LoadTracker(), random.Random(0))


def test_mixed_engines_are_refused() -> None:
    pods = [pod("p0", "prefill", **{"model.aibrix.ai/engine": "sglang"}), pod("d0", "decode")]
    with pytest.raises(RoutingError):
        plan_for(strategy(), req(), entry(*pods), LoadTracker(), random.Random(0))
