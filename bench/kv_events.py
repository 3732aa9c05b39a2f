"""KV-event ingest: how many block events per second one router process applies to its precise index,
and at what CPU cost, over real ZeroMQ from another process.

A publisher process speaks vLLM's wire format (PUB `[topic, seq, msgpack KVEventBatch]`, array
layout) and sends pre-encoded batches; this process runs the router's subscriber
(`extproc_router/kv_events.py`) on its event loop, feeding a `KvBlockIndex`. A "block event" is
one block stored or removed. The workload keeps the index at a steady size: every batch stores new
16-token blocks (chains of `--blocks-per-event` blocks, each a BlockStored event) and removes as
many blocks stored a while before.

Cases:
  paced   - the publisher sends `--rate` block events/s (default 50,000); reported: the router
            process's CPU time (all threads, ZeroMQ's I/O thread included) per wall second, and the
            lag from a batch's timestamp to its application (mean and p99 from the histogram)
  flood   - the publisher sends as fast as it can; reported: block events applied per wall second
            and per CPU second of the router process
each with realistic batches (`--events-per-batch` events of `--blocks-per-event` blocks: vLLM sends
one batch per engine step) and with one single-block event per batch (the worst case per event).

    .venv/bin/python bench/kv_events.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import random
import struct
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from extproc_router.discovery.static_file import ANNOTATION_KV_EVENTS_PORT  # noqa: E402
from extproc_router.kv_events import KvEventSettings, KvEventSubscribers  # noqa: E402
from routing.kv_index import KvBlockIndex  # noqa: E402
from routing.pods import Pod  # noqa: E402
from routing.tokenizers import make_engine_tokenizer  # noqa: E402

MODEL = "bench-model"
BLOCK = 16


# -- publisher process --------------------------------------------------------------------------------

def make_batches(n_batches: int, events_per_batch: int, blocks_per_event: int, seed: int) -> list[tuple[bytes, int]]:
    """(payload without timestamp patching, block events) per batch; removals trail the stores by a
    window so the index stays at a steady size."""
    import msgspec

    rng = random.Random(seed)
    enc = msgspec.msgpack.Encoder()
    stored: list[list[int]] = []
    window = 2000  # chains kept before their blocks are removed
    out = []
    next_hash = 1
    for _ in range(n_batches):
        events: list[list] = []
        blocks = 0
        half = max(1, events_per_batch // 2)
        for _ in range(half):
            hashes = list(range(next_hash, next_hash + blocks_per_event))
            next_hash += blocks_per_event
            tokens = [rng.randrange(100_000) for _ in range(blocks_per_event * BLOCK)]
            events.append(["BlockStored", hashes, None, tokens, BLOCK, None, "GPU"])
            stored.append(hashes)
            blocks += blocks_per_event
        for _ in range(events_per_batch - half):
            if len(stored) > window:
                old = stored.pop(0)
                events.append(["BlockRemoved", old, "GPU"])
                blocks += len(old)
        out.append((enc.encode([0.0, events, 0]), blocks))
    return out


def publisher(conn: Connection, n_batches: int, events_per_batch: int, blocks_per_event: int, rate: float) -> None:
    import msgspec
    import zmq

    batches = make_batches(n_batches, events_per_batch, blocks_per_event, seed=1)
    enc = msgspec.msgpack.Encoder()
    # Every payload starts [ts, ...] with ts a float64 (msgpack 0x93 0xcb + 8 bytes): patched in place.
    assert all(p[:2] == b"\x93\xcb" for p, _ in batches)
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)  # never drop: the bench measures what the router keeps up with
    pub.bind("tcp://127.0.0.1:*")
    conn.send(int(pub.getsockopt_string(zmq.LAST_ENDPOINT).rpartition(":")[2]))
    conn.recv()  # the subscriber is connected
    # Warm-up messages until the subscriber says it has one (a SUB socket joins asynchronously).
    seq = 0
    while not conn.poll(0.05):
        pub.send_multipart([b"", seq.to_bytes(8, "big"), enc.encode([time.time(), [], 0])])
        seq += 1
    conn.recv()
    start = time.perf_counter()
    sent_blocks = 0
    for payload, blocks in batches:
        if rate > 0:
            due = start + sent_blocks / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        stamped = payload[:2] + struct.pack(">d", time.time()) + payload[10:]
        pub.send_multipart([b"", seq.to_bytes(8, "big"), stamped])
        seq += 1
        sent_blocks += blocks
    conn.send((seq - 1, sent_blocks, time.perf_counter() - start))
    conn.recv()
    pub.close(linger=0)
    ctx.term()


# -- router side ----------------------------------------------------------------------------------------

async def run_case(events_per_batch: int, blocks_per_event: int, n_batches: int, rate: float) -> dict:
    mp = multiprocessing.get_context("spawn")
    parent, child = mp.Pipe()
    proc = mp.Process(target=publisher, args=(child, n_batches, events_per_batch, blocks_per_event, rate))
    proc.start()
    loop = asyncio.get_running_loop()
    port = await loop.run_in_executor(None, parent.recv)
    index = KvBlockIndex()
    index.set_tokenizers({}, make_engine_tokenizer("bytes"))
    subs = KvEventSubscribers(index, KvEventSettings())
    await subs.start()
    pod = Pod("bench-pod", "127.0.0.1:8000", MODEL, annotations={ANNOTATION_KV_EVENTS_PORT: str(port)})
    subs.set_pods([pod])
    parent.send("connected")
    sub = subs.subscriber(pod.key)
    assert sub is not None
    while sub.stats.batches == 0:
        await asyncio.sleep(0.01)
    warm = sub.stats.batches
    warm_events = sub.stats.events
    lag0 = (list(sub.stats.lag_buckets), sub.stats.lag_sum, sub.stats.lag_count)
    cpu0, wall0, main0 = time.process_time(), time.perf_counter(), time.thread_time()
    parent.send("go")
    last_seq, blocks, _ = await loop.run_in_executor(None, parent.recv)
    while sub._last is None or sub._last < last_seq:
        await asyncio.sleep(0.01)
    cpu, wall, main = time.process_time() - cpu0, time.perf_counter() - wall0, time.thread_time() - main0
    parent.send("done")
    await loop.run_in_executor(None, proc.join)
    st = sub.stats
    buckets = [b - a for a, b in zip(lag0[0], st.lag_buckets, strict=True)]
    n_lag = st.lag_count - lag0[2]
    bounds = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf")]
    cum, p99 = 0, bounds[-1]
    for bound, n in zip(bounds, buckets, strict=True):
        cum += n
        if cum >= 0.99 * n_lag:
            p99 = bound
            break
    result = {
        "events_per_batch": events_per_batch, "blocks_per_event": blocks_per_event, "target_rate": rate,
        "batches": st.batches - warm, "events": st.events - warm_events, "block_events": blocks,
        "wall_s": round(wall, 3), "router_cpu_s": round(cpu, 3),
        "block_events_per_s": round(blocks / wall), "block_events_per_cpu_s": round(blocks / cpu) if cpu else None,
        "cpu_share_of_a_core": round(cpu / wall, 3),
        "event_loop_thread_share": round(main / wall, 3),  # the rest: ZeroMQ's I/O thread
        "lag_mean_ms": round((st.lag_sum - lag0[1]) / n_lag * 1e3, 2) if n_lag else None,
        "lag_p99_ms_le": p99 * 1e3 if p99 != float("inf") else None,
        "index_blocks": len(index), "malformed": st.malformed_batches + st.malformed_events, "gaps": st.gaps,
    }
    await subs.stop()
    return result


async def amain(args: argparse.Namespace) -> dict:
    results: dict = {"machine": {"python": platform.python_version(), "machine": platform.machine(),
                                 "cpus": os.cpu_count()}, "cases": []}
    total = 200_000 if args.quick else 1_000_000  # block events per case
    shapes = [(args.events_per_batch, args.blocks_per_event), (1, 1)]
    print(f"{'case':>6} {'ev/batch':>8} {'blk/ev':>6} {'block ev':>9} {'wall s':>7} {'blk ev/s':>9} "
          f"{'per CPU s':>10} {'CPU/core':>8} {'lag mean ms':>11} {'lag p99 ms<=':>12}")
    for case, rate in (("paced", args.rate), ("flood", 0.0)):
        for events_per_batch, blocks_per_event in shapes:
            per_batch = max(1, events_per_batch * blocks_per_event)
            n_batches = max(10, total // per_batch)
            if events_per_batch == 1 and case == "paced":
                n_batches //= 4  # one message per block event: fewer of them
            row = await run_case(events_per_batch, blocks_per_event, n_batches, rate)
            row["case"] = case
            results["cases"].append(row)
            print(f"{case:>6} {events_per_batch:>8} {blocks_per_event:>6} {row['block_events']:>9} "
                  f"{row['wall_s']:>7} {row['block_events_per_s']:>9} {row['block_events_per_cpu_s']:>10} "
                  f"{row['cpu_share_of_a_core']:>8} {row['lag_mean_ms']!s:>11} {row['lag_p99_ms_le']!s:>12}")
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="200k block events per case instead of 1M")
    ap.add_argument("--rate", type=float, default=50_000.0, help="paced case: block events per second")
    ap.add_argument("--events-per-batch", type=int, default=16)
    ap.add_argument("--blocks-per-event", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "kv_events.json"))
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    results = asyncio.run(amain(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
