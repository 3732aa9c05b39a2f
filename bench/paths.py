"""The serving surface's cost per path.

`decision` (in process): `parse_body` + `Router.decide` (+ release) for a ~2 KiB body of every routed
path, under `prefix-cache` (the index warmed to 200,000 entries over 8 pods, as
bench/decision_latency.py) and `least-request`. Every body is new (unique text), so hashing paths pay
for inserting all their blocks. Multipart audio is measured at 2 KiB and with a 4 MiB file (the
form scan over the file bytes).

`cpu` (through Envoy): the router's CPU time per request for chat and embeddings bodies of 2 KiB at
concurrency 32 (closed loop, bench/loadgen.py) against an instant-answer backend (the router's cost,
not a pod's), in alternating rounds so both see the same machine load.

Prints tables and writes JSON (default bench/results/paths.json).

    .venv/bin/python bench/paths.py [--quick] [--skip-cpu] [--out PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from decision_latency import english_like, make_router  # noqa: E402
from overhead import Procs, cpu_seconds  # noqa: E402

from extproc_router.envoyconfig.render import render_bootstrap  # noqa: E402
from extproc_router.envoyconfig.values import load_values  # noqa: E402
from extproc_router.stack import envoy_binary, free_port, wait_http  # noqa: E402
from routing.request import PATHS, parse_body  # noqa: E402
from routing.router import Router  # noqa: E402

MODEL = "bench-model"
KIB = 2
BOUNDARY = "----bench-paths-boundary"
FORM_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def _fill(make: object, size: int) -> bytes:
    """`make(text)` (a body builder) with text grown until the JSON body is `size` bytes."""
    assert callable(make)
    base = len(orjson.dumps(make("")))
    return orjson.dumps(make(english_like(max(1, size - base), RNG)))


RNG = random.Random(11)


def json_body(path: str, size: int) -> bytes:
    """A `size`-byte body of `path` whose text is all new (random words)."""
    m = {"model": MODEL}
    builders = {
        "/v1/chat/completions": lambda t: {**m, "max_tokens": 16, "messages": [{"role": "user", "content": t}]},
        "/v1/completions": lambda t: {**m, "max_tokens": 16, "prompt": t},
        "/v1/messages": lambda t: {**m, "max_tokens": 16, "system": "be brief",
                                   "messages": [{"role": "user", "content": [{"type": "text", "text": t}]}]},
        "/v1/responses": lambda t: {**m, "instructions": "be brief", "input": t},
        "/v1/embeddings": lambda t: {**m, "input": t},
        "/pooling": lambda t: {**m, "input": t},
        "/v1/classify": lambda t: {**m, "input": t},
        "/classify": lambda t: {**m, "input": t},
        "/v1/rerank": lambda t: {**m, "query": t[: len(t) // 4], "documents": [t[len(t) // 4:]]},
        "/rerank": lambda t: {**m, "query": t[: len(t) // 4], "documents": [t[len(t) // 4:]]},
        "/v2/rerank": lambda t: {**m, "query": t[: len(t) // 4], "documents": [t[len(t) // 4:]]},
        "/v1/score": lambda t: {**m, "text_1": t[: len(t) // 4], "text_2": [t[len(t) // 4:]]},
        "/score": lambda t: {**m, "text_1": t[: len(t) // 4], "text_2": [t[len(t) // 4:]]},
        "/v1/images/generations": lambda t: {**m, "prompt": t},
    }
    return _fill(builders[path], size)


def form_body(file_bytes: int) -> bytes:
    """An audio upload: model and response_format fields, then a `file_bytes` file."""
    audio = RNG.randbytes(file_bytes)
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{MODEL}\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"response_format\"\r\n\r\njson\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            f"Content-Type: audio/wav\r\n\r\n").encode() + audio + f"\r\n--{BOUNDARY}--\r\n".encode()


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(np.array(values), q)) * 1e6, 1)


def measure(router: Router, path: str, bodies: list[bytes], strategy: str, content_type: str | None) -> dict:
    wall: list[float] = []
    cpu: list[float] = []
    pc, tt = time.perf_counter, time.thread_time
    for raw in bodies:
        c0, t0 = tt(), pc()
        decision = router.decide(parse_body(path, raw, content_type), strategy)
        t1, c1 = pc(), tt()
        router.release(decision)
        wall.append(t1 - t0)
        cpu.append(c1 - c0)
    return {"n": len(bodies), "wall_p50_us": pct(wall, 50), "wall_p99_us": pct(wall, 99),
            "cpu_p50_us": pct(cpu, 50), "cpu_p99_us": pct(cpu, 99)}


def decision_latency(n: int) -> list[dict]:
    cases: list[tuple[str, str, list[bytes], str | None]] = []
    for path, spec in PATHS.items():
        if spec.multipart:
            cases.append((path, f"{KIB} KiB", [form_body(KIB * 1024 - 300) for _ in range(n + 20)], FORM_TYPE))
        else:
            cases.append((path, f"{KIB} KiB", [json_body(path, KIB * 1024) for _ in range(n + 20)], None))
    big = [form_body(4 * 1024 * 1024 - 4096) for _ in range(max(20, n // 10) + 20)]
    cases.append(("/v1/audio/transcriptions", "4 MiB", big, FORM_TYPE))
    rows = []
    print(f"{'path':>26} {'body':>6} {'strategy':>13} {'n':>5} {'wall p50':>9} {'wall p99':>9} {'cpu p50':>8} "
          f"{'cpu p99':>8}  (microseconds)")
    for strategy in ("prefix-cache", "least-request"):
        for path, size, bodies, ctype in cases:
            router = make_router("character")
            measure(router, path, bodies[:20], strategy, ctype)  # warm-up
            gc.collect()
            gc.freeze()
            row = measure(router, path, bodies[20:], strategy, ctype)
            gc.unfreeze()
            row.update(path=path, body=size, strategy=strategy, hashed=bool(PATHS[path].hashed))
            rows.append(row)
            print(f"{path:>26} {size:>6} {strategy:>13} {row['n']:>5} {row['wall_p50_us']:>9} {row['wall_p99_us']:>9} "
                  f"{row['cpu_p50_us']:>8} {row['cpu_p99_us']:>8}")
    return rows


# -- router CPU through Envoy --------------------------------------------------------------------------

def run_load(port: int, path: str, body_file: Path, concurrency: int, duration: float, warmup: float,
             strategy: str) -> dict:
    argv = [sys.executable, str(ROOT / "bench" / "loadgen.py"), "--port", str(port), "--path", path,
            "--body-file", str(body_file), "--concurrency", str(concurrency), "--duration", str(duration),
            "--warmup", str(warmup), "--header", f"routing-strategy: {strategy}"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + warmup + 60, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def router_cpu(concurrency: int, duration: float, warmup: float, rounds: int, strategies: list[str]) -> dict:
    work = Path(tempfile.mkdtemp(prefix="paths-bench-"))
    procs = Procs(work)
    try:
        backend_port = free_port()
        procs.spawn("backend", [sys.executable, str(ROOT / "bench" / "instant_backend.py"),
                                "--port", str(backend_port)])
        backend = f"127.0.0.1:{backend_port}"
        wait_http(f"http://{backend}/health", 10, what="backend")
        pod_file = work / "pods.yaml"
        pod_file.write_text(yaml.safe_dump({"models": {MODEL: {"pods": [{"name": "pod-0", "address": backend}]}}}))
        grpc_port, http_port = free_port(), free_port()
        router = procs.spawn("router", [sys.executable, "-m", "extproc_router", "serve", "--config", str(pod_file),
                                        "--grpc-listen", f"127.0.0.1:{grpc_port}",
                                        "--http-listen", f"127.0.0.1:{http_port}", "--log-level", "warning"])
        wait_http(f"http://127.0.0.1:{http_port}/ready", 20, router, "router")
        port, admin = free_port(), free_port()
        boot = render_bootstrap(load_values(None), listen_port=port, admin_port=admin,
                                extproc_endpoints=[("127.0.0.1", grpc_port)], router_http=("127.0.0.1", http_port))
        cfg = work / "envoy.yaml"
        cfg.write_text(yaml.safe_dump(boot))
        envoy = procs.spawn("envoy", [envoy_binary(), "-c", str(cfg), "--disable-hot-restart", "-l", "error",
                                      "--concurrency", "1"])
        wait_http(f"http://127.0.0.1:{admin}/ready", 20, envoy, "envoy")
        bodies = {}
        for path in ("/v1/chat/completions", "/v1/embeddings"):
            bodies[path] = work / (path.strip("/").replace("/", "_") + ".json")
            bodies[path].write_bytes(json_body(path, KIB * 1024))
        samples: dict[str, dict[str, list[float]]] = {s: {p: [] for p in bodies} for s in strategies}
        rps: dict[str, dict[str, list[float]]] = {s: {p: [] for p in bodies} for s in strategies}
        for r in range(rounds):
            for strategy in strategies:
                order = list(bodies) if r % 2 == 0 else list(reversed(bodies))
                for path in order:
                    c0 = cpu_seconds(router.pid)
                    res = run_load(port, path, bodies[path], concurrency, duration, warmup, strategy)
                    if res["errors"]:
                        raise RuntimeError(f"{path}: {res['errors']} errors")
                    n = max(1, res["requests"] * (1 + warmup / duration))
                    samples[strategy][path].append((cpu_seconds(router.pid) - c0) * 1e6 / n)
                    rps[strategy][path].append(res["rps"])
        out: dict = {"concurrency": concurrency, "body_bytes": KIB * 1024, "rounds": rounds, "strategies": {}}
        print(f"\nrouter CPU per request through Envoy, {KIB} KiB bodies, concurrency {concurrency}, {rounds} rounds")
        print(f"{'strategy':>13} {'path':>22} {'median us/req':>14} {'rounds (us/req)':>30} {'req/s':>7}")
        for strategy in strategies:
            out["strategies"][strategy] = {}
            for path in bodies:
                vals = samples[strategy][path]
                med = statistics.median(vals)
                out["strategies"][strategy][path] = {"router_cpu_us_per_req_median": round(med, 1),
                                                     "rounds": [round(v, 1) for v in vals],
                                                     "rps_median": round(statistics.median(rps[strategy][path]))}
                print(f"{strategy:>13} {path:>22} {med:>14.1f} {', '.join(f'{v:.0f}' for v in vals):>30} "
                      f"{statistics.median(rps[strategy][path]):>7.0f}")
        return out
    finally:
        procs.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests, shorter load rounds (a smoke run)")
    ap.add_argument("--skip-cpu", action="store_true", help="only the in-process decision latency")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--duration", type=float, default=5.0, help="seconds measured per load round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating load rounds per path")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "paths.json"))
    args = ap.parse_args()
    results: dict = {"machine": {"python": platform.python_version(), "machine": platform.machine(),
                                 "cpus": os.cpu_count()}}
    results["decision"] = decision_latency(40 if args.quick else 300)
    if not args.skip_cpu:
        duration = 2.0 if args.quick else args.duration
        results["router_cpu"] = router_cpu(args.concurrency, duration, 1.0, 1 if args.quick else args.rounds,
                                           ["random", "prefix-cache"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
