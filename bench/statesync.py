"""Cross-replica state sync benchmark: 3 router replicas with statesync vs without vs 1 replica.

One set of model-timed simulated pods (``--timing model``, as bench/quality.py: a KV cache that
one pod's share of the prefixes overflows), one Redis, and per arm fresh router processes behind
one Envoy, all on this machine:

* ``1 replica``           one router: the hit rate a fleet should keep;
* ``3 replicas, no sync`` three routers, each on its own (each in its own statesync namespace, so
                          it shares nothing but its index stays observable through its snapshot);
* ``3 replicas, sync``    three routers sharing prefix-index deltas and in-flight load.

Each arm sends the same seeded workload (shared-prefix: Poisson arrivals; multi-turn: a closed
loop) with ``routing-strategy: prefix-cache``, the pods flushed before it (POST /sim/reset), and
reports the achieved hit rate and TTFT. For the replicated arms it also reports the decision
agreement: every replica's final index (from its snapshot in Redis) replays every request's
prefix match, and a request counts as agreed when all replicas would pick the same best-matching
pods. The sync arms add the propagation lag (the routers' histogram: decision on one replica to
apply on another), Redis commands/s and Redis memory per 1,000 blocks. A short transport probe
compares Redis Streams (XADD -> XREAD BLOCK) with pub/sub (PUBLISH -> SUBSCRIBE) one-way latency.

    .venv/bin/python bench/statesync.py                       # both workloads, 2 repeats: ~3 min on 2 cores
    .venv/bin/python bench/statesync.py --workload shared-prefix --requests 300

Prints a table and writes --out (default bench/results/statesync.json); process logs go to
bench/results/statesync-run/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# Run as a script, this file's folder comes first on sys.path, and its name would shadow the
# `statesync` package: take the folder off, and load bench/quality.py by path instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import orjson  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from extproc_router.loadtest.oracle import Oracle, load_tokenizer  # noqa: E402
from extproc_router.loadtest.report import summarize  # noqa: E402
from extproc_router.loadtest.runner import Arm, ArmResult, RunSettings, run_arm  # noqa: E402
from extproc_router.loadtest.workloads import WorkloadSpec  # noqa: E402
from extproc_router.stack import LocalStack, StackOptions  # noqa: E402
from routing.pods import Pod  # noqa: E402
from routing.prefix_index import PrefixIndex  # noqa: E402
from routing.request import CHAT_PATH, parse_body  # noqa: E402
from routing.strategies.prefix_cache import PrefixCacheSettings, PrefixCacheStrategy  # noqa: E402
from statesync.codec import STREAM_FIELD, decode_batch, decode_snapshot  # noqa: E402

_quality_spec = importlib.util.spec_from_file_location("bench_quality", BENCH / "quality.py")
assert _quality_spec is not None and _quality_spec.loader is not None
_quality = sys.modules["bench_quality"] = importlib.util.module_from_spec(_quality_spec)  # dataclasses need it
_quality_spec.loader.exec_module(_quality)
sim_args = _quality.sim_args  # the simulator flags bench/quality.py uses (model timing)

MODEL = "demo-model"
SNAPSHOT_INTERVAL_S = 1.0  # routers write snapshots every second here: the agreement replay reads them


@dataclass(frozen=True)
class ArmSpec:
    """One routing setup: how many routers, and what each one's environment adds."""

    name: str
    replicas: int
    sync: str  # "off" (no statesync), "isolated" (statesync, own namespace each), "shared"

    def env(self, replica: int, load_interval_ms: int = 100) -> dict[str, str]:
        common = {"EXTPROC_ROUTER_STATESYNC_SNAPSHOT_INTERVAL": str(SNAPSHOT_INTERVAL_S),
                  "EXTPROC_ROUTER_STATESYNC_LOAD_INTERVAL_MS": str(load_interval_ms)}
        if self.sync == "off":
            return {**common, "AIBRIX_STATESYNC_ENABLED": "false"}
        if self.sync == "isolated":
            return {**common, "EXTPROC_ROUTER_STATESYNC_NAMESPACE": f"bench:isolated:{replica}"}
        return common


ARMS = (ArmSpec("1 replica", 1, "off"), ArmSpec("3 replicas, no sync", 3, "isolated"),
        ArmSpec("3 replicas, sync", 3, "shared"))


