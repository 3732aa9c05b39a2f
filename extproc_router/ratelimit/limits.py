"""Limits, verdicts and the in-process limiter (one router process; see RedisLimiter for several)."""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class UserLimits:
    rpm: int = 0  # 0 = unlimited
    tpm: int = 0


@dataclass(frozen=True, slots=True)
class Verdict:
    """`allowed`, or which limit tripped (`rpm`, `tpm`, `model-rps`) and when to retry."""

    allowed: bool
    limit: str = ""
    retry_after: int = 0
    detail: str = ""

    @staticmethod
    def ok() -> Verdict:
        return _OK


_OK = Verdict(True)


def window(now: float, seconds: int) -> tuple[int, int]:
    """The fixed window containing `now` and whole seconds until it ends (at least 1)."""
    idx = int(now // seconds)
    return idx, max(1, math.ceil((idx + 1) * seconds - now))


class Limiter(Protocol):
    """What request control needs of a rate limiter (LocalLimiter, RedisLimiter)."""

    def check_request_now(self, user: str | None, limits: UserLimits | None, model: str,
                          model_rps: float | None) -> Verdict | None:
        """The verdict when it can be given without waiting (in-process counts); None: await
        `check_request`."""
        ...

    async def check_request(self, user: str | None, limits: UserLimits | None, model: str,
                            model_rps: float | None) -> Verdict: ...

    def user_limits_now(self, user: str) -> UserLimits | Lookup | None:
        """Limits of a user the configuration does not list, when known without waiting; `LOOKUP`:
        await `user_limits` (a shared store)."""
        ...

    async def user_limits(self, user: str) -> UserLimits | None: ...

    async def add_tokens(self, user: str, tokens: int) -> None: ...


class Lookup(enum.Enum):
    """`user_limits_now`'s answer when only the shared store knows."""

    NEEDED = "lookup"


LOOKUP = Lookup.NEEDED


class LocalLimiter:
    """Fixed-window counters in this process. With several router replicas each counts alone, so a
    user's effective limit is N x the configured one: use Redis (REDIS_HOST) to share the budget."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._counts: dict[tuple[str, str, int], int] = {}

    def _get(self, kind: str, key: str, idx: int) -> int:
        return self._counts.get((kind, key, idx), 0)

    def _gc(self, idx_minute: int) -> None:
        if len(self._counts) > 10000:
            self._counts = {k: v for k, v in self._counts.items()
                            if (k[0] == "rps" and k[2] >= idx_minute * 60 - 1) or k[2] >= idx_minute - 1}

    async def check_request(self, user: str | None, limits: UserLimits | None, model: str,
                            model_rps: float | None) -> Verdict:
        return self.check_request_now(user, limits, model, model_rps)

    def user_limits_now(self, user: str) -> UserLimits | None:
        return None  # nothing beyond the configuration, which request control reads itself

    async def user_limits(self, user: str) -> UserLimits | None:
        return None

    def check_request_now(self, user: str | None, limits: UserLimits | None, model: str,
                          model_rps: float | None) -> Verdict:
        now = self._clock()
        minute, minute_left = window(now, 60)
        self._gc(minute)
        if user and limits and (limits.rpm or limits.tpm):
            if limits.rpm and self._get("rpm", user, minute) >= limits.rpm:
                return Verdict(False, "rpm", minute_left, f"user {user!r} is over {limits.rpm} requests/minute")
            if limits.tpm and self._get("tpm", user, minute) >= limits.tpm:
                return Verdict(False, "tpm", minute_left, f"user {user!r} is over {limits.tpm} tokens/minute")
        if model_rps:
            second, second_left = window(now, 1)
            if self._get("rps", model, second) >= model_rps:
                return Verdict(False, "model-rps", second_left, f"model {model!r} is over {model_rps:g} requests/s")
            self._counts[("rps", model, second)] = self._get("rps", model, second) + 1
        if user and limits and limits.rpm:
            self._counts[("rpm", user, minute)] = self._get("rpm", user, minute) + 1
        return Verdict.ok()

    async def add_tokens(self, user: str, tokens: int) -> None:
        minute, _ = window(self._clock(), 60)
        self._counts[("tpm", user, minute)] = self._get("tpm", user, minute) + tokens
