"""statesync's wire messages (statesync/codec.py): delta batches, snapshots, load reports; garbage."""

from __future__ import annotations

import os

import numpy as np
import pytest

from routing.prefix_index import PrefixIndex
from statesync import statesync_pb2 as pb
from statesync.codec import (
    MALFORMED,
    DecodeError,
    DeltaRecord,
    decode_batch,
    decode_load,
    decode_snapshot,
    encode_batch,
    encode_load,
    encode_snapshot,
)
from tests.conftest import chain

P0, P1 = "default/pod-0", "default/pod-1"


def test_batch_round_trip_and_canonical_schema() -> None:
    d1 = DeltaRecord(P0, "m", 1_700_000_000.125, chain(1, 40))
    d2 = DeltaRecord("ns2/pod-9", "other-model", 1_700_000_001.5, np.array([2**64 - 1, 1], dtype=np.uint64))
    payload = encode_batch("replica-a", 7, 1_700_000_002.0, [d1, d2], [(P1, 1_700_000_000.0)])
    batch = decode_batch(payload)
    assert (batch.replica_id, batch.seq, batch.sent, batch.invalid) == ("replica-a", 7, 1_700_000_002.0, 0)
    assert batch.removals == [(P1, 1_700_000_000.0)]
    for got, want in zip(batch.deltas, (d1, d2), strict=True):
        assert (got.pod_key, got.model, got.timestamp) == (want.pod_key, want.model, want.timestamp)
        assert np.array_equal(got.hashes, want.hashes) and got.hashes.dtype == np.uint64
    # The wire view is the canonical message, byte for byte: packed fixed64 either way.
    canonical = pb.DeltaBatch.FromString(payload)
    assert list(canonical.deltas[1].hashes) == [2**64 - 1, 1]
    assert canonical.SerializeToString() == payload
    again = pb.DeltaBatch(replica_id="b", seq=1, deltas=[pb.Delta(pod_key=P0, unix_seconds=5.0, hashes=[3, 2**63])])
    assert decode_batch(again.SerializeToString()).deltas[0].hashes.tolist() == [3, 2**63]
    # Compact: the hashes, plus a few dozen bytes per delta.
    assert len(payload) < 8 * 42 + 2 * 48 + 64


def test_garbage_is_rejected_with_a_reason() -> None:
    for junk in (b"\xff\xff\xff", b"\x0a\x05ab", os.urandom(64)):
        try:
            decode_batch(junk)
        except DecodeError as exc:
            assert exc.reason == MALFORMED
        else:  # random bytes can parse as a message; they still carry no replica id
            raise AssertionError("garbage accepted")
    with pytest.raises(DecodeError):
        decode_batch(pb.DeltaBatch(seq=3).SerializeToString())  # no replica id
    bad = pb.DeltaBatchWire(replica_id="x", deltas=[
        pb.DeltaWire(pod_key="", unix_seconds=1.0, hashes=b"\x01" * 8),          # no pod
        pb.DeltaWire(pod_key=P0, unix_seconds=1.0, hashes=b"\x01" * 7),          # not whole uint64s
        pb.DeltaWire(pod_key=P0, unix_seconds=float("nan"), hashes=b"\x01" * 8),  # no time
        pb.DeltaWire(pod_key=P0, unix_seconds=1e12, hashes=b"\x01" * 8),         # far future
        pb.DeltaWire(pod_key=P0, unix_seconds=1.0, hashes=b"\x02" * 16),         # fine
    ])
    batch = decode_batch(bad.SerializeToString(), now=100.0)
    assert batch.invalid == 4 and len(batch.deltas) == 1 and len(batch.deltas[0].hashes) == 2


def test_snapshot_round_trip_groups_entries_by_second() -> None:
    index = PrefixIndex(10_000, 600.0)
    base = 1_700_000_000.0
    for i in range(50):
        index.add(chain(i, 20), P0 if i % 2 else P1, base + i * 0.1)  # 5 seconds of traffic
    entries = index.entries(base + 10)
    payload = encode_snapshot("a", base + 10, "1-0", entries, {P0: "m", P1: "m"})
    snap = decode_snapshot(payload)
    assert (snap.replica_id, snap.stream_id) == ("a", "1-0")
    assert len(snap.entries) <= 2 * 6  # one delta per pod and second, not per request
    got = {(r.pod_key, h) for r in snap.entries for h in r.hashes.tolist()}
    want = {(pod, h) for pod, (hs, _) in entries.items() for h in hs.tolist()}
    assert got == want and len(got) == 1000
    assert [r.timestamp for r in snap.entries] == sorted(r.timestamp for r in snap.entries)
    assert len(payload) < 1000 * 8 + 12 * 40


def test_load_report_round_trip() -> None:
    payload = encode_load("a", 3, 10.0, {P0: 2, "prefill:" + P1: 1}, {P0: 500}, {P0: 120.5})
    report = decode_load(payload)
    assert (report.replica_id, report.seq) == ("a", 3)
    assert report.pods[P0].inflight == 2 and report.pods[P0].prefill_tokens == 500
    assert report.pods[P0].queued_prefill_tokens == 120.5 and report.pods["prefill:" + P1].inflight == 1
