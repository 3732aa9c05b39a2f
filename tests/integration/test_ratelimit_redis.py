"""The Redis-backed rate limiter (extproc_router/ratelimit/redis_limiter.py) against a real Redis."""

from __future__ import annotations

import asyncio

import orjson
import redis.asyncio as aioredis

from extproc_router.ratelimit.limits import UserLimits
from extproc_router.ratelimit.redis_limiter import RedisLimiter
from extproc_router.resp import PipelinedRedis


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
