"""Redis key layout of statesync (documented in the package docstring and the README).

Each feature keeps all its keys under one Redis Cluster hash tag (`{prefix}`, `{load}`), so each
feature's keys share one slot: whatever node holds the stream also holds the snapshots that point
into it, and no command ever spans two slots.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_NAMESPACE = "extproc:sync"


@dataclass(frozen=True, slots=True)
class KeyLayout:
    """Key names under `namespace` (change it to run two independent fleets on one Redis)."""

    namespace: str = DEFAULT_NAMESPACE

    @property
    def stream(self) -> str:
        """Stream of DeltaBatch entries (field `v1`), trimmed with XADD MAXLEN ~."""
        return f"{self.namespace}:{{prefix}}:stream"

    @property
    def snapshots(self) -> str:
        """Sorted set: replica id -> when (unix ms) it last wrote its snapshot."""
        return f"{self.namespace}:{{prefix}}:snaps"

    def snapshot(self, replica_id: str) -> str:
        """One replica's compacted Snapshot (string with a TTL)."""
        return f"{self.namespace}:{{prefix}}:snap:{replica_id}"

    @property
    def load(self) -> str:
        """Hash: replica id -> its LoadReport (the hash has a TTL, refreshed by every writer)."""
        return f"{self.namespace}:{{load}}"
