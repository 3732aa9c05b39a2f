"""What replicas exchange, encoded as the protobuf messages of `proto/statesync.proto`.

Hashes travel through the `*Wire` views of the messages (a packed fixed64 field read as bytes),
so they go to and from numpy arrays without a Python int per hash. Decoding never trusts its
input: anything that does not parse, or parses into nonsense, raises `DecodeError` with the reason
statesync counts it under, and a single bad delta is skipped without losing its batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError as _ProtobufDecodeError

from statesync import statesync_pb2 as pb

STREAM_FIELD = b"v1"  # the stream entry field that holds a DeltaBatch; entries without it are foreign
_LE_U64 = np.dtype("<u8")
# Encoded size of one delta besides its hashes: tags, lengths, the double (pod and model strings added).
_DELTA_OVERHEAD = 24

# Reasons a message or a delta is dropped, as `extproc_statesync_deltas_dropped_total{reason}`.
MALFORMED = "malformed"  # does not parse, or has no replica id
FOREIGN = "foreign"  # a stream entry that is not ours (no `v1` field)
INVALID = "invalid"  # a delta with an empty pod, a broken hash array or a non-finite or far-future time


class DecodeError(ValueError):
    """A message that cannot be used; `reason` is one of the reasons above."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class DeltaRecord:
    """Pod `pod_key` (of `model`) was sent the blocks `hashes` (uint64, chain order) at `timestamp`."""

    pod_key: str
    model: str
    timestamp: float  # wall-clock seconds
    hashes: np.ndarray

    def encoded_size(self) -> int:
        """Bytes this delta adds to a batch (close enough for sizing messages)."""
        return _DELTA_OVERHEAD + len(self.pod_key) + len(self.model) + 8 * len(self.hashes)


@dataclass(frozen=True, slots=True)
class Batch:
    """A decoded DeltaBatch: the usable deltas and removals, and how many deltas were not usable."""

    replica_id: str
    sent: float
    seq: int
    deltas: list[DeltaRecord]
    removals: list[tuple[str, float]]  # (pod key, removed at)
    invalid: int = 0


@dataclass(frozen=True, slots=True)
class SnapshotData:
    """A decoded Snapshot."""

    replica_id: str
    taken: float
    stream_id: str
    entries: list[DeltaRecord]
    invalid: int = 0


@dataclass(frozen=True, slots=True)
class PodLoadReport:
    """One pod's line of a LoadReport."""

    inflight: int
    prefill_tokens: int
    queued_prefill_tokens: float


@dataclass(frozen=True, slots=True)
class LoadReport:
    """A decoded LoadReport."""

    replica_id: str
    seq: int
    timestamp: float
    pods: dict[str, PodLoadReport]


# -- deltas ------------------------------------------------------------------------------------

def encode_batch(replica_id: str, seq: int, sent: float, deltas: Iterable[DeltaRecord],
                 removals: Iterable[tuple[str, float]] = ()) -> bytes:
    """A DeltaBatch; hashes are written as packed fixed64 straight from the arrays."""
    msg = pb.DeltaBatchWire(replica_id=replica_id, sent_unix_seconds=sent, seq=seq)
    add = msg.deltas.add
    for d in deltas:
        add(pod_key=d.pod_key, model=d.model, unix_seconds=d.timestamp,
            hashes=d.hashes.astype(_LE_U64, copy=False).tobytes())
    for key, at in removals:
        msg.removals.add(pod_key=key, unix_seconds=at)
    return msg.SerializeToString()


def decode_batch(payload: bytes, *, now: float | None = None, max_future: float = 300.0) -> Batch:
    """Parse a DeltaBatch. DecodeError(MALFORMED) when it cannot be used at all; deltas that make no
    sense (including times more than `max_future` seconds after `now`) are left out and counted."""
    try:
        msg = pb.DeltaBatchWire.FromString(payload)
    except (_ProtobufDecodeError, RuntimeError, ValueError) as exc:
        raise DecodeError(MALFORMED, f"not a DeltaBatch ({exc})") from None
    if not msg.replica_id:
        raise DecodeError(MALFORMED, "DeltaBatch without replica_id")
    deltas, invalid = _records(msg.deltas, now, max_future)
    removals = [(r.pod_key, r.unix_seconds) for r in msg.removals if r.pod_key and math.isfinite(r.unix_seconds)]
    invalid += len(msg.removals) - len(removals)
    return Batch(msg.replica_id, msg.sent_unix_seconds, msg.seq, deltas, removals, invalid)