@dataclass
class WorkloadPlan:
    name: str
    spec: WorkloadSpec
    rate: float | None = None
    concurrency: int = 8
    extra: dict[str, Any] = field(default_factory=dict)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=["shared-prefix", "multi-turn", "both"], default="both")
    p.add_argument("--requests", type=int, default=200, help="shared-prefix requests per arm (multi-turn: 10 x 5)")
    p.add_argument("--rate", type=float, default=20.0, help="shared-prefix Poisson arrivals per second")
    p.add_argument("--pods", type=int, default=4)
    p.add_argument("--kv-capacity-tokens", type=int, default=16384, help="per pod (bench/quality.py's default)")
    p.add_argument("--load-interval-ms", type=int, default=100,
                   help="how often the replicas exchange in-flight load (EXTPROC_ROUTER_STATESYNC_LOAD_INTERVAL_MS)")
    p.add_argument("--repeats", type=int, default=2, help="runs of every arm per workload, in rotated order")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "statesync.json")
    return p.parse_args(argv)


def plans(args: argparse.Namespace) -> list[WorkloadPlan]:
    out = []
    if args.workload in ("shared-prefix", "both"):
        out.append(WorkloadPlan("shared-prefix", WorkloadSpec(name="shared-prefix", requests=args.requests),
                                rate=args.rate))
    if args.workload in ("multi-turn", "both"):
        out.append(WorkloadPlan("multi-turn", WorkloadSpec(name="multi-turn", users=10, rounds=5), concurrency=10))
    return out


# ------------------------------------------------------------------------------------- processes


class BenchStack(LocalStack):
    """The local stack whose routers and Envoy are replaced per arm while pods and Redis stay up."""

    arm: ArmSpec = ARMS[0]
    load_interval_ms = 100
    _replica_env: dict[str, str] = {}  # replaced (not mutated) per router start

    def router_env(self) -> dict[str, str]:
        return {**super().router_env(), **self._replica_env}

    def start_router(self, replica: int = 0) -> None:
        self._replica_env = self.arm.env(replica, self.load_interval_ms)
        super().start_router(replica)

    def start_routing(self, arm: ArmSpec, all_routers: list) -> None:
        self.arm = arm
        self.routers = all_routers[:arm.replicas]
        for i in range(arm.replicas):
            self.start_router(i)
        self.start_envoy()

    def stop_routing(self) -> None:
        for name in ["envoy", *(r.name for r in self.routers)]:
            self.kill(name, signal.SIGTERM)


# ----------------------------------------------------------------------------------------- probes


async def router_samples(http: aiohttp.ClientSession, url: str) -> list[tuple[str, dict[str, str], float]]:
    async with http.get(url + "/metrics") as resp:
        text = await resp.text()
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def histogram_quantiles(buckets: dict[float, float], qs: tuple[float, ...]) -> dict[str, float | None]:
    """Quantiles (ms) from cumulative Prometheus buckets, linear within a bucket."""
    bounds = sorted(buckets)
    total = buckets[math.inf] if bounds else 0
    out: dict[str, float | None] = {}
    for q in qs:
        if not total:
            out[f"p{round(q * 100)}"] = None
            continue
        rank = q * total
        lo_bound, lo_count = 0.0, 0.0
        for b in bounds:
            if buckets[b] >= rank:
                if b == math.inf:
                    value = lo_bound
                else:
                    span = buckets[b] - lo_count
                    value = lo_bound + (b - lo_bound) * ((rank - lo_count) / span if span else 1.0)
                out[f"p{round(q * 100)}"] = round(value * 1000, 2)
                break
            lo_bound, lo_count = b, buckets[b]
    return out


async def lag_and_counters(stack: LocalStack) -> dict[str, Any]:
    buckets: dict[float, float] = {}
    count = total = 0.0
    counters: dict[str, float] = {}
    async with aiohttp.ClientSession() as http:
        for r in stack.routers:
            for name, labels, value in await router_samples(http, r.http_url):
                if name == "extproc_statesync_propagation_lag_seconds_bucket":
                    le = float(labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + value
                elif name == "extproc_statesync_propagation_lag_seconds_count":
                    count += value
                elif name == "extproc_statesync_propagation_lag_seconds_sum":
                    total += value
                elif name.startswith("extproc_statesync_") and name.endswith("_total"):
                    key = name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}" if labels else "")
                    counters[key] = counters.get(key, 0.0) + value
    return {"lag_ms": lag_summary(buckets, count, total), "lag_buckets": {str(k): v for k, v in buckets.items()},
            "counters": counters}


