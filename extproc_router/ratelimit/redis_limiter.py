"""Rate limits shared by every router replica through Redis, atomically (Lua), failing open.

Key layout (Redis Cluster safe: each script touches keys of one hash tag):
  extproc:rl:{u:<user>}:rpm:<minute>   requests this minute   (TTL 120 s)
  extproc:rl:{u:<user>}:tpm:<minute>   tokens this minute     (TTL 120 s)
  extproc:rl:{m:<model>}:rps:<second>  requests this second   (TTL 5 s)
  aibrix-users/<user>                  JSON {"name", "rpm", "tpm"}: limits set by operators (read, cached 5 s)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import orjson

from extproc_router.ratelimit.limits import LOOKUP, Lookup, UserLimits, Verdict, window
from extproc_router.resp import PipelinedRedis, RespError

RedisError = (RespError, ConnectionError, OSError, TimeoutError)

log = logging.getLogger("extproc_router.ratelimit")

# Returns {0} allowed, {1} rpm exceeded, {2} tpm exceeded. The RPM increment happens only when
# both checks pass, in the same atomic step, so two replicas can never both take the last slot.
_USER_SCRIPT = """
local rpm_limit = tonumber(ARGV[1])
local tpm_limit = tonumber(ARGV[2])
if rpm_limit > 0 and tonumber(redis.call('GET', KEYS[1]) or '0') >= rpm_limit then return 1 end
if tpm_limit > 0 and tonumber(redis.call('GET', KEYS[2]) or '0') >= tpm_limit then return 2 end
if rpm_limit > 0 then
  redis.call('INCR', KEYS[1])
  redis.call('EXPIRE', KEYS[1], 120)
end
return 0
"""
_RPS_SCRIPT = """
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n >= tonumber(ARGV[1]) then return 1 end
redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], 5)
return 0
"""
_ADD_SCRIPT = """
redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], 120)
return 0
"""
_USER_CACHE_S = 5.0


class RedisLimiter:
    """Same interface as LocalLimiter. Any Redis error lets the request through (fail open): rate
    limiting must never take routing down; `on_error` is told so it can be logged and counted."""

    def __init__(self, client: PipelinedRedis, *, clock: Callable[[], float] = time.time,
                 on_error: Callable[[str], None] | None = None) -> None:
        self._r = client
        self._clock = clock
        self._on_error = on_error
        self._users: dict[str, tuple[float, UserLimits | None]] = {}
        self._last_warning = 0.0

    def _failed(self, what: str, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_warning > 10:  # one line per 10 s, not one per request
            log.warning("Redis %s failed (%s); rate limits are not enforced until it is back", what, exc)
            self._last_warning = now
        if self._on_error:
            self._on_error(what)

    def check_request_now(self, user: str | None, limits: UserLimits | None, model: str,
                          model_rps: float | None) -> None:
        return None  # always a Redis round trip

    def user_limits_now(self, user: str) -> Lookup:
        return LOOKUP

    async def user_limits(self, user: str) -> UserLimits | None:
        """Limits stored under aibrix-users/<user>, cached briefly; None when absent."""
        now = time.monotonic()
        hit = self._users.get(user)
        if hit is not None and now - hit[0] < _USER_CACHE_S:
            return hit[1]
        try:
            raw = await self._r.call("GET", f"aibrix-users/{user}")
        except RedisError as exc:
            self._failed("user lookup", exc)
            return hit[1] if hit else None
        limits = None
        if raw:
            try:
                doc = orjson.loads(raw)
                limits = UserLimits(rpm=int(doc.get("rpm") or 0), tpm=int(doc.get("tpm") or 0))
            except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
                log.warning("aibrix-users/%s is not valid JSON {name, rpm, tpm}; ignoring it", user)
        self._users[user] = (now, limits)
        return limits

    async def check_request(self, user: str | None, limits: UserLimits | None, model: str,
                            model_rps: float | None) -> Verdict:
        now = self._clock()
        try:
            if user and limits and (limits.rpm or limits.tpm):
                minute, left = window(now, 60)
                tag = f"extproc:rl:{{u:{user}}}"
                res = await self._r.eval_script(_USER_SCRIPT, [f"{tag}:rpm:{minute}", f"{tag}:tpm:{minute}"],
                                                [limits.rpm, limits.tpm])
                if res == 1:
                    return Verdict(False, "rpm", left, f"user {user!r} is over {limits.rpm} requests/minute")
                if res == 2:
                    return Verdict(False, "tpm", left, f"user {user!r} is over {limits.tpm} tokens/minute")
            if model_rps:
                second, left = window(now, 1)
                res = await self._r.eval_script(_RPS_SCRIPT, [f"extproc:rl:{{m:{model}}}:rps:{second}"], [model_rps])
                if res == 1:
                    return Verdict(False, "model-rps", left, f"model {model!r} is over {model_rps:g} requests/s")
        except RedisError as exc:
            self._failed("rate-limit check", exc)
        return Verdict.ok()

    async def add_tokens(self, user: str, tokens: int) -> None:
        minute, _ = window(self._clock(), 60)
        key = f"extproc:rl:{{u:{user}}}:tpm:{minute}"
        try:
            await self._r.eval_script(_ADD_SCRIPT, [key], [tokens])
        except RedisError as exc:
            self._failed("token accounting", exc)
