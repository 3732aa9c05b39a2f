"""Router overhead benchmark: what Envoy + the router add over the same Envoy routed straight to
one pod, with an instant-answer backend.

Arms (same Envoy binary, same bootstrap, same worker count):
  direct  - the rendered bootstrap without the ext_proc filter; the route sets target-pod itself
  router  - the rendered bootstrap: every request goes through one router process

Measures, for each body size and concurrency: p50/p99 latency of both arms and the difference
(= what the router adds), plus the router's CPU time per request. Then an open-loop rate sweep
finds the highest req/s at which the router arm's p99 stays within 5 ms of the direct arm's.
Prints a table and writes JSON (default bench/results/overhead.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from extproc_router.envoyconfig.render import render_bootstrap  # noqa: E402
from extproc_router.envoyconfig.values import load_values  # noqa: E402
from extproc_router.stack import envoy_binary, free_port, wait_http  # noqa: E402

MODEL = "bench-model"


def chat_body(size: int) -> bytes:
    """A chat request whose JSON body is `size` bytes."""
    base = {"model": MODEL, "messages": [{"role": "user", "content": ""}], "max_tokens": 1}
    pad = size - len(orjson.dumps(base))
    base["messages"][0]["content"] = ("lorem ipsum dolor sit amet " * (pad // 27 + 1))[:max(0, pad)]
    return orjson.dumps(base)


def find_hcm(bootstrap: dict) -> dict:
    for listener in bootstrap["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                if f["name"] == "envoy.filters.network.http_connection_manager":
                    return f["typed_config"]
    raise RuntimeError("no HTTP connection manager in the bootstrap")


def direct_bootstrap(bootstrap: dict, backend: str) -> dict:
    """The same bootstrap with the ext_proc filter removed and the route pinned to one pod."""
    b = copy.deepcopy(bootstrap)
    hcm = find_hcm(b)
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"]
    for vh in hcm["route_config"]["virtual_hosts"]:
        for route in vh["routes"]:
            route.pop("typed_per_filter_config", None)
            route["request_headers_to_add"] = [{"header": {"key": "target-pod", "value": backend},
                                                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]
    return b


class Procs:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# Scenarios: what the router does per request besides picking a pod (issue 6's added cost).
SCENARIOS = {
    "plain": {"headers": ["routing-strategy: random"], "file": {}},
    "profile": {"headers": ["config-profile: fast"],
                "config": {"defaultProfile": "default", "profiles": {"default": {"routingStrategy": "random"},
                                                                     "fast": {"routingStrategy": "random"}}},
                "file": {}},
    "ratelimit": {"headers": ["routing-strategy: random", "user: bench"],
                  "file": {"users": {"bench": {"rpm": 1_000_000_000}}}},
    "ratelimit-redis": {"headers": ["routing-strategy: random", "user: bench"],
                        "file": {"users": {"bench": {"rpm": 1_000_000_000}}}, "redis": True},
}


def run_load(port: int, body_file: Path, *, concurrency: int = 1, rate: float = 0, duration: float,
             warmup: float, headers: list[str] | None = None) -> dict:
    argv = [sys.executable, str(ROOT / "bench" / "loadgen.py"), "--port", str(port), "--body-file", str(body_file),
            "--concurrency", str(concurrency), "--rate", str(rate), "--duration", str(duration),
            "--warmup", str(warmup)]
    for h in headers or ["routing-strategy: random"]:
        argv += ["--header", h]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + warmup + 60, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2048,16384", help="request body sizes in bytes")
    ap.add_argument("--concurrency", default="1,32", help="closed-loop concurrency levels")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds measured per point")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds discarded before each point")
    ap.add_argument("--rates", default="500,1000,1500,2000,2500,3000",
                    help="open-loop req/s for the sweep (2 KiB bodies); empty to skip")
    ap.add_argument("--p99-budget-ms", type=float, default=5.0, help="added p99 allowed in the sweep")
    ap.add_argument("--envoy-concurrency", type=int, default=1, help="Envoy worker threads (both arms)")
    ap.add_argument("--extproc-patch", default="", metavar="JSON",
                    help="JSON merged into the ext_proc filter config of the router arm (to compare Envoy settings)")
    ap.add_argument("--scenario", choices=sorted(SCENARIOS), default="plain",
                    help="plain routing; a config profile; a user rate limit in-process or in Redis")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "overhead.json"))
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    concs = [int(c) for c in args.concurrency.split(",") if c]
    rates = [float(r) for r in args.rates.split(",") if r]

    from rich.console import Console
    from rich.table import Table
    console = Console(width=160)
    work = Path(tempfile.mkdtemp(prefix="overhead-"))
    procs = Procs(work)
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                 "platform": platform.platform()},
                     "settings": vars(args), "points": [], "sweep": []}
    try:
        backend_port = free_port()
        procs.spawn("backend", [sys.executable, str(ROOT / "bench" / "instant_backend.py"),
                                "--port", str(backend_port)])
        backend = f"127.0.0.1:{backend_port}"
        wait_http(f"http://{backend}/health", 10, what="backend")
        pod_file = work / "pods.yaml"
        scenario = SCENARIOS[args.scenario]
        model: dict = {"pods": [{"name": "pod-0", "address": backend}]}
        if scenario.get("config"):
            model["config"] = scenario["config"]
        pod_file.write_text(yaml.safe_dump({**scenario["file"], "models": {MODEL: model}}))
        router_env = dict(os.environ)
        if scenario.get("redis"):
            redis_port = free_port()
            procs.spawn("redis", ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no"])
            time.sleep(0.3)
            router_env.update(REDIS_HOST="127.0.0.1", REDIS_PORT=str(redis_port))
        grpc_port, http_port = free_port(), free_port()
        # BENCH_ROUTER_WRAP: run the router under a wrapper script (a profiler, a GC probe).
        launcher = os.environ.get("BENCH_ROUTER_WRAP", "").split() or ["-m", "extproc_router"]
        router = procs.spawn("router", [sys.executable, *launcher, "serve", "--config", str(pod_file),
                                        "--grpc-listen", f"127.0.0.1:{grpc_port}",
                                        "--http-listen", f"127.0.0.1:{http_port}", "--log-level", "warning"],
                              env=router_env)
        wait_http(f"http://127.0.0.1:{http_port}/ready", 20, router, "router")
        values = load_values(None)
        arms = {}
        envoy_pids = {}
        for arm in ("direct", "router"):
            port, admin = free_port(), free_port()
            boot = render_bootstrap(values, listen_port=port, admin_port=admin,
                                    extproc_endpoints=[("127.0.0.1", grpc_port)],
                                    router_http=("127.0.0.1", http_port))
            if arm == "direct":
                boot = direct_bootstrap(boot, backend)
            elif args.extproc_patch:
                for f in find_hcm(boot)["http_filters"]:
                    if f["name"] == "envoy.filters.http.ext_proc":
                        f["typed_config"].update(json.loads(args.extproc_patch))
            cfg = work / f"envoy-{arm}.yaml"
            cfg.write_text(yaml.safe_dump(boot))
            p = procs.spawn(f"envoy-{arm}", [envoy_binary(), "-c", str(cfg), "--disable-hot-restart", "-l", "error",
                                             "--concurrency", str(args.envoy_concurrency)])
            wait_http(f"http://127.0.0.1:{admin}/ready", 20, p, f"envoy ({arm})")
            arms[arm] = port
            envoy_pids[arm] = p.pid

        for size in sizes:
            body_file = work / f"body-{size}.json"
            body_file.write_bytes(chat_body(size))
            for conc in concs:
                point = {"body_bytes": size, "concurrency": conc}
                for arm, port in arms.items():
                    c0, e0 = cpu_seconds(router.pid), cpu_seconds(envoy_pids[arm])
                    res = run_load(port, body_file, concurrency=conc, duration=args.duration, warmup=args.warmup,
                                   headers=scenario["headers"])
                    n = max(1, res["requests"] * (1 + args.warmup / args.duration))
                    res["router_cpu_us_per_req"] = (cpu_seconds(router.pid) - c0) * 1e6 / n
                    res["envoy_cpu_us_per_req"] = (cpu_seconds(envoy_pids[arm]) - e0) * 1e6 / n
                    point[arm] = res
                point["added_p50_ms"] = point["router"]["p50_ms"] - point["direct"]["p50_ms"]
                point["added_p99_ms"] = point["router"]["p99_ms"] - point["direct"]["p99_ms"]
                results["points"].append(point)
                console.print(f"size {size:>6} conc {conc:>3}: direct p50 {point['direct']['p50_ms']:.3f} ms, "
                              f"router p50 {point['router']['p50_ms']:.3f} ms -> added p50 "
                              f"{point['added_p50_ms']:.3f} / p99 {point['added_p99_ms']:.3f} ms")

        if rates:
            body_file = work / "body-2048.json"
            body_file.write_bytes(chat_body(2048))
            best = 0.0
            for rate in rates:
                point = {"offered_rps": rate}
                for arm, port in arms.items():
                    c0, e0 = cpu_seconds(router.pid), cpu_seconds(envoy_pids[arm])
                    res = run_load(port, body_file, rate=rate, duration=args.duration, warmup=args.warmup,
                                   headers=scenario["headers"])
                    res["router_cpu_share"] = (cpu_seconds(router.pid) - c0) / (args.duration + args.warmup)
                    res["envoy_cpu_share"] = (cpu_seconds(envoy_pids[arm]) - e0) / (args.duration + args.warmup)
                    point[arm] = res
                point["added_p99_ms"] = point["router"]["p99_ms"] - point["direct"]["p99_ms"]
                ok = (point["router"]["errors"] == 0 and point["added_p99_ms"] <= args.p99_budget_ms
                      and point["router"]["rps"] >= 0.97 * rate)
                point["within_budget"] = ok
                results["sweep"].append(point)
                console.print(f"rate {rate:>6.0f}/s: router achieved {point['router']['rps']:.0f}/s, p99 "
                              f"{point['router']['p99_ms']:.2f} ms (direct {point['direct']['p99_ms']:.2f}), "
                              f"router CPU {point['router']['router_cpu_share'] * 100:.0f}%, Envoy CPU "
                              f"{point['router']['envoy_cpu_share'] * 100:.0f}% (direct arm "
                              f"{point['direct']['envoy_cpu_share'] * 100:.0f}%) "
                              f"{'ok' if ok else 'over budget'}")
                if ok:
                    best = rate
                else:
                    break
            results["max_rps_within_budget"] = best

        table = Table(title=f"extproc-router overhead (router arm minus direct arm), scenario {args.scenario}")
        for col in ("body", "conc", "direct p50", "router p50", "added p50", "direct p99", "router p99", "added p99",
                    "router req/s", "router CPU/req", "Envoy CPU/req (direct)"):
            table.add_column(col, justify="right")
        for p in results["points"]:
            table.add_row(f"{p['body_bytes']}", f"{p['concurrency']}", f"{p['direct']['p50_ms']:.3f}",
                          f"{p['router']['p50_ms']:.3f}", f"{p['added_p50_ms']:.3f}", f"{p['direct']['p99_ms']:.3f}",
                          f"{p['router']['p99_ms']:.3f}", f"{p['added_p99_ms']:.3f}", f"{p['router']['rps']:.0f}",
                          f"{p['router']['router_cpu_us_per_req']:.0f} us",
                          f"{p['router']['envoy_cpu_us_per_req']:.0f} us ({p['direct']['envoy_cpu_us_per_req']:.0f})")
        console.print(table)
        if rates:
            console.print(f"highest offered rate with added p99 <= {args.p99_budget_ms} ms: "
                          f"{results.get('max_rps_within_budget', 0):.0f} req/s (one router process)")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        console.print(f"wrote {out}")
    finally:
        procs.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