def lag_summary(buckets: dict[float, float], count: float, total: float) -> dict[str, Any]:
    lag: dict[str, Any] = histogram_quantiles(buckets, (0.5, 0.9, 0.99))
    lag["samples"] = int(count)
    lag["mean"] = round(total / count * 1000, 2) if count else None
    lag["share_le_50ms"] = round(buckets.get(0.05, 0.0) / count, 4) if count else None
    return lag


async def redis_info(r: aioredis.Redis) -> dict[str, Any]:
    stats = await r.info("stats")
    memory = await r.info("memory")
    cmd = await r.info("commandstats")
    return {"commands": stats["total_commands_processed"], "used_memory": memory["used_memory"],
            "per_command": {k.removeprefix("cmdstat_"): v["calls"] for k, v in cmd.items()}}


async def redis_footprint(r: aioredis.Redis, namespace: str = "extproc:sync") -> dict[str, Any]:
    """Bytes Redis holds for the stream and the snapshots, per 1,000 blocks they carry."""
    stream = f"{namespace}:{{prefix}}:stream"
    entries = await r.xrange(stream)
    hashes = 0
    for _, fields in entries:
        with contextlib.suppress(Exception):
            hashes += sum(len(d.hashes) for d in decode_batch(fields[STREAM_FIELD]).deltas)
    stream_bytes = await r.memory_usage(stream, samples=0) or 0
    snap_bytes = snap_entries = 0
    for key in await r.keys(f"{namespace}:{{prefix}}:snap:*"):
        payload = await r.get(key)
        snap_bytes += await r.memory_usage(key, samples=0) or 0
        snap_entries += sum(len(e.hashes) for e in decode_snapshot(payload).entries)
    load_bytes = await r.memory_usage(f"{namespace}:{{load}}", samples=0) or 0
    return {
        "stream_entries": len(entries), "stream_blocks": hashes, "stream_bytes": stream_bytes,
        "stream_bytes_per_1000_blocks": round(stream_bytes * 1000 / hashes) if hashes else None,
        "snapshot_entries": snap_entries, "snapshot_bytes": snap_bytes,
        "snapshot_bytes_per_1000_entries": round(snap_bytes * 1000 / snap_entries) if snap_entries else None,
        "load_hash_bytes": load_bytes,
    }


async def replica_indexes(r: aioredis.Redis) -> list[PrefixIndex]:
    """Every replica's final index, rebuilt from its latest snapshot in Redis."""
    out = []
    now = time.time()
    for key in sorted(await r.keys("*:{prefix}:snap:*")):
        snap = decode_snapshot(await r.get(key))
        index = PrefixIndex(200_000, 1200.0)
        for e in snap.entries:
            index.merge(e.hashes, e.pod_key, e.timestamp, now)
        out.append(index)
    return out


def agreement(indexes: list[PrefixIndex], result: ArmResult, pods: list[Pod]) -> dict[str, Any]:
    """Share of the arm's requests for which every replica's index picks the same best-matching pods."""
    strategies = [PrefixCacheStrategy(PrefixCacheSettings(), index=ix) for ix in indexes]
    agreed = matched = n = 0
    pairwise: list[float] = []
    for rec in result.records:
        if not rec.ok:
            continue
        request = parse_body(CHAT_PATH, orjson.dumps({"model": MODEL, **rec.body}))
        bests = []
        for s in strategies:
            shares = s.match_shares(request, pods)
            top = max(shares.values(), default=0.0)
            bests.append(frozenset(k for k, v in shares.items() if v == top) if top else frozenset())
        n += 1
        agreed += len(set(bests)) == 1
        matched += any(bests)
        pairs = [(a, b) for i, a in enumerate(bests) for b in bests[i + 1:]]
        pairwise.append(sum(a == b for a, b in pairs) / len(pairs))
    return {"requests": n, "all_agree": round(agreed / n, 4) if n else None,
            "pairwise": round(statistics.mean(pairwise), 4) if pairwise else None,
            "with_a_match": matched}


