"""In-flight request accounting per pod, as counted by this router."""

from __future__ import annotations


class LoadTracker:
    """Counts requests this router has sent to each pod and not yet seen finish.

    Increment happens in the same synchronous step as the pick, so two concurrent decisions
    can never both see the same stale count (the race the reference has, its issue #2422).
    """

    __slots__ = ("_inflight", "_total")

    def __init__(self) -> None:
        self._inflight: dict[str, int] = {}
        self._total = 0

    def inflight(self, pod_key: str) -> int:
        return self._inflight.get(pod_key, 0)

    def acquire(self, pod_key: str) -> None:
        self._inflight[pod_key] = self._inflight.get(pod_key, 0) + 1
        self._total += 1

    def release(self, pod_key: str) -> None:
        n = self._inflight.get(pod_key, 0)
        if n <= 1:
            self._inflight.pop(pod_key, None)
        else:
            self._inflight[pod_key] = n - 1
        if n > 0:
            self._total -= 1

    @property
    def total(self) -> int:
        return self._total

    def snapshot(self) -> dict[str, int]:
        return dict(self._inflight)

    def forget(self, keep: set[str]) -> None:
        """Drop counters of pods that no longer exist (their streams release into nothing)."""
        for key in [k for k in self._inflight if k not in keep]:
            self._total -= self._inflight.pop(key)
