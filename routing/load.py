"""In-flight request accounting per pod, as counted by this router."""

from __future__ import annotations

import time
from collections.abc import Callable


class LoadTracker:
    """Counts requests this router has sent to each pod and not yet seen finish, and the prompt
    tokens those requests had to prefill (their uncached part, as far as the router can tell).

    Increment happens in the same synchronous step as the pick, so two concurrent decisions
    can never both see the same stale count (the race the reference has, its issue #2422).

    Prefill tokens are booked until the request ends: the router never sees the first token, so
    it cannot tell when a prefill finished. With `prefill_rate` (tokens/s) set, `queued_prefill`
    also drains each pod's booked tokens at that rate since they arrived, as the engine works
    through them, never reporting more than is still booked: a request decoding for a minute no
    longer looks like a queued prefill.

    With statesync, the other replicas' counts are added (`set_remote`): `inflight`,
    `prefill_tokens` and `queued_prefill` then answer for the whole fleet, while `snapshot`,
    `prefill_snapshot`, `local_queued_prefill` and `total` stay this router's own (what it reports
    to the others, and what its metrics show). The remote part is replaced wholesale on every read
    of the others' reports, so the request path only pays one more dict lookup.
    """

    __slots__ = ("_clock", "_inflight", "_prefill", "_queue", "_remote_inflight", "_remote_prefill",
                 "_remote_queue", "_remote_since", "_total", "prefill_rate")

    def __init__(self, prefill_rate: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._inflight: dict[str, int] = {}
        self._prefill: dict[str, int] = {}
        self._queue: dict[str, tuple[float, float]] = {}  # pod -> (queued tokens, as of time)
        self._remote_inflight: dict[str, int] = {}
        self._remote_prefill: dict[str, int] = {}
        self._remote_queue: dict[str, float] = {}  # pod -> queued tokens as of `_remote_since`
        self._remote_since = 0.0
        self._total = 0
        self.prefill_rate = prefill_rate
        self._clock = clock

    def inflight(self, pod_key: str) -> int:
        """Requests in flight on `pod_key`: this router's plus the other replicas' last reports."""
        n = self._inflight.get(pod_key, 0)
        if self._remote_inflight:
            n += self._remote_inflight.get(pod_key, 0)
        return n

    def prefill_tokens(self, pod_key: str) -> int:
        """Uncached prompt tokens of the requests in flight on `pod_key` (fleet-wide, as `inflight`)."""
        n = self._prefill.get(pod_key, 0)
        if self._remote_prefill:
            n += self._remote_prefill.get(pod_key, 0)
        return n

    def queued_prefill(self, pod_key: str) -> float:
        """Prefill tokens `pod_key` is estimated to still have queued (see the class docstring):
        this router's, plus what the other replicas reported, drained since it arrived."""
        queued = self.local_queued_prefill(pod_key)
        if self._remote_queue:
            remote = self._remote_queue.get(pod_key, 0.0)
            if remote > 0 and self.prefill_rate > 0:
                remote = max(0.0, remote - (self._clock() - self._remote_since) * self.prefill_rate)
            queued += remote
        return queued

    def local_queued_prefill(self, pod_key: str) -> float:
        """`queued_prefill` of this router's own requests only."""
        booked = self._prefill.get(pod_key, 0)
        if booked == 0 or self.prefill_rate <= 0:
            return float(booked)
        queued, since = self._queue.get(pod_key, (0.0, 0.0))
        return min(float(booked), max(0.0, queued - (self._clock() - since) * self.prefill_rate))

    def set_remote(self, inflight: dict[str, int], prefill_tokens: dict[str, int] | None = None,
                   queued_prefill: dict[str, float] | None = None) -> None:
        """Replace the other replicas' part: per pod key, their summed in-flight requests, booked
        prefill tokens and estimated queued prefill tokens (as of now). Empty dicts drop it."""
        self._remote_inflight = inflight
        self._remote_prefill = prefill_tokens or {}
        self._remote_queue = queued_prefill or {}
        self._remote_since = self._clock()

    def acquire(self, pod_key: str, prefill_tokens: int = 0) -> None:
        self._inflight[pod_key] = self._inflight.get(pod_key, 0) + 1
        self._total += 1
        if prefill_tokens > 0:
            self._prefill[pod_key] = self._prefill.get(pod_key, 0) + prefill_tokens
            if self.prefill_rate > 0:
                now = self._clock()
                queued, since = self._queue.get(pod_key, (0.0, now))
                self._queue[pod_key] = (max(0.0, queued - (now - since) * self.prefill_rate) + prefill_tokens, now)

    def release(self, pod_key: str, prefill_tokens: int = 0) -> None:
        n = self._inflight.get(pod_key, 0)
        if n <= 1:
            self._inflight.pop(pod_key, None)
        else:
            self._inflight[pod_key] = n - 1
        if n > 0:
            self._total -= 1
        if prefill_tokens > 0:
            left = self._prefill.get(pod_key, 0) - prefill_tokens
            if left > 0:
                self._prefill[pod_key] = left
            else:
                self._prefill.pop(pod_key, None)
                self._queue.pop(pod_key, None)

    @property
    def total(self) -> int:
        return self._total

    def snapshot(self) -> dict[str, int]:
        """This router's own in-flight requests per pod."""
        return dict(self._inflight)

    def prefill_snapshot(self) -> dict[str, int]:
        """This router's own booked prefill tokens per pod."""
        return dict(self._prefill)

    def forget(self, keep: set[str]) -> None:
        """Drop counters of pods that no longer exist (their streams release into nothing)."""
        for key in [k for k in self._inflight if k not in keep]:
            self._total -= self._inflight.pop(key)
        for key in [k for k in self._prefill if k not in keep]:
            del self._prefill[key]
            self._queue.pop(key, None)