async def transport_probe(port: int, n: int = 400, size: int = 2048) -> dict[str, Any]:
    """One-way latency (same process, same clock) of a 2 KiB message: stream vs pub/sub."""
    payload = b"x" * size
    out: dict[str, Any] = {}
    r_pub, r_sub = aioredis.Redis(port=port), aioredis.Redis(port=port)
    try:
        lat: list[float] = []
        last = "$"
        await r_pub.delete("bench:probe:stream")

        async def read_stream() -> None:
            nonlocal last
            got = 0
            while got < n:
                reply = await r_sub.xread({"bench:probe:stream": last}, block=1000, count=100)
                for _, entries in reply or ():
                    for eid, fields in entries:
                        lat.append(time.perf_counter() - float(fields[b"t"]))
                        last = eid
                        got += 1

        reader = asyncio.create_task(read_stream())
        await asyncio.sleep(0.1)
        for _ in range(n):
            await r_pub.xadd("bench:probe:stream", {"t": repr(time.perf_counter()), "v1": payload}, maxlen=1000)
            await asyncio.sleep(0.002)
        await asyncio.wait_for(reader, 10)
        out["stream"] = _us_stats(lat)

        lat = []
        pubsub = r_sub.pubsub()
        await pubsub.subscribe("bench:probe:channel")
        await pubsub.get_message(timeout=1)  # the subscribe confirmation

        async def read_channel() -> None:
            while len(lat) < n:
                msg = await pubsub.get_message(timeout=1)
                if msg and msg["type"] == "message":
                    lat.append(time.perf_counter() - float(msg["data"].split(b"|", 1)[0]))

        reader = asyncio.create_task(read_channel())
        await asyncio.sleep(0.1)
        for _ in range(n):
            await r_pub.publish("bench:probe:channel", repr(time.perf_counter()).encode() + b"|" + payload)
            await asyncio.sleep(0.002)
        await asyncio.wait_for(reader, 10)
        await pubsub.aclose()
        out["pubsub"] = _us_stats(lat)
        await r_pub.delete("bench:probe:stream")
    finally:
        await r_pub.aclose()
        await r_sub.aclose()
    return out


