"""Router replicas share routing state through Redis: prefix-index deltas and in-flight load.

Off unless `AIBRIX_STATESYNC_ENABLED=true` and `REDIS_HOST` is set (the seed's two switches);
without it each replica routes on its own state, and Redis (if set) serves rate limits only.

* Prefix index (`prefix.py`): each replica publishes what its routing decisions add to the index
  as protobuf DeltaBatch messages (`proto/statesync.proto`) on a Redis Stream, every 5 ms; every
  replica applies the others' as they arrive (XREAD BLOCK). Joiners, and replicas that lost their
  place (Redis restarted, stream trimmed past them), catch up from the replicas' compacted
  snapshots plus the stream tail. Removed pods are propagated.
* In-flight load (`load.py`): every 100 ms each replica writes its per-pod counts and reads the
  others', so `least-request`, the prefix-cache load guards and `pd` see the fleet's load.

Key layout (one Redis Cluster hash tag per feature, so each feature lives in one slot):

    extproc:sync:{prefix}:stream          stream; entries `v1` = DeltaBatch; XADD MAXLEN ~ 10000
    extproc:sync:{prefix}:snap:<replica>  string = Snapshot of that replica's index; TTL max(60 s, 6 x interval)
    extproc:sync:{prefix}:snaps           sorted set: replica -> unix ms of its last snapshot; same TTL
    extproc:sync:{load}                   hash: replica -> LoadReport; TTL 10 s, refreshed by every write

Redis memory is bounded: the stream by MAXLEN ~ N entries of at most 4 KiB of payload each, so at
most (N + 100) x ~4.2 KB (~42 MB at the default 10,000; measured ~11.6 bytes per block carried,
so a few MB at typical batch sizes); each snapshot by the index capacity (~9 bytes per entry:
<= ~1.9 MB at the default 200,000 entries), one per live replica; the load hash by replicas x
pods with requests in flight (~40 bytes each).
"""

from statesync.keys import KeyLayout
from statesync.sync import StateSync, StateSyncSettings

__all__ = ["KeyLayout", "StateSync", "StateSyncSettings"]
