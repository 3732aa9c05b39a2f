"""Routing-quality benchmark: every arm, ours and the peers', on the same simulated pods, in one go.

Starts N simulated pods (``--timing model``: prefix-caching KV cache + continuous batching) with a
KV capacity that one pod's share of the prefixes overflows, our router + Envoy in front of them,
and the peer routers ``sglang-router`` and ``vllm-router`` (``--policy cache_aware``, installed into
the benchmark-only venv bench/.venv-peers on first use) pointed at the same pods. Then it runs
``extproc-router loadtest --compare`` over all arms, flushing the pods (POST /sim/reset) and our
routers' prefix indexes (POST /flush_cache) before each arm, and leaves report.json, summary.md and
plots per workload in --out (default bench/results/quality/<workload>/); process logs go to
--out/run/.

Our arms: ``random``, ``least-request`` and ``prefix-cache`` (the approximate index: what the
router sent where) are strategies of the main router, whose KV-event subscription is off.
``precise`` is prefix-cache from the engines' own KV-cache events: the pods publish them (vLLM's
ZeroMQ format), and a second router + Envoy in front of the same pods subscribes (prefix-cache by
default, the pods' cl100k as its engine tokenizer).

Workloads: ``shared-prefix`` and ``multi-turn`` (the harness's generators), and ``eviction``: a
trace from ``loadtest gen-trace`` replayed with ``--workload trace``, where follow-ups arrive after
eviction. By default (``--eviction-kind conversations``) 20 conversations per pod of 6 turns ~6 s
apart, totalling ~7x the fleet's KV: a follow-up often finds its conversation evicted from the pod
that served it, which the router's own history cannot know. ``--eviction-kind sweep``: documents
4x the fleet's KV read in a cycle, every follow-up evicted everywhere, a quarter of the requests
re-reading a recent document. ``--eviction-trace FILE`` replays a trace of your own. Every run also
reports the finite-cache LRU oracle (``--oracle-cache-tokens``: one LRU as large as the fleet) and,
per arm, "claim kept": the share of the tokens the router said the chosen pod had cached
(``x-prefix-cache-match``) that the pod did serve from cache.

``--router-replicas N`` puts N router processes behind each of our Envoys, ``--statesync`` gives each
of our stacks its own Redis to share them (the README's "With several replicas, precise still wants
statesync" comes from these).

An arm our router rejects (e.g. a strategy not built yet) is skipped and reported, not fatal.
The run is bounded by --budget-s: each arm's sending time is capped so the whole run fits.

    .venv/bin/python bench/quality.py                     # shared-prefix, all arms
    .venv/bin/python bench/quality.py --workload all --skip-peers    # also the eviction trace
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from extproc_router.loadtest.traces import load_trace  # noqa: E402
from extproc_router.simulator.config import SimConfig  # noqa: E402
from extproc_router.stack import LocalStack, ModelTiming, PodSpec, StackOptions, free_port  # noqa: E402

PEER_VENV = ROOT / "bench" / ".venv-peers"
PEER_PACKAGES = ("sglang-router", "vllm-router")
OUR_ARMS = ("random", "least-request", "prefix-cache", "precise")
PEER_ARMS = ("sglang", "vllm")
DEFAULT_ARMS = ",".join((*OUR_ARMS, *PEER_ARMS))

# Startup, per-arm overheads (preflight, reset, drain of the last answers) and the peers' install
# time, measured on the 2-core dev machine; only used for the up-front estimate and the budget.
STARTUP_S = 15.0
ARM_OVERHEAD_S = 6.0
PEER_INSTALL_S = 40.0


@dataclass
class WorkloadPlan:
    """How one workload is driven: the harness flags and the number of requests per arm."""

    name: str
    requests: int
    flags: list[str] = field(default_factory=list)
    rate: float | None = None
    concurrency: int | None = None

    def send_time_s(self) -> float:
        """Expected time to send every request of one arm (closed loop: a rough guess)."""
        if self.rate:
            return self.requests / self.rate
        return self.requests * 1.5 / max(1, self.concurrency or 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=["shared-prefix", "multi-turn", "eviction", "both", "all"],
                   default="shared-prefix", help="both: shared-prefix and multi-turn; all: the three")
    p.add_argument("--requests", type=int,
                   help="requests per arm (default: the workload's size: 150, 200, --eviction-requests)")
    p.add_argument("--arms", default=DEFAULT_ARMS,
                   help=f"comma-separated arms among {', '.join(OUR_ARMS + PEER_ARMS)} (default: all)")
    p.add_argument("--skip-peers", action="store_true", help="run only our router's arms")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quality")
    p.add_argument("--pods", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="workload seed (same seed, same requests and arrivals)")
    p.add_argument("--rate", type=float, default=20.0,
                   help="shared-prefix Poisson arrivals per second (about 80%% of what 4 pods serve without "
                        "cache hits, so misses queue)")
    p.add_argument("--users", type=int, default=10, help="multi-turn: conversations at once")
    p.add_argument("--rounds", type=int, default=20,
                   help="multi-turn: turns per conversation (first turns, cold for any router, are 1/rounds of all)")
    p.add_argument("--history-tokens", type=int, default=1500,
                   help="multi-turn: user-specific context opening each conversation (0: the old, "
                        "system-prompt-only workload)")
    p.add_argument("--turn-rate", type=float, default=4.0,
                   help="multi-turn: Poisson turns per second over all users (0: closed loop of --users)")
    p.add_argument("--eviction-kind", choices=EVICTION_KINDS, default="conversations",
                   help="eviction: conversations (default): 20 per pod, 6 turns ~6 s apart behind 2 shared system "
                        "blocks, their total 7x the fleet's KV, so a follow-up often finds its conversation evicted "
                        "from the pod that served it (and the router's history still says it is there); sweep: "
                        "documents 4x the fleet's KV read in a cycle, every follow-up evicted everywhere")
    p.add_argument("--eviction-rate", type=float, default=None,
                   help="eviction: Poisson arrivals per second: conversation starts (default 0.83 per pod) or, "
                        "sweep, requests (default 8: each ~4.4k prompt tokens, about 75%% of what 4 pods prefill "
                        "when nothing is cached)")
    p.add_argument("--eviction-requests", type=int, default=200,
                   help="eviction, sweep: requests in the trace (~2.3 sweeps of the 64 documents, a quarter of the "
                        "requests revisiting a recent one)")
    p.add_argument("--eviction-trace", type=Path,
                   help="eviction: replay this trace (the common JSONL format, 512-token blocks) instead of "
                        "generating one; --eviction-rate and --eviction-requests then do not apply")
    p.add_argument("--time-scale", type=float, default=1.0,
                   help="eviction: multiply the trace's timestamps (0.5: twice as fast)")
    p.add_argument("--kv-capacity-tokens", type=int, default=16384,
                   help="per pod; the default shared-prefix prefixes (30 x ~1.5k tokens) need ~70%% of the "
                        "cluster's KV and ~2.8x one pod's")
    p.add_argument("--router-replicas", type=int, default=1,
                   help="router processes behind each of our Envoys (Envoy spreads the ext_proc streams); "
                        "without --statesync each approximate replica knows only what it routed itself, and each "
                        "precise replica hears every pod's events but only its own speculative window")
    p.add_argument("--statesync", action="store_true",
                   help="give each of our stacks its own Redis and share its replicas' prefix index over it "
                        "(the precise arm's replicas then also share what they routed but the engines have not "
                        "yet reported: the speculative window)")
    p.add_argument("--router-env", action="append", default=[], metavar="KEY=VALUE",
                   help="an environment variable for our routers, both stacks (repeatable)")
    p.add_argument("--precise-env", action="append", default=[], metavar="KEY=VALUE",
                   help="an environment variable for the precise arm's routers only (repeatable; wins over "
                        "--router-env)")
    p.add_argument("--budget-s", type=float, default=1800.0,
                   help="bound on the whole run, start-up included (all workloads, 6 arms: ~17 min)")
    args = p.parse_args(argv)
    if args.router_replicas < 1:
        p.error("--router-replicas must be at least 1")
    for flag in ("router_env", "precise_env"):
        pairs = {}
        for item in getattr(args, flag):
            key, sep, value = item.partition("=")
            if not sep or not key:
                p.error(f"--{flag.replace('_', '-')} wants KEY=VALUE, got {item!r}")
            pairs[key] = value
        setattr(args, flag, pairs)
    return args


def workload_plans(args: argparse.Namespace) -> list[WorkloadPlan]:
    plans = []
    if args.workload in ("shared-prefix", "both", "all"):
        # The harness defaults (30 groups x 5, 1500 + 300 tokens, 100 out) at a Poisson rate that
        # keeps the pods busy enough for cache misses to queue behind each other.
        n = args.requests or 150
        plans.append(WorkloadPlan("shared-prefix", n, ["--workload", "shared-prefix", "--rate", str(args.rate)],
                                  rate=args.rate))
    if args.workload in ("multi-turn", "both", "all"):
        # The shape of production-stack's multi-round-qa (benchmarks/multi-round-qa, README example:
        # 10 users, 1000-token shared system prompt, 2000-token user history, 100-token answers,
        # short questions, turns paced by an overall QPS). The first turn of each conversation is
        # cold for every router, the later ones show the routing; 20 rounds (its run.sh has 10)
        # keep the cold ones at 5% of requests so that they alone do not decide the p90, and a
        # 1500-token history keeps 10 grown conversations within the cluster's KV (not one pod's).
        users = args.users
        n = args.requests or users * args.rounds
        flags = ["--workload", "multi-turn", "--users", str(users), "--rounds", str(math.ceil(n / users)),
                 "--prefix-tokens", "1000", "--history-tokens", str(args.history_tokens),
                 "--question-tokens", "50", "--output-tokens", "100"]
        if args.turn_rate > 0:
            # Each user still has one turn open at most: a turn is sent at the next arrival after
            # its user's previous turn ended.
            plans.append(WorkloadPlan("multi-turn", n, [*flags, "--rate", str(args.turn_rate)], rate=args.turn_rate))
        else:
            plans.append(WorkloadPlan("multi-turn", n, [*flags, "--concurrency", str(users)], concurrency=users))
    if args.workload in ("eviction", "all"):
        # The trace is written now, into the workload's output directory (its length sets the arm's time cap).
        trace = args.out / "eviction" / "trace.jsonl"
        trace.parent.mkdir(parents=True, exist_ok=True)
        if args.eviction_trace is not None:
            trace.write_bytes(args.eviction_trace.read_bytes())
            print(f"eviction trace: {args.eviction_trace}", flush=True)
        else:
            if args.eviction_rate is None:
                args.eviction_rate = EVICTION_SWEEP_RATE if args.eviction_kind == "sweep" else 0.8333 * args.pods
            requests = args.requests or (args.eviction_requests if args.eviction_kind == "sweep"
                                         else EVICTION_USERS_PER_POD * args.pods * EVICTION_TURNS)
            gen = eviction_trace_command(args, trace, requests)
            print(f"eviction trace: {' '.join(gen[3:])}", flush=True)
            subprocess.run(gen, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        stamps = [r.timestamp_ms for r in load_trace(trace)]  # in arrival order; a bad line stops here
        n = min(args.requests or len(stamps), len(stamps))
        rate = n / max(1.0, (stamps[n - 1] - stamps[0]) / 1000.0 * args.time_scale)
        plans.append(WorkloadPlan("eviction", n, ["--workload", "trace", "--trace", str(trace),
                                                  "--block-tokens", str(EVICTION_BLOCK_TOKENS),
                                                  "--time-scale", str(args.time_scale)],
                                  rate=rate))
    return plans


EVICTION_BLOCK_TOKENS = 512  # Mooncake's hash-id block; a sweep document is gen-trace's 8 of them
EVICTION_KINDS = ("conversations", "sweep")
EVICTION_SWEEP_RATE = 8.0
EVICTION_USERS_PER_POD = 20
EVICTION_TURNS = 6
EVICTION_TURN_GAP_S = 6.0


def eviction_trace_command(args: argparse.Namespace, trace: Path, requests: int) -> list[str]:
    """`loadtest gen-trace` for the fleet's KV capacity (pods x per-pod tokens).

    conversations: 20 users per pod of 6 turns, each turn resending the conversation (2 shared
    system blocks, then every earlier 512-token question and answer) plus a new question; turns
    ~6 s apart, starts Poisson at 0.83/s per pod. The conversations total ~7x the fleet's KV, so
    other users' turns often push one out of the pod that served it before its next turn.
    sweep: documents 4x the fleet's KV in a cycle, a quarter of the requests re-reading a recent one."""
    common = [sys.executable, "-m", "extproc_router", "loadtest", "gen-trace", "--out", str(trace),
              "--seed", str(args.seed), "--block-tokens", str(EVICTION_BLOCK_TOKENS),
              "--capacity-tokens", str(args.pods * args.kv_capacity_tokens), "--rate", str(args.eviction_rate)]
    if args.eviction_kind == "sweep":
        return [*common, "--kind", "eviction", "--requests", str(requests)]
    users = max(1, math.ceil(requests / EVICTION_TURNS))
    return [*common, "--kind", "multi-turn", "--users", str(users), "--turns", str(EVICTION_TURNS),
            "--turn-gap-s", str(EVICTION_TURN_GAP_S), "--system-blocks", "2"]