def _records(wires: Iterable[pb.DeltaWire], now: float | None, max_future: float) -> tuple[list[DeltaRecord], int]:
    out: list[DeltaRecord] = []
    invalid = 0
    limit = math.inf if now is None else now + max_future
    for w in wires:
        raw = w.hashes
        ts = w.unix_seconds
        if not w.pod_key or not raw or len(raw) % 8 or not math.isfinite(ts) or ts > limit:
            invalid += 1
            continue
        # The array is read-only (it views the message's bytes): the index copies what it stores.
        out.append(DeltaRecord(w.pod_key, w.model, ts, np.frombuffer(raw, dtype=_LE_U64)))
    return out, invalid


# -- snapshots ---------------------------------------------------------------------------------

def encode_snapshot(replica_id: str, taken: float, stream_id: str,
                    entries: Mapping[str, tuple[np.ndarray, np.ndarray]], pod_models: Mapping[str, str],
                    quantum: float = 1.0) -> bytes:
    """A Snapshot of an index's live entries (`PrefixIndex.entries()`): per pod, entries last used
    in the same `quantum` of seconds share one Delta stamped with the newest of their times, so
    the snapshot costs ~8 bytes per entry plus one small header per pod and second."""
    msg = pb.SnapshotWire(replica_id=replica_id, taken_unix_seconds=taken, stream_id=stream_id)
    add = msg.entries.add
    for pod, (hashes, ts) in entries.items():
        if not len(hashes):
            continue
        order = np.argsort(ts, kind="stable")
        ts_sorted = ts[order]
        raw = hashes[order].astype(_LE_U64, copy=False)
        bucket = np.floor(ts_sorted / quantum)
        cuts = (np.flatnonzero(np.diff(bucket)) + 1).tolist()
        starts = [0, *cuts]
        ends = [*cuts, len(ts_sorted)]
        model = pod_models.get(pod, "")
        newest = ts_sorted.take(np.array(ends) - 1).tolist()
        for a, b, t in zip(starts, ends, newest, strict=True):
            add(pod_key=pod, model=model, unix_seconds=t, hashes=raw[a:b].tobytes())
    return msg.SerializeToString()


def decode_snapshot(payload: bytes, *, now: float | None = None, max_future: float = 300.0) -> SnapshotData:
    """Parse a Snapshot (DecodeError(MALFORMED) when unusable); entries oldest first."""
    try:
        msg = pb.SnapshotWire.FromString(payload)
    except (_ProtobufDecodeError, RuntimeError, ValueError) as exc:
        raise DecodeError(MALFORMED, f"not a Snapshot ({exc})") from None
    if not msg.replica_id or not msg.stream_id:
        raise DecodeError(MALFORMED, "Snapshot without replica_id or stream_id")
    records, invalid = _records(msg.entries, now, max_future)
    # Oldest first: the index's LRU log then stays in time order, which its TTL sweep relies on.
    records.sort(key=lambda r: r.timestamp)
    return SnapshotData(msg.replica_id, msg.taken_unix_seconds, msg.stream_id, records, invalid)


# -- load --------------------------------------------------------------------------------------

def encode_load(replica_id: str, seq: int, timestamp: float, inflight: Mapping[str, int],
                prefill_tokens: Mapping[str, int], queued_prefill: Mapping[str, float]) -> bytes:
    """A LoadReport of the pods with requests in flight (or prefill booked)."""
    msg = pb.LoadReport(replica_id=replica_id, seq=seq, unix_seconds=timestamp)
    for key in inflight.keys() | prefill_tokens.keys():
        msg.pods.add(pod_key=key, inflight=max(0, inflight.get(key, 0)),
                     prefill_tokens=max(0, prefill_tokens.get(key, 0)),
                     queued_prefill_tokens=max(0.0, queued_prefill.get(key, 0.0)))
    return msg.SerializeToString()


def decode_load(payload: bytes) -> LoadReport:
    """Parse a LoadReport; DecodeError(MALFORMED) when unusable."""
    try:
        msg = pb.LoadReport.FromString(payload)
    except (_ProtobufDecodeError, RuntimeError, ValueError) as exc:
        raise DecodeError(MALFORMED, f"not a LoadReport ({exc})") from None
    if not msg.replica_id or not math.isfinite(msg.unix_seconds):
        raise DecodeError(MALFORMED, "LoadReport without replica_id or time")
    pods = {p.pod_key: PodLoadReport(p.inflight, p.prefill_tokens,
                                     p.queued_prefill_tokens if math.isfinite(p.queued_prefill_tokens) else 0.0)
            for p in msg.pods if p.pod_key}
    return LoadReport(msg.replica_id, msg.seq, msg.unix_seconds, pods)
