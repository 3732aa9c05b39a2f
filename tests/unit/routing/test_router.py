"""The router (routing/router.py): strategy precedence, errors, pod snapshots, and the random and
least-request strategies and a weighted combination through it."""

from __future__ import annotations

import random
from collections import Counter

import orjson
import pytest

from routing.errors import RoutingError
from routing.pods import Pod, PodSnapshot
from routing.request import CHAT_PATH, parse_body
from routing.router import ProfileChoice, Router, RoutingSettings


def make_router(n: int = 3, ready: int | None = None, settings: RoutingSettings | None = None,
                model: str = "m") -> Router:
    router = Router(settings, rng=random.Random(7))
    pods = [Pod(f"p{i}", f"127.0.0.1:{9000 + i}", model) for i in range(n)]
    ready_keys = {p.key for p in pods[: n if ready is None else ready]}
    router.update_snapshot(PodSnapshot.build(pods, ready_keys, {model: None}))
    return router


def chat(model: str = "m", **extra: object) -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], **extra})


def test_precedence_lock_header_profile_env_default() -> None:
    r = make_router(settings=RoutingSettings(default_strategy="least-request"))
    lock = ProfileChoice(name="p", routing_strategy="random", locked_strategy="random")
    assert r.resolve_strategy("least-request", lock) == ("random", "profile-lock")
    assert r.resolve_strategy("random", ProfileChoice(routing_strategy="least-request")) == ("random", "header")
    assert r.resolve_strategy(None, ProfileChoice(routing_strategy="random")) == ("random", "profile")
    assert r.resolve_strategy(None, None) == ("least-request", "env")
    assert make_router().resolve_strategy(None) == ("random", "default")


def test_unknown_env_default_is_rejected_at_start() -> None:
    with pytest.raises(ValueError, match="ROUTING_ALGORITHM"):
        Router(RoutingSettings(default_strategy="nope"))


def test_errors_unknown_model_strategy_no_ready_pod() -> None:
    r = make_router(ready=0)
    req = parse_body(CHAT_PATH, chat("other"))
    with pytest.raises(RoutingError) as exc:
        r.decide(req)
    assert exc.value.status == 404 and exc.value.code == "model_not_found"
    with pytest.raises(RoutingError) as exc:
        r.decide(parse_body(CHAT_PATH, chat()), "fastest")
    assert exc.value.status == 400 and "least-request" in exc.value.message and "random" in exc.value.message
    with pytest.raises(RoutingError) as exc:
        r.decide(parse_body(CHAT_PATH, chat()))
    assert exc.value.status == 503


def test_random_uses_every_ready_pod_and_only_ready_pods() -> None:
    r = make_router(n=4, ready=3)
    req = parse_body(CHAT_PATH, chat())
    seen = Counter()
    for _ in range(600):
        d = r.decide(req, "random")
        seen[d.pod.name] += 1
        r.release(d)
    assert set(seen) == {"p0", "p1", "p2"}
    assert min(seen.values()) > 120  # uniform: ~200 each
    assert r.load.total == 0


def test_least_request_spreads_within_one() -> None:
    r = make_router(n=3)
    req = parse_body(CHAT_PATH, chat())
    decisions = [r.decide(req, "least-request") for _ in range(30)]
    counts = Counter(d.pod.name for d in decisions)
    assert max(counts.values()) - min(counts.values()) <= 1
    for d in decisions[:10]:
        r.release(d)
        r.release(d)  # releasing twice must not count twice
    assert r.load.total == 20


def test_least_request_prefers_idle_pod() -> None:
    r = make_router(n=3)
    req = parse_body(CHAT_PATH, chat())
    held = [r.decide(req, "least-request") for _ in range(3)]
    r.release(held[1])
    assert r.decide(req, "least-request").pod == held[1].pod


def test_removed_pod_counters_are_forgotten() -> None:
    r = make_router(n=2)
    d = r.decide(parse_body(CHAT_PATH, chat()), "least-request")
    r.update_snapshot(PodSnapshot.build([], set(), {"m": None}))
    assert r.load.total == 0
    r.release(d)
    assert r.load.total == 0


def test_weighted_multi_strategy_through_the_router() -> None:
    r = make_router(n=3)
    req = parse_body(CHAT_PATH, chat())
    busy = [r.decide(req, "least-request") for _ in range(2)]  # p? and p? now hold one each
    d = r.decide(req, "least-request:5,random:1")
    assert r.load.inflight(d.pod.key) == 1  # the idle pod wins: least-request dominates by weight
    assert d.pod.key not in {b.pod.key for b in busy}
    assert d.strategy == "least-request:5,random:1"
    with pytest.raises(RoutingError) as exc:
        r.decide(req, "least-request:2,fastest:1")
    assert exc.value.status == 400 and "fastest" in exc.value.message
    with pytest.raises(RoutingError):
        r.decide(req, "least-request:two")