# ---------------------------------------------------------------- processes


def model_timing(kv_capacity: int) -> ModelTiming:
    """The simulator's own engine model (8B on one H100), with the benchmark's small KV cache."""
    sim = SimConfig()
    return ModelTiming(kv_capacity_tokens=kv_capacity, prefill_tokens_per_s=sim.prefill_tokens_per_s,
                       decode_step_ms=sim.decode_step_ms, tokenizer=sim.tokenizer)


class PreciseStack(LocalStack):
    """The `precise` arm: a second router + Envoy in front of another stack's pods, subscribed to their
    KV events, prefix-cache by default. The pods are the other stack's to start and stop."""

    def __init__(self, run_dir: Path, pods: list[PodSpec], timing: ModelTiming, health_interval: float,
                 replicas: int = 1, redis: bool = False, env: dict[str, str] | None = None) -> None:
        super().__init__(StackOptions.on_free_ports(
            run_dir=str(run_dir), pods=0, health_interval=health_interval, timing="model", model_timing=timing,
            kv_events=True, model_config=None, router_env={"ROUTING_ALGORITHM": "prefix-cache", **(env or {})},
            replicas=replicas, redis=redis))
        self.pods = pods  # with their KV-events ports: the pod file declares them

    def start_pod(self, pod: PodSpec) -> None:
        pass


