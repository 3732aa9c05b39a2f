"""Routing-quality benchmark: every arm, ours and the peers', on the same simulated pods, in one go.

Starts N simulated pods (``--timing model``: prefix-caching KV cache + continuous batching) with a
KV capacity that one pod's share of the prefixes overflows, our router + Envoy in front of them,
and the peer routers ``sglang-router`` and ``vllm-router`` (``--policy cache_aware``, installed into
the benchmark-only venv bench/.venv-peers on first use) pointed at the same pods. Then it runs
``extproc-router loadtest --compare`` over all arms, flushing the pods (POST /sim/reset) and our
router's prefix index (POST /flush_cache) before each arm, and leaves report.json, summary.md and
plots per workload in --out (default bench/results/quality/<workload>/); process logs go to
--out/run/.

An arm our router rejects (e.g. a strategy not built yet) is skipped and reported, not fatal.
The run is bounded by --budget-s: each arm's sending time is capped so the whole run fits.

    .venv/bin/python bench/quality.py                     # shared-prefix, all arms
    .venv/bin/python bench/quality.py --workload both --skip-peers
"""

from __future__ import annotations

import argparse
import contextlib
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

from extproc_router.stack import LocalStack, StackOptions, free_port  # noqa: E402

PEER_VENV = ROOT / "bench" / ".venv-peers"
PEER_PACKAGES = ("sglang-router", "vllm-router")
OUR_ARMS = ("random", "least-request", "prefix-cache")
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
    p.add_argument("--workload", choices=["shared-prefix", "multi-turn", "both"], default="shared-prefix")
    p.add_argument("--requests", type=int, help="requests per arm (default: the workload's size: 150, 50)")
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
    p.add_argument("--kv-capacity-tokens", type=int, default=16384,
                   help="per pod; the default shared-prefix prefixes (30 x ~1.5k tokens) need ~70%% of the "
                        "cluster's KV and ~2.8x one pod's")
    p.add_argument("--budget-s", type=float, default=720.0, help="bound on the whole run, start-up included")
    return p.parse_args(argv)


def workload_plans(args: argparse.Namespace) -> list[WorkloadPlan]:
    plans = []
    if args.workload in ("shared-prefix", "both"):
        # The harness defaults (30 groups x 5, 1500 + 300 tokens, 100 out) at a Poisson rate that
        # keeps the pods busy enough for cache misses to queue behind each other.
        n = args.requests or 150
        plans.append(WorkloadPlan("shared-prefix", n, ["--workload", "shared-prefix", "--rate", str(args.rate)],
                                  rate=args.rate))
    if args.workload in ("multi-turn", "both"):
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
    return plans


# ---------------------------------------------------------------- processes


def sim_args(kv_capacity: int) -> list[str]:
    """Simulator flags: the model timing if this simulator has it, else its fixed timing (with a warning)."""
    help_text = subprocess.run([sys.executable, "-m", "extproc_router", "sim", "--help"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout
    if "--timing" not in help_text:
        print("WARNING: this simulator has no --timing model: latencies will not depend on the cache, "
              "so only the hit rates and the spread mean something", flush=True)
        return ["--kv-capacity-tokens", str(kv_capacity)]
    return ["--timing", "model", "--kv-capacity-tokens", str(kv_capacity)]


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
    opts = StackOptions.on_free_ports(run_dir=str(run_dir), pods=args.pods, health_interval=0.5,
                                      sim_args=sim_args(args.kv_capacity_tokens))
    stack = LocalStack(opts)
    peers_running = Peers(run_dir)
    started = time.monotonic()
    # SIGTERM behaves like Ctrl-C: everything we started is stopped on the way out.
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        stack.start()
        print(f"stack up: Envoy {stack.url}, pods {', '.join(str(p.port) for p in stack.pods)}", flush=True)
        peer_urls: dict[str, str] = {}
        if peers:
            python = ensure_peer_venv()
            if python is not None:
                peer_urls = peers_running.start(stack, python, peers)
                print("peers up: " + ", ".join(f"{k} {v}" for k, v in peer_urls.items()), flush=True)
        compare = ",".join([*ours, *(f"{name}={url}" for name, url in peer_urls.items())])
        # Each arm starts cold: the pods flush their KV caches, and our router forgets its prefix index
        # (otherwise prefix-cache would route by what an earlier arm sent; the peers' arms ignore it).
        reset_urls = [*(f"http://127.0.0.1:{pod.port}" for pod in stack.pods), f"{stack.router_http}/flush_cache"]
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
                   "--timeout", "60", "--seed", str(args.seed), "--out", str(args.out / plan.name)]
            print(f"\n== {plan.name}: {' '.join(cmd[3:])}", flush=True)
            try:
                rc = subprocess.run(cmd, cwd=ROOT, timeout=remaining + 30).returncode
            except subprocess.TimeoutExpired:
                print(f"{plan.name}: over the time budget, stopped", flush=True)
                rc = 1
            status = status or rc
        print(f"\nresults in {args.out}/<workload>/ (report.json, summary.md, *.png); logs in {run_dir}/; "
              f"took {(time.monotonic() - started) / 60:.1f} min", flush=True)
        return status
    except KeyboardInterrupt:
        print("interrupted: stopping everything", flush=True)
        return 130
    finally:
        with contextlib.suppress(Exception):
            peers_running.stop()
        with contextlib.suppress(Exception):
            stack.stop()


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
