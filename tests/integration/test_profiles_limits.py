"""Model config profiles, weighted multi-strategy parsing, API keys and rate limits."""

from __future__ import annotations

import asyncio
import json
import random

import orjson
import pytest
import redis.asyncio as aioredis

from extproc_router.ratelimit.limits import LocalLimiter, UserLimits
from extproc_router.ratelimit.redis_limiter import RedisLimiter
from extproc_router.ratelimit.usage import UsageScanner
from extproc_router.resp import PipelinedRedis
from routing.errors import RoutingError
from routing.multi import combine, normalise, parse_spec
from routing.profiles import ProfileCache, parse_profiles

PROFILES = {
    "defaultProfile": "default",
    "profiles": {
        "default": {"routingStrategy": "random"},
        "low-latency": {"routingStrategy": "least-request", "requestsPerSecond": 5},
        "short": {"routingStrategy": "least-request", "routingConfig": {"promptTokensLt": 100}},
        "long": {"routingStrategy": "random", "routingConfig": {"promptTokensGte": 100}},
        "long-gen": {"routingStrategy": "random",
                     "routingConfig": {"promptTokensGte": 100, "maxTokensGte": 500}},
    },
}


def test_profile_selection_header_default_unknown_auto() -> None:
    mp = parse_profiles(json.dumps(PROFILES))
    assert mp.error is None
    assert mp.select("low-latency", lambda: 0, None).name == "low-latency"
    assert mp.select("  low-latency ", lambda: 0, None).name == "low-latency"  # trimmed
    assert mp.select(None, lambda: 0, None).name == "default"
    assert mp.select("nope", lambda: 0, None).name == "default"
    assert mp.select("auto", lambda: 10, None).name == "short"
    assert mp.select("auto", lambda: 1000, 100).name == "long"
    # Both "long" and "long-gen" fit; the one with more hints wins.
    assert mp.select("auto", lambda: 1000, 600).name == "long-gen"
    calls = []
    mp.select("low-latency", lambda: calls.append(1) or 0, None)
    assert calls == []  # prompt tokens are only counted for auto


def test_auto_without_fit_falls_back_to_default() -> None:
    mp = parse_profiles(json.dumps({"profiles": {"default": {"routingStrategy": "random"},
                                                 "x": {"routingConfig": {"maxTokensLt": 5}}}}))
    assert mp.select("auto", lambda: 10, 50).name == "default"


@pytest.mark.parametrize("text", ["{not json", "[]", '{"profiles": []}', '{"profiles": {"a": {"routingStrategy": 3}}}',
                                  '{"defaultProfile": "missing", "profiles": {"a": {}}}',
                                  '{"profiles": {"a": {"routingConfig": {"promptTokensLt": -1}}}}'])
def test_invalid_profile_json_is_reported_not_raised(text: str) -> None:
    errors: list[tuple[str, str]] = []
    cache = ProfileCache(lambda m, e: errors.append((m, e)))
    mp = cache.get("m", text)
    assert mp.error and not mp.profiles and mp.select("x", lambda: 0, None) is None
    cache.get("m", text)
    assert len(errors) == 1  # reported once per distinct text, not per request


def test_multi_spec_parsing() -> None:
    known = ["random", "least-request", "prefix-cache", "pd"]
    assert [(w.name, w.weight) for w in parse_spec("least-request:2,prefix-cache", known)] == [
        ("least-request", 2), ("prefix-cache", 1)]
    assert [w.name for w in parse_spec("least-request:0,random:3", known)] == ["random"]
    for bad in ("least-request:x", "least-request:-1", "nope:1", "random,,least-request", "random:1,random:2",
                "pd,random", "random:0", "random:1000001"):
        with pytest.raises(RoutingError) as exc:
            parse_spec(bad, known)
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