def ensure_peer_venv() -> Path | None:
    """The peers' venv python, creating and filling bench/.venv-peers on first use; None if that fails."""
    python = PEER_VENV / "bin" / "python"
    ready = (PEER_VENV / "bin" / "vllm-router").exists() and python.exists() and subprocess.run(
        [str(python), "-c", "import sglang_router"], capture_output=True).returncode == 0
    if ready:
        return python
    print(f"installing the peer routers into {PEER_VENV.relative_to(ROOT)} (benchmark only, ~30 s)...", flush=True)
    try:
        if not python.exists():
            subprocess.run(["python3", "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    except (subprocess.CalledProcessError, OSError) as exc:
        print(f"WARNING: could not install the peer routers ({exc}); their arms are skipped", flush=True)
        return None
    return python


def wait_routable(url: str, model: str, proc: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    """Poll a one-token chat request through ``url`` until it answers 200 (the peers register pods lazily)."""
    body = (b'{"model": "%s", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}' % model.encode())
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} during start-up")
        req = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.25)
    raise RuntimeError(f"{what} not routing after {timeout:.0f}s ({last})")


class Peers:
    """The peer router processes; `stop` ends every one of them, whatever state it is in."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.procs: list[subprocess.Popen] = []

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / f"peer-{name}.log", "ab") as log:
            # Own session: Ctrl-C reaches the harness, and we stop the peers ourselves, in order.
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start(self, stack: LocalStack, python: Path, wanted: list[str]) -> dict[str, str]:
        """Start the wanted peer routers in front of the stack's pods; their base URLs by arm name."""
        workers = [f"http://127.0.0.1:{pod.port}" for pod in stack.pods]
        urls: dict[str, str] = {}
        for name in wanted:
            port, metrics_port = free_port(), free_port()
            if name == "sglang":
                argv = [str(python), "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
                        "--worker-urls", *workers, "--policy", "cache_aware", "--prometheus-host", "127.0.0.1",
                        "--prometheus-port", str(metrics_port), "--log-level", "warn"]
            else:
                argv = [str(python.parent / "vllm-router"), "--host", "127.0.0.1", "--port", str(port),
                        "--worker-urls", *workers, "--policy", "cache_aware",
                        "--prometheus-port", str(metrics_port), "--log-level", "warning"]
            proc = self.spawn(name, argv)
            url = f"http://127.0.0.1:{port}"
            try:
                wait_routable(url, stack.opts.model, proc, f"{name} router")
            except RuntimeError as exc:
                print(f"WARNING: {exc}; arm {name} is skipped (log: {self.run_dir}/peer-{name}.log)", flush=True)
                continue
            urls[name] = url
        return urls

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def precise_targets(workload: str, arms: dict[str, dict]) -> dict[str, object]:
    """The precise arm against the issue's targets, from one workload's per-arm summaries: hit rate within
    0.9x of the finite-cache oracle; TTFT p90 at least 20% below approximate prefix-cache on the
    eviction workload and no worse elsewhere; below sglang-router's and vllm-router's."""
    ours = arms.get("precise")
    if not ours or not ours.get("ok"):
        return {}
    p90 = ours["ttft_ms"]["p90"]
    out: dict[str, object] = {"workload": workload, "precise_ttft_p90_ms": p90}
    hit, finite = ours["hit_rate"].get("achieved"), ours["hit_rate"].get("oracle_finite")
    if hit is not None and finite:
        out["hit_vs_lru_oracle"] = round(hit / finite, 3)
        out["hit_target_met"] = hit >= 0.9 * finite
    approx = arms.get("prefix-cache")
    if approx and approx.get("ok"):
        below = 1.0 - p90 / approx["ttft_ms"]["p90"]
        out["p90_below_prefix_cache"] = round(below, 3)
        out["p90_vs_prefix_cache_target_met"] = below >= 0.2 if workload == "eviction" else below >= 0.0
    for peer in PEER_ARMS:
        theirs = arms.get(peer)
        if theirs and theirs.get("ok"):
            out[f"p90_below_{peer}"] = p90 < theirs["ttft_ms"]["p90"]
    return out


def print_targets(out_dir: Path, plans: list[WorkloadPlan]) -> None:
    """Print, and write to targets.json, how the precise arm fares against the targets per workload."""
    rows = []
    for plan in plans:
        report = out_dir / plan.name / "report.json"
        if not report.exists():
            continue
        arms = {a["summary"]["name"]: a["summary"] for a in json.loads(report.read_text())["arms"]}
        row = precise_targets(plan.name, arms)
        if row:
            rows.append(row)
    if not rows:
        return
    print("\nprecise arm vs the targets:", flush=True)
    for row in rows:
        print("  " + ", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    (out_dir / "targets.json").write_text(json.dumps(rows, indent=2) + "\n")


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in OUR_ARMS + PEER_ARMS]
    if unknown:
        print(f"unknown arms: {', '.join(unknown)} (choose among {', '.join(OUR_ARMS + PEER_ARMS)})", file=sys.stderr)
        return 2
    peers = [] if args.skip_peers else [a for a in arms if a in PEER_ARMS]
    ours = [a for a in arms if a in OUR_ARMS]
    plans = workload_plans(args)
    n_arms = len(ours) + len(peers)
    if not n_arms:
        print("no arms to run", file=sys.stderr)
        return 2

    install = PEER_INSTALL_S if peers and not (PEER_VENV / "bin" / "vllm-router").exists() else 0.0
    fixed = STARTUP_S + install
    estimate = fixed + sum(n_arms * (p.send_time_s() + ARM_OVERHEAD_S) for p in plans)
    # Cap each arm's sending time so the total fits the budget whatever the pods' speed: the budget
    # left after start-up is shared out in proportion to each workload's expected sending time.
    sending = sum(p.send_time_s() for p in plans) or 1.0
    spare = max(0.0, args.budget_s - fixed - n_arms * len(plans) * (ARM_OVERHEAD_S + 15.0))
    caps = {p.name: max(10.0, spare * p.send_time_s() / sending / n_arms) for p in plans}
    print(f"plan: {args.pods} simulated pods (KV {args.kv_capacity_tokens} tokens each), arms "
          f"{', '.join(ours + peers)}; workloads "
          + "; ".join(f"{p.name} {p.requests} requests"
                      + (f" at {p.rate:g}/s" if p.rate else f", closed loop of {p.concurrency}") for p in plans)
          + f".\nestimate: ~{estimate / 60:.1f} min (start-up {fixed:.0f} s); bounded to {args.budget_s / 60:.1f} min "
          "(each arm sends for at most " + ", ".join(f"{c:.0f} s ({n})" for n, c in caps.items())
          + ", then gets 15 s to finish)", flush=True)

    run_dir = args.out / "run"
    timing = model_timing(args.kv_capacity_tokens)
    precise = "precise" in ours
    # With a precise arm the pods publish their KV events all run long; the main router ignores them,
    # so its prefix-cache stays the approximate one.
    opts = StackOptions.on_free_ports(run_dir=str(run_dir), pods=args.pods, health_interval=0.5, timing="model",
                                      model_timing=timing, kv_events=precise, replicas=args.router_replicas,
                                      redis=args.statesync,
                                      router_env={**args.router_env,
                                                  **({"EXTPROC_ROUTER_KV_EVENTS": "false"} if precise else {})})
    stack = LocalStack(opts)
    precise_stack = (PreciseStack(run_dir / "precise", stack.pods, timing, 0.5, replicas=args.router_replicas,
                                  redis=args.statesync, env={**args.router_env, **args.precise_env})
                     if precise else None)
    peers_running = Peers(run_dir)
    started = time.monotonic()
    # SIGTERM behaves like Ctrl-C: everything we started is stopped on the way out.
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        stack.start()
        print(f"stack up: Envoy {stack.url}, pods {', '.join(str(p.port) for p in stack.pods)}", flush=True)
        arm_urls: dict[str, str] = {}
        if precise_stack is not None:
            precise_stack.start()
            arm_urls["precise"] = precise_stack.url
            print(f"precise router up (KV events): Envoy {precise_stack.url}", flush=True)
        peer_urls: dict[str, str] = {}
        if peers:
            python = ensure_peer_venv()
            if python is not None:
                peer_urls = peers_running.start(stack, python, peers)
                print("peers up: " + ", ".join(f"{k} {v}" for k, v in peer_urls.items()), flush=True)
        arm_urls.update(peer_urls)
        compare = ",".join([*(a for a in ours if a not in arm_urls),
                            *(f"{name}={url}" for name, url in arm_urls.items())])
        # Each arm starts cold: the pods flush their KV caches (which the precise router hears as
        # AllBlocksCleared), and our routers forget their prefix index (otherwise prefix-cache would
        # route by what an earlier arm sent; the peers' arms ignore it).
        # Every replica forgets. With statesync a flush is local, so each replica is flushed; the deltas
        # an earlier arm published were applied long before and are not replayed.
        reset_urls = [*(f"http://127.0.0.1:{pod.port}" for pod in stack.pods),
                      *(f"{r.http_url}/flush_cache" for r in stack.routers)]
        if precise_stack is not None:
            reset_urls.extend(f"{r.http_url}/flush_cache" for r in precise_stack.routers)
        resets = [arg for url in reset_urls for arg in ("--reset-url", url)]
        status = 0
        for plan in plans:
            remaining = args.budget_s - (time.monotonic() - started)
            if remaining < 30:
                print(f"budget exhausted: {plan.name} not run", flush=True)
                status = 1
                break
            cmd = [sys.executable, "-m", "extproc_router", "loadtest", "--target", stack.url,
                   "--model", opts.model, "--compare", compare, *resets, *plan.flags,
                   "--requests", str(plan.requests), "--duration", f"{caps[plan.name]:.0f}", "--grace", "15",
                   "--timeout", "60", "--seed", str(args.seed), "--oracle-cache-tokens", str(args.kv_capacity_tokens),
                   "--out", str(args.out / plan.name)]
            print(f"\n== {plan.name}: {' '.join(cmd[3:])}", flush=True)
            try:
                rc = subprocess.run(cmd, cwd=ROOT, timeout=remaining + 30).returncode
            except subprocess.TimeoutExpired:
                print(f"{plan.name}: over the time budget, stopped", flush=True)
                rc = 1
            status = status or rc
        print_targets(args.out, plans)
        print(f"\nresults in {args.out}/<workload>/ (report.json, summary.md, *.png); logs in {run_dir}/; "
              f"took {(time.monotonic() - started) / 60:.1f} min", flush=True)
        return status
    except KeyboardInterrupt:
        print("interrupted: stopping everything", flush=True)
        return 130
    finally:
        with contextlib.suppress(Exception):
            peers_running.stop()
        if precise_stack is not None:
            with contextlib.suppress(Exception):
                precise_stack.stop()
        with contextlib.suppress(Exception):
            stack.stop()


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
