"""Decision latency of `prefix-cache`: `parse_body` + `Router.decide` (+ release), in process.

For each tokenizer and prompt size (2, 8, 32, 128 KiB of chat content), the router has 8 ready
pods and an index warmed to its capacity (200,000 (block, pod) entries, random chains spread over
the 8 pods), so every unmatched request also pays for LRU eviction. Two workloads:

  unique  - every prompt is new: all its blocks are inserted (the worst case)
  shared  - 16 conversations of 4 turns; each turn's prompt extends the previous one and the
            first 3/4 of every prompt is a system prompt shared by all (the common case)

Then the precise index (pods that publish KV-cache events, `routing/kv_index.py`): the same 8 pods
all precise, each holding 25,000 engine blocks (random chains; in `shared`, half the pods' engines
also hold a whole conversation, so matches walk the shared prefix), the prompt tokenized with the engine
tokenizer named in the `tokenizer` column (`precise:bytes` = UTF-8 bytes as ids, the simulator's
`--tokenizer bytes` and the cheapest engine tokenizer; `precise:cl100k`) and hashed per 16-token
block, on top of the character tokenizer's approximate hashing (which still feeds the KV-pressure
term). `character` rows run with the precise index present and no precise pod: they are the path of
a fleet without events.

Reports wall-clock p50/p99 and CPU-time p50/p99 (thread CPU time: on a shared machine the wall
clock includes time the process was not scheduled), the tokenizer's cost alone, and the index's
memory per entry at 1M entries (tracemalloc). Prints a table and writes JSON
(default bench/results/decision_latency.json).

    .venv/bin/python bench/decision_latency.py [--quick] [--out PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from routing.pods import Pod, PodSnapshot  # noqa: E402
from routing.prefix_index import PrefixIndex  # noqa: E402
from routing.request import CHAT_PATH, parse_body  # noqa: E402
from routing.router import Router, RoutingSettings  # noqa: E402
from routing.stats import EngineStats  # noqa: E402
from routing.strategies.prefix_cache import PrefixCacheSettings, PrefixCacheStrategy  # noqa: E402
from routing.tokenizers import make_engine_tokenizer, make_tokenizer  # noqa: E402

MODEL = "bench-model"
SIZES_KIB = (2, 8, 32, 128)
N_PODS = 8
WARM_ENTRIES = 200_000


def english_like(n_chars: int, rng: random.Random) -> str:
    """Text of `n_chars` characters from a fixed 3,000-word vocabulary (BPE-realistic)."""
    vocab_rng = random.Random(7)
    vocab = ["".join(vocab_rng.choice("etaoinshrdlucmfwypvbgkjqxz") for _ in range(vocab_rng.randint(2, 10)))
             for _ in range(3000)]
    words: list[str] = []
    size = 0
    while size < n_chars:
        w = rng.choice(vocab)
        words.append(w)
        size += len(w) + 1
    return " ".join(words)[:n_chars]


def chat(messages: list[dict]) -> bytes:
    return orjson.dumps({"model": MODEL, "messages": messages, "max_tokens": 16})


def unique_bodies(kib: int, n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [chat([{"role": "user", "content": english_like(kib * 1024, rng)}]) for _ in range(n)]


def shared_bodies(kib: int, n: int, seed: int) -> list[bytes]:
    """Multi-turn conversations over one shared system prompt; turn k of conversation c extends
    turn k-1 of c. Interleaved so that the index sees every conversation at every turn."""
    rng = random.Random(seed)
    total = kib * 1024
    system = english_like(total * 3 // 4, random.Random(seed + 1))
    turns = 4
    per_turn = max(1, (total - len(system)) // turns)
    convs = [[english_like(per_turn, rng) for _ in range(turns)] for _ in range(16)]
    out: list[bytes] = []
    while len(out) < n:
        for t in range(turns):
            for conv in convs:
                msgs = [{"role": "system", "content": system}]
                for k in range(t + 1):
                    msgs.append({"role": "user", "content": conv[k]})
                    if k < t:
                        msgs.append({"role": "assistant", "content": "ok"})
                out.append(chat(msgs))
    return out[:n]


PRECISE_BLOCKS_PER_POD = 25_000


def make_router(tokenizer: str) -> Router:
    precise = tokenizer.partition("precise:")[2]
    if precise:
        tokenizer = "character"
    settings = RoutingSettings(prefix_cache=PrefixCacheSettings(tokenizer_type=tokenizer))
    router = Router(settings, rng=random.Random(1))
    pods = [Pod(f"pod-{i}", f"10.0.0.{i + 1}:8000", MODEL) for i in range(N_PODS)]
    router.update_snapshot(PodSnapshot.build(pods, {p.key for p in pods}, {MODEL: None}))
    strategy = router.strategies["prefix-cache"]
    assert isinstance(strategy, PrefixCacheStrategy)
    # Engine-reported KV capacity (an 8B model on an H100), so the KV-pressure term is on the path.
    router.stats.update_engine({p.key: EngineStats(kv_capacity_tokens=450_000.0) for p in pods})
    rng = np.random.default_rng(0)
    now = time.time()
    per_add = 250
    for i in range(WARM_ENTRIES // per_add):
        strategy.index.add(rng.integers(1, 2**64 - 1, size=per_add, dtype=np.uint64), pods[i % N_PODS].key,
                           now - 60 + i * 1e-3)
    if precise:
        kv = router.stats.kv_blocks
        kv.set_tokenizers({}, make_engine_tokenizer(precise))
        for pod in pods:
            kv.track_pod(pod.key, MODEL)
            kv.set_precise(pod.key, True)
            for _ in range(PRECISE_BLOCKS_PER_POD // 32):
                tokens = rng.integers(0, 100_000, size=32 * 16).tolist()
                kv.store(pod.key, rng.integers(1, 2**63, size=32).tolist(), None, tokens, 16)
    return router


def seed_engine_cache(router: Router, raw: bytes) -> None:
    """As if half the pods' engines had cached this prompt (BlockStored events): a precise match then
    walks the whole shared prefix on those pods."""
    kv = router.stats.kv_blocks
    tokenizer = kv.tokenizer_for(MODEL)
    assert tokenizer is not None
    encoded = tokenizer.encode_body(parse_body(CHAT_PATH, raw).body, 1 << 20)
    assert encoded is not None
    ids = np.frombuffer(encoded[0], dtype=">u4").tolist()
    n = len(ids) // 16 * 16
    for key in kv.pod_keys[: N_PODS // 2]:
        kv.store(key, list(range(1, n // 16 + 1)), None, ids[:n], 16)


def measure(router: Router, bodies: list[bytes]) -> dict:
    wall: list[float] = []
    cpu: list[float] = []
    pc = time.perf_counter
    tt = time.thread_time
    decide = router.decide
    release = router.release
    for raw in bodies:
        c0 = tt()
        t0 = pc()
        decision = decide(parse_body(CHAT_PATH, raw), "prefix-cache")
        t1 = pc()
        c1 = tt()
        release(decision)
        wall.append(t1 - t0)
        cpu.append(c1 - c0)
    return {"n": len(bodies), "wall_p50_us": pct(wall, 50), "wall_p99_us": pct(wall, 99),
            "cpu_p50_us": pct(cpu, 50), "cpu_p99_us": pct(cpu, 99)}


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(np.array(values), q)) * 1e6, 1)


def tokenizer_cost(kib: int, repeat: int) -> dict:
    tok = make_tokenizer("tiktoken")
    text = english_like(kib * 1024, random.Random(3))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        tok.encode(text, 10**9)
        times.append(time.perf_counter() - t0)
    return {"kib": kib, "p50_ms": round(float(np.median(times)) * 1e3, 2), "min_ms": round(min(times) * 1e3, 2)}


def index_memory(entries: int) -> dict:
    """tracemalloc bytes per entry of an index filled to `entries` (one pod per block: worst case)."""
    gc.collect()
    tracemalloc.start()
    index = PrefixIndex(capacity=entries)
    rng = np.random.default_rng(5)
    now = time.time()
    for i in range(entries // 1000):
        index.add(rng.integers(1, 2**64 - 1, size=1000, dtype=np.uint64), f"ns/pod-{i % N_PODS}", now)
    current = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {"entries": len(index), "bytes_per_entry": round(current / len(index), 1),
            "array_bytes_per_entry": round(index.nbytes() / len(index), 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests per case (a smoke run)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "decision_latency.json"))
    args = ap.parse_args()
    results: dict = {"machine": {"python": platform.python_version(), "machine": platform.machine(),
                                 "cpus": __import__("os").cpu_count()},
                     "pods": N_PODS, "warm_entries": WARM_ENTRIES, "cases": []}
    print(f"{'tokenizer':>14} {'KiB':>4} {'workload':>8} {'n':>5} {'wall p50':>9} {'wall p99':>9} "
          f"{'cpu p50':>8} {'cpu p99':>8}  (microseconds)")
    for tokenizer in ("character", "tiktoken", "precise:bytes", "precise:cl100k"):
        for kib in SIZES_KIB:
            # tiktoken costs ~80 ns per byte: fewer requests for the large prompts.
            n = 300 if "cl100k" not in tokenizer and tokenizer != "tiktoken" else max(60, 300 // max(1, kib // 8))
            if args.quick:
                n = max(20, n // 10)
            for workload, make in (("unique", unique_bodies), ("shared", shared_bodies)):
                router = make_router(tokenizer)
                bodies = make(kib, n + 20, seed=kib)
                if tokenizer.startswith("precise:") and workload == "shared":
                    seed_engine_cache(router, bodies[-1])  # the longest turn of a conversation
                measure(router, bodies[:20])  # warm-up: code paths, caches
                gc.collect()
                gc.freeze()  # as `serve` does after start-up
                row = measure(router, bodies[20:])
                gc.unfreeze()
                row.update({"tokenizer": tokenizer, "kib": kib, "workload": workload})
                results["cases"].append(row)
                print(f"{tokenizer:>14} {kib:>4} {workload:>8} {row['n']:>5} {row['wall_p50_us']:>9} "
                      f"{row['wall_p99_us']:>9} {row['cpu_p50_us']:>8} {row['cpu_p99_us']:>8}")
    results["tiktoken_encode"] = [tokenizer_cost(kib, 5 if args.quick else 20) for kib in (32, 128)]
    for t in results["tiktoken_encode"]:
        print(f"tiktoken encode alone, {t['kib']} KiB: p50 {t['p50_ms']} ms (min {t['min_ms']} ms)")
    mem = index_memory(100_000 if args.quick else 1_000_000)
    results["index_memory"] = mem
    print(f"index memory at {mem['entries']} entries: {mem['bytes_per_entry']} bytes/entry (tracemalloc), "
          f"{mem['array_bytes_per_entry']} in its arrays")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