def test_usage_scanner_sse_and_json() -> None:
    s = UsageScanner()
    s.feed(b'data: {"choices":[{"delta":{"content":"usage"}}]}\n\ndata: {"usage": {"prompt_tokens": 3, "comp')
    s.feed(b'letion_tokens": 4, "total_tokens": 7}}\n\ndata: [DONE]\n\n', end=True)
    assert s.total_tokens == 7
    j = UsageScanner()
    j.feed(b'{"id": "x", "usage": {"prompt_tokens": 5, "completion_tokens": 6}}', end=True)
    assert j.total_tokens == 11


async def test_local_limiter_rpm_tpm_rps_and_reset() -> None:
    now = [1000.0]
    lim = LocalLimiter(clock=lambda: now[0])
    u = UserLimits(rpm=3, tpm=100)
    for _ in range(3):
        assert (await lim.check_request("alice", u, "m", None)).allowed
    v = await lim.check_request("alice", u, "m", None)
    assert not v.allowed and v.limit == "rpm" and 1 <= v.retry_after <= 60
    now[0] += 60  # next window
    assert (await lim.check_request("alice", u, "m", None)).allowed
    await lim.add_tokens("alice", 150)
    v = await lim.check_request("alice", u, "m", None)
    assert not v.allowed and v.limit == "tpm"
    assert (await lim.check_request("bob", u, "m", 2)).allowed
    assert (await lim.check_request("bob", u, "m", 2)).allowed
    assert (await lim.check_request(None, None, "m", 2)).limit == "model-rps"
    now[0] += 1
    assert (await lim.check_request(None, None, "m", 2)).allowed


async def test_redis_limiter_shared_by_two_replicas(redis_server: tuple) -> None:
    host, port, _ = redis_server
    now = [2000.0]
    a = RedisLimiter(PipelinedRedis(host, port), clock=lambda: now[0])
    b = RedisLimiter(PipelinedRedis(host, port), clock=lambda: now[0])
    u = UserLimits(rpm=4, tpm=50)
    results = await asyncio.gather(*(lim.check_request("carol", u, "m", None) for lim in (a, b) * 3))
    assert sum(r.allowed for r in results) == 4  # one shared budget, never more
    now[0] += 60
    assert (await b.check_request("carol", u, "m", None)).allowed
    await a.add_tokens("carol", 60)
    assert (await b.check_request("carol", u, "m", None)).limit == "tpm"
    rps = [await (a if i % 2 else b).check_request(None, None, "m", 3) for i in range(5)]
    assert [r.allowed for r in rps] == [True, True, True, False, False]
    client = aioredis.Redis(host=host, port=port)
    await client.set("aibrix-users/dave", orjson.dumps({"name": "dave", "rpm": 7, "tpm": 0}))
    assert await a.user_limits("dave") == UserLimits(rpm=7, tpm=0)
    assert await a.user_limits("nobody") is None


async def test_redis_down_fails_open(redis_server: tuple) -> None:
    host, port, proc = redis_server
    errors: list[str] = []
    lim = RedisLimiter(PipelinedRedis(host, port, timeout=0.5), on_error=errors.append)
    assert (await lim.check_request("eve", UserLimits(rpm=1), "m", None)).allowed
    proc.kill()
    proc.wait()
    v = await lim.check_request("eve", UserLimits(rpm=1), "m", None)
    assert v.allowed and errors  # over the limit, but Redis is gone: let it through and say so


async def test_pipelined_client_bursts_and_reconnects(redis_server: tuple) -> None:
    host, port, _ = redis_server
    c = PipelinedRedis(host, port)
    results = await asyncio.gather(*(c.call("INCR", "burst") for _ in range(3000)))
    assert sorted(results) == list(range(1, 3001))  # one connection, every reply to its caller
    assert await c.call("SET", "k", "v") == b"OK" and await c.call("GET", "k") == b"v"
    assert await c.call("GET", "missing") is None
    assert await c.call("MGET", "k", "missing") == [b"v", None]
    await c.call("CLIENT", "KILL", "TYPE", "normal")  # drop our own connection server-side
    await asyncio.sleep(0.05)
    assert await c.call("GET", "k") == b"v"  # reconnected
    assert await c.eval_script("return ARGV[1]", [], ["x"]) == b"x"
