"""The routing core: body parsing, strategy precedence, random and least-request."""

from __future__ import annotations

import random
from collections import Counter

import orjson
import pytest

from routing.errors import RoutingError
from routing.pods import Pod, PodSnapshot
from routing.request import CHAT_PATH, COMPLETIONS_PATH, parse_body
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


def test_chat_prompt_keeps_role_boundaries_and_content_parts() -> None:
    body = orjson.dumps({"model": "m", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "look"},
                                     {"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]})
    req = parse_body(CHAT_PATH, body)
    assert "be brief" in req.prompt and "look" in req.prompt and "a.png" in req.prompt
    assert req.prompt.index("system") < req.prompt.index("be brief") < req.prompt.index("user")
    # A longer conversation extends the shorter one's rendering: the basis of prefix affinity.
    longer = orjson.dumps({"model": "m", "messages": [*orjson.loads(body)["messages"],
                                                      {"role": "assistant", "content": "ok"}]})
    assert parse_body(CHAT_PATH, longer).prompt.startswith(req.prompt)


def test_same_text_in_other_roles_renders_differently() -> None:
    a = parse_body(CHAT_PATH, orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}]}))
    b = parse_body(CHAT_PATH, orjson.dumps({"model": "m", "messages": [{"role": "system", "content": "x"}]}))
    assert a.prompt != b.prompt


@pytest.mark.parametrize(("prompt", "expected"), [
    ("hello", "hello"), (["a", "b"], "a\nb"), ([1, 2, 3], "1 2 3"), ([[1, 2], [3]], "1 2\n3")])
def test_completion_prompts(prompt: object, expected: str) -> None:
    req = parse_body(COMPLETIONS_PATH, orjson.dumps({"model": "m", "prompt": prompt, "max_tokens": 5,
                                                     "stream": True}))
    assert req.prompt == expected and req.max_tokens == 5 and req.stream is True


@pytest.mark.parametrize(("path", "body", "param"), [
    (CHAT_PATH, b"{not json", None),
    (CHAT_PATH, b"[1,2]", None),
    (CHAT_PATH, b"", None),
    (CHAT_PATH, b'{"messages": [{"role": "user", "content": "x"}]}', "model"),
    (CHAT_PATH, b'{"model": 5, "messages": []}', "model"),
    (CHAT_PATH, b'{"model": "m"}', "messages"),
    (CHAT_PATH, b'{"model": "m", "messages": []}', "messages"),
    (CHAT_PATH, b'{"model": "m", "messages": ["x"]}', "messages"),
    (CHAT_PATH, b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}', "stream"),
    (CHAT_PATH, b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}', "max_tokens"),
    (COMPLETIONS_PATH, b'{"model": "m"}', "prompt"),
    (COMPLETIONS_PATH, b'{"model": "m", "prompt": {"a": 1}}', "prompt"),
    (COMPLETIONS_PATH, b'{"model": "m", "prompt": []}', "prompt"),
])
def test_bad_bodies_are_400_naming_the_field(path: str, body: bytes, param: str | None) -> None:
    with pytest.raises(RoutingError) as exc:
        parse_body(path, body)
    assert exc.value.status == 400
    assert exc.value.param == param
    assert exc.value.to_body()["error"]["type"] == "invalid_request_error"


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


def test_integers_beyond_64_bits_are_valid_json() -> None:
    body = b'{"model": "m", "prompt": "x", "logit_bias": {"1": 123456789012345678901234567890}}'
    assert parse_body(COMPLETIONS_PATH, body).prompt == "x"


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