def _us_stats(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    return {"p50_us": round(v[len(v) // 2] * 1e6, 1), "p99_us": round(v[int(len(v) * 0.99)] * 1e6, 1),
            "samples": len(v)}


# ------------------------------------------------------------------------------------------- main


async def run_one(stack: BenchStack, all_routers: list, arm: ArmSpec, plan: WorkloadPlan, oracle: Oracle | None,
                  r: aioredis.Redis, pods: list[Pod]) -> dict[str, Any]:
    await r.flushall()
    await asyncio.to_thread(stack.start_routing, arm, all_routers)
    try:
        before = await redis_info(r)
        t0 = time.monotonic()
        settings = RunSettings(model=MODEL, workload=plan.spec, rate=plan.rate, concurrency=plan.concurrency,
                               duration=120.0, grace=30.0, timeout=60.0,
                               reset_urls=[f"http://127.0.0.1:{p.port}" for p in stack.pods])
        result = await run_arm(Arm(name=arm.name, target=stack.url, strategy="prefix-cache"), settings, oracle=oracle)
        elapsed = time.monotonic() - t0
        after = await redis_info(r)
        await asyncio.sleep(SNAPSHOT_INTERVAL_S * 1.6)  # every replica writes its final snapshot
        s = summarize(result)
        row: dict[str, Any] = {
            "arm": arm.name, "workload": plan.name, "requests": s["requests"], "ok": s["ok"], "errors": s["errors"],
            "hit_rate": s["hit_rate"]["achieved"], "oracle_hit_rate": s["hit_rate"]["oracle"],
            "ttft_ms": s["ttft_ms"], "throughput_rps": s["throughput"]["requests_per_s"],
            "pods": {k: v["requests"] for k, v in s["pods"].items()},
        }
        if arm.replicas > 1:
            row["agreement"] = agreement(await replica_indexes(r), result, pods)
        if arm.sync == "shared":
            row.update(await lag_and_counters(stack))
            per_cmd = {k: after["per_command"].get(k, 0) - before["per_command"].get(k, 0)
                       for k in after["per_command"]}
            commands = after["commands"] - before["commands"]
            # The load exchange is one EVALSHA running HSET + PEXPIRE + HGETALL: Redis counts all four.
            requests = commands - 3 * per_cmd.get("evalsha", 0)
            row["redis"] = {
                "ops_per_s": round(commands / elapsed, 1),
                "client_requests_per_s": round(requests / elapsed, 1),
                "ops_per_s_by_command": {k: round(v / elapsed, 1) for k, v in sorted(per_cmd.items()) if v},
                "window_s": round(elapsed, 1),
                "used_memory_delta_bytes": after["used_memory"] - before["used_memory"],
                **await redis_footprint(r),
            }
        return row
    finally:
        await asyncio.to_thread(stack.stop_routing)


def summarize_arms(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per workload and arm, over the repeats: means (and ranges) of the headline figures."""
    out = []
    for workload in dict.fromkeys(r["workload"] for r in rows):
        for arm in ARMS:
            runs = [r for r in rows if r["workload"] == workload and r["arm"] == arm.name]
            if not runs:
                continue
            hits = [r["hit_rate"] for r in runs if r["hit_rate"] is not None]
            p90 = [r["ttft_ms"]["p90"] for r in runs if r["ttft_ms"]["p90"] is not None]
            p50 = [r["ttft_ms"]["p50"] for r in runs if r["ttft_ms"]["p50"] is not None]
            row: dict[str, Any] = {
                "workload": workload, "arm": arm.name, "runs": len(runs),
                "ok": sum(r["ok"] for r in runs), "requests": sum(r["requests"] for r in runs),
                "hit_rate": round(statistics.mean(hits), 4) if hits else None,
                "hit_rate_range": [min(hits), max(hits)] if hits else None,
                "oracle_hit_rate": runs[0]["oracle_hit_rate"],
                "ttft_ms": {"p50": round(statistics.mean(p50), 1) if p50 else None,
                            "p90": round(statistics.mean(p90), 1) if p90 else None,
                            "p90_range": [min(p90), max(p90)] if p90 else None},
            }
            agreements = [r["agreement"] for r in runs if "agreement" in r]
            if agreements:
                row["agreement"] = {k: round(statistics.mean(a[k] for a in agreements), 4)
                                    for k in ("all_agree", "pairwise")}
            if any("lag_buckets" in r for r in runs):
                buckets: dict[float, float] = {}
                for r in runs:
                    for k, v in r.get("lag_buckets", {}).items():
                        buckets[float(k)] = buckets.get(float(k), 0.0) + v
                count = sum(r["lag_ms"]["samples"] for r in runs)
                total = sum((r["lag_ms"]["mean"] or 0) * r["lag_ms"]["samples"] / 1000 for r in runs)
                row["lag_ms"] = lag_summary(buckets, count, total)
                row["redis"] = {k: round(statistics.mean(r["redis"][k] for r in runs), 1)
                                for k in ("ops_per_s", "client_requests_per_s")}
            out.append(row)
    return out


def print_table(rows: list[dict[str, Any]], transport: dict[str, Any]) -> None:
    print(f"\n{'workload':<14} {'arm':<22} {'ok':>7} {'hit rate':>9} {'oracle':>7} {'TTFT p50':>9} "
          f"{'TTFT p90':>9} {'agree':>7} {'lag p50':>8} {'lag p99':>8} {'Redis op/s':>10}")
    for row in summarize_arms(rows):
        agree = row.get("agreement", {}).get("all_agree")
        lag = row.get("lag_ms", {})
        redis = row.get("redis", {})

        def pct(x: float | None) -> str:
            return "-" if x is None else f"{100 * x:.1f}%"

        def ms(x: float | None) -> str:
            return "-" if x is None else f"{x:.0f} ms"

        def lag_ms(x: float | None) -> str:
            return "-" if x is None else f"{x:.1f} ms"

        print(f"{row['workload']:<14} {row['arm']:<22} {row['ok']:>3}/{row['requests']:<3} {pct(row['hit_rate']):>9} "
              f"{pct(row['oracle_hit_rate']):>7} {ms(row['ttft_ms']['p50']):>9} {ms(row['ttft_ms']['p90']):>9} "
              f"{pct(agree):>7} {lag_ms(lag.get('p50')):>8} {lag_ms(lag.get('p99')):>8} "
              f"{redis.get('ops_per_s', '-')!s:>10}")
    for row in rows:
        if "redis" in row and row.get("repeat") == 0:
            red = row["redis"]
            print(f"{row['workload']}: Redis stream {red['stream_entries']} entries / {red['stream_blocks']} blocks = "
                  f"{red['stream_bytes_per_1000_blocks']} B per 1,000 blocks; snapshots "
                  f"{red['snapshot_bytes_per_1000_entries']} B per 1,000 index entries; load hash "
                  f"{red['load_hash_bytes']} B; commands/s by type {red['ops_per_s_by_command']}")
    print(f"transport one-way latency (2 KiB, loopback): stream {transport['stream']}, pub/sub {transport['pubsub']}")


async def main_async(args: argparse.Namespace) -> int:
    run_dir = args.out.parent / "statesync-run"
    opts = StackOptions.on_free_ports(run_dir=str(run_dir), pods=args.pods, replicas=3, redis=True,
                                      health_interval=0.5, sim_args=sim_args(args.kv_capacity_tokens))
    stack = BenchStack(opts)
    stack.load_interval_ms = args.load_interval_ms
    all_routers = list(stack.routers)
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    tokenizer = load_tokenizer()
    oracle = Oracle(tokenizer, "chat", 16, "cl100k") if tokenizer is not None else None
    try:
        await asyncio.to_thread(_start_backends, stack)
        assert stack.redis_port is not None
        pods = [Pod(p.name, f"127.0.0.1:{p.port}", MODEL) for p in stack.pods]
        r = aioredis.Redis(port=stack.redis_port)
        try:
            print("transport probe: stream vs pub/sub ...", flush=True)
            transport = await transport_probe(stack.redis_port)
            for plan in plans(args):
                for repeat in range(args.repeats):
                    for arm in ARMS[repeat % len(ARMS):] + ARMS[:repeat % len(ARMS)]:  # rotated order
                        print(f"== {plan.name} #{repeat + 1}: {arm.name}", flush=True)
                        rows.append({"repeat": repeat, **await run_one(stack, all_routers, arm, plan, oracle, r, pods)})
                        row = rows[-1]
                        print(f"   ok {row['ok']}/{row['requests']}, hit rate {row['hit_rate']}, TTFT p90 "
                              f"{row['ttft_ms']['p90']} ms" + (f", agreement {row['agreement']['all_agree']}"
                                                               if "agreement" in row else "")
                              + (f", lag {row['lag_ms']}" if "lag_ms" in row else ""), flush=True)
        finally:
            await r.aclose()
    finally:
        await asyncio.to_thread(stack.stop)
    print_table(rows, transport)
    summary = summarize_arms(rows)
    targets = {}
    for plan in plans(args):
        by_arm = {row["arm"]: row for row in summary if row["workload"] == plan.name}
        one, synced, unsynced = by_arm[ARMS[0].name], by_arm[ARMS[2].name], by_arm[ARMS[1].name]
        targets[plan.name] = {
            # Positive: fewer hits than one replica. The target is a drop of at most 2 points.
            "sync_hit_rate_drop_points": round(100 * (one["hit_rate"] - synced["hit_rate"]), 2),
            "no_sync_hit_rate_drop_points": round(100 * (one["hit_rate"] - unsynced["hit_rate"]), 2),
            "sync_within_2_points": one["hit_rate"] - synced["hit_rate"] <= 0.02,
            "lag_p99_ms": synced["lag_ms"]["p99"],
            "lag_p99_within_50ms": (synced["lag_ms"]["p99"] or 0) <= 50,
        }
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": _git_commit(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "settings": {"pods": args.pods, "kv_capacity_tokens": args.kv_capacity_tokens, "rate": args.rate,
                     "requests": args.requests, "repeats": args.repeats, "snapshot_interval_s": SNAPSHOT_INTERVAL_S,
                     "load_interval_ms": args.load_interval_ms, "routing_strategy": "prefix-cache"},
        "transport_probe": transport,
        "summary": summary,
        "results": rows,
        "targets": targets,
        "runtime_s": round(time.monotonic() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\ntargets: {json.dumps(targets)}\nwrote {args.out} in {report['runtime_s'] / 60:.1f} min", flush=True)
    return 0


def _start_backends(stack: BenchStack) -> None:
    for pod in stack.pods:
        stack.start_pod(pod)
    stack.write_pod_file()
    stack.start_redis()


def _git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # stop every process we started on the way out
    try:
        return asyncio.run(main_async(args))
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        return 130


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
