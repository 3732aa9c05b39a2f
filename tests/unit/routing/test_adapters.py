"""LoRA adapters as models (routing/pods.py, routing/router.py, routing/kv_index.py): the snapshot maps
an adapter to the base model's pods serving it; requests for it go only there, an unserved adapter is
a 404 naming it, and its prefix-cache blocks are its own."""

from __future__ import annotations

import random
from collections import Counter

import orjson
import pytest

from ext_proc.control import models_list
from routing.errors import RoutingError
from routing.pods import Pod, PodSnapshot
from routing.request import CHAT_PATH, parse_body
from routing.router import Router, RoutingSettings
from routing.strategies.prefix_cache import MATCH_HEADER, PrefixCacheSettings
from routing.tokenizers import make_engine_tokenizer, render_chat

PROFILE = '{"defaultProfile": "d", "profiles": {"d": {"routingStrategy": "least-request"}}}'


def pods(model: str = "base", n: int = 4) -> list[Pod]:
    return [Pod(f"{model}-{i}", f"10.0.{len(model)}.{i + 1}:8000", model, namespace="ns") for i in range(n)]


def snapshot(adapters: dict[str, list[str]], ready: set[str] | None = None, extra: list[Pod] | None = None,
             configs: dict[str, str | None] | None = None) -> PodSnapshot:
    all_pods = pods() + (extra or [])
    return PodSnapshot.build(all_pods, ready if ready is not None else {p.key for p in all_pods},
                             configs or {"base": PROFILE}, 3, adapters=adapters)


def request(model: str, text: str = "hi") -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": text}]})


def test_an_adapter_is_the_base_models_pods_that_serve_it() -> None:
    snap = snapshot({"ns/base-0": ["sql"], "ns/base-2": ["sql", "chat"], "ns/base-3": ["chat"]},
                    ready={"ns/base-0", "ns/base-1", "ns/base-3"})
    sql = snap.model("sql")
    assert sql is not None and sql.parent == "base" and sql.name == "sql"
    assert [p.name for p in sql.pods] == ["base-0", "base-2"] and [p.name for p in sql.ready] == ["base-0"]
    assert sql.config_json == PROFILE  # the base model's profile
    assert sql.pods[0] is snap.models["base"].pods[0]  # the same Pod objects: stats and indexes agree
    assert [p.name for p in snap.model("chat").ready] == ["base-3"]
    # Base models stay as they were: every pod under exactly one model, adapters apart.
    assert snap.model_names() == ["base"] and snap.adapter_names() == ["chat", "sql"]
    assert snap.model("base").parent is None and snap.version == 3
    assert snap.pod_adapters == {"ns/base-0": {"sql"}, "ns/base-2": {"sql", "chat"}, "ns/base-3": {"chat"}}


def test_an_adapter_no_ready_pod_serves_does_not_exist() -> None:
    snap = snapshot({"ns/base-1": ["sql"], "ns/gone": ["sql"]}, ready={"ns/base-0"})
    assert snap.model("sql") is None and snap.adapters == {}


def test_names_and_several_base_models() -> None:
    other = pods("other", 2)
    # A base model's own name is never an adapter; an adapter under two base models goes with the one
    # that has more ready pods serving it.
    snap = snapshot({"ns/base-0": ["other", "shared"], "ns/other-0": ["shared"], "ns/other-1": ["shared"]},
                    extra=other, configs={"base": PROFILE, "other": None})
    assert snap.model("other").parent is None
    shared = snap.model("shared")
    assert shared.parent == "other" and [p.name for p in shared.ready] == ["other-0", "other-1"]
    assert shared.config_json is None


def test_with_adapters_adds_what_the_pods_report() -> None:
    snap = snapshot({"ns/base-0": ["sql"]})
    assert snap.with_adapters({}) is snap
    merged = snap.with_adapters({"ns/base-1": {"sql", "new"}, "ns/nowhere": {"ghost"}})
    assert [p.name for p in merged.model("sql").ready] == ["base-0", "base-1"]
    assert [p.name for p in merged.model("new").ready] == ["base-1"]
    assert merged.model("ghost") is None and merged.models is not snap.models and merged.version == snap.version
    assert snap.model("new") is None  # the original is unchanged


def make_router(adapters: dict[str, list[str]], **prefix: object) -> Router:
    router = Router(RoutingSettings(prefix_cache=PrefixCacheSettings(**prefix)), rng=random.Random(3),
                    clock=lambda: 1000.0)
    router.update_snapshot(snapshot(adapters))
    return router


def test_requests_for_an_adapter_go_only_to_its_pods() -> None:
    router = make_router({"ns/base-1": ["sql"], "ns/base-3": ["sql"]})
    seen: Counter[str] = Counter()
    for strategy in ("random", "least-request", "prefix-cache", "least-request:1,prefix-cache:1"):
        for i in range(40):
            d = router.decide(parse_body(CHAT_PATH, request("sql", f"question {i}")), strategy)
            router.release(d)
            assert d.model == "sql"
            seen[d.pod.name] += 1
    assert set(seen) == {"base-1", "base-3"}
    base = Counter()
    for i in range(80):
        d = router.decide(parse_body(CHAT_PATH, request("base", f"q{i}")), "random")
        router.release(d)
        base[d.pod.name] += 1
    assert set(base) == {"base-0", "base-1", "base-2", "base-3"}  # the base model spreads over all


def test_an_unserved_adapter_is_a_404_naming_it() -> None:
    router = make_router({"ns/base-1": ["sql"]})
    with pytest.raises(RoutingError) as exc:
        router.decide(parse_body(CHAT_PATH, request("sql-v2")), "random")
    assert exc.value.status == 404 and "`sql-v2`" in exc.value.message and exc.value.code == "model_not_found"


def test_models_list_names_adapters_with_their_parent() -> None:
    router = make_router({"ns/base-1": ["sql"], "ns/base-2": ["chat"]})
    assert models_list(router)["data"] == [
        {"id": "base", "object": "model", "created": 0, "owned_by": "extproc-router"},
        {"id": "chat", "object": "model", "created": 0, "owned_by": "extproc-router", "parent": "base"},
        {"id": "sql", "object": "model", "created": 0, "owned_by": "extproc-router", "parent": "base"},
    ]


def test_prefix_cache_keeps_an_adapters_blocks_apart() -> None:
    router = make_router({f"ns/base-{i}": ["sql"] for i in range(4)})
    prompt = "The shared system prompt of every request in this test. " * 40

    def route(model: str) -> tuple[str, str]:
        d = router.decide(parse_body(CHAT_PATH, request(model, prompt)), "prefix-cache")
        router.release(d)
        return d.pod.name, d.echo[MATCH_HEADER]

    home, header = route("base")
    assert header.startswith("0.00")
    pod, header = route("base")
    assert pod == home and header.startswith("1.00")
    # The same prompt for the adapter matches nothing: the base model's blocks are not the adapter's.
    _, header = route("sql")
    assert header.startswith("0.00")
    adapter_home, header = route("sql")
    assert header.startswith("1.00")  # its own blocks, from here on
    assert route("sql")[0] == adapter_home


def test_precise_matching_of_an_adapter_uses_the_base_models_tokenizer() -> None:
    router = make_router({f"ns/base-{i}": ["sql"] for i in range(4)})
    kv = router.stats.kv_blocks
    kv.set_tokenizers({"base": make_engine_tokenizer("bytes")})  # none for the adapter's own name
    for i in (0, 1):
        kv.track_pod(f"ns/base-{i}", "base")
        kv.set_precise(f"ns/base-{i}", True)
    body = {"model": "sql", "messages": [{"role": "user", "content": "Tell me about the sea. " * 20}]}
    ids = list(render_chat(body["messages"], "simulator").encode())
    n = len(ids) // 16 * 16
    kv.store("ns/base-1", list(range(1, n // 16 + 1)), None, ids[:n], 16, lora_name="sql")  # the adapter's blocks
    d = router.decide(parse_body(CHAT_PATH, orjson.dumps(body)), "prefix-cache")
    router.release(d)
    header = d.echo[MATCH_HEADER]
    assert d.pod.name == "base-1" and header.startswith("1.00") and ";src=precise;" in header
    # The base model's request for the same text does not match the adapter's blocks.
    d = router.decide(parse_body(CHAT_PATH, orjson.dumps({**body, "model": "base"})), "prefix-cache")
    router.release(d)
    assert d.echo[MATCH_HEADER].startswith("0.00")
