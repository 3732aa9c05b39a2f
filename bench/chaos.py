"""Chaos and soak benchmark: one fault at a time under steady streaming load, and a long soak.

Chaos (the default). Every scenario starts a fresh local stack on free loopback ports: 3 simulated
vLLM pods with streaming timing (TTFT 50 ms, 21-49 ms between tokens, 40-80 tokens per answer),
2 router replicas under supervision (a router that exits is restarted), Redis with statesync on,
and Envoy. An open-loop Poisson load (--rate, default 20 req/s) of streaming chat requests with
`routing-strategy: prefix-cache` (shared system prompts) runs for --duration seconds; --fault-at
seconds in, one fault is injected:

  router-kill9          kill -9 of one router replica (the supervisor restarts it)
  router-sigterm        SIGTERM of one replica with --drain-delay 0 (the default before it became 2 s)
  router-sigterm-drain  SIGTERM with --drain-delay 2 (readiness false 2 s before new streams are refused)
  redis-restart         kill -9 of Redis, restarted empty on the same port --redis-down seconds later
  pod-kill9             kill -9 of one pod mid-stream; it restarts on the same address 10 s later
                        (a container restart keeps the pod's IP)
  pod-kill9-retry       the same with an Envoy retry policy (connect-failure, refused-stream,
                        reset-before-request; previous_hosts predicate) on the pod route
  pod-hang              SIGSTOP of one pod (sockets stay open, nothing is answered), SIGCONT --hang seconds later
  pod-hang-timeout      SIGSTOP until the load ends, with Envoy's route timeout at 10 s instead of 120 s:
                        what clients of a pod that never recovers see, and when
  envoy-handover        a new Envoy binds the same listener port (SO_REUSEPORT), the old one gets
                        POST /drain_listeners?graceful and is stopped once idle
  envoy-restart-gap     the old Envoy drains, finishes its streams and stops, then a new one starts:
                        the gap, measured

Every request is classified: ok (HTTP 200, every token it asked for, then [DONE]); late (complete,
but waited --stall-threshold seconds or more for its first byte or between two chunks); failed,
by kind: an HTTP error status with the error code of the OpenAI-shaped body, `cut` (a 200 stream
that ended before [DONE]), `connect` (the connection was refused), `disconnected` (the server
closed the connection before any response), `timeout`. Recovery time: the smallest whole number of
seconds s >= 0 such that every request started at fault + s or later was ok (not late, not failed);
"-" when the requests of the last second still were not.

Soak (--soak [MINUTES], default 20). The same stack at moderate load (--rate, default 10 req/s in
this mode); every --sample-interval seconds (60) each router's RSS (VmRSS from /proc/PID/status),
open fds (/proc/PID/fd), prefix index entries (`extproc_prefix_cache_index_entries` on its
/metrics), Redis used_memory (INFO memory), and Envoy's RSS and fds are sampled. Least-squares
slopes per minute over the samples after --warmup minutes are the result (target: flat). So that
the bounded structures reach their bound within the warm-up rather than growing for the whole soak,
the soak routers run with a 1-minute index TTL (AIBRIX_PREFIX_CACHE_EVICTION_DURATION_MINS) and a
500-entry statesync stream (EXTPROC_ROUTER_STATESYNC_STREAM_MAXLEN); half the requests reuse 40
system prompts, half are fresh, so the index adds and evicts all the time.

    .venv/bin/python bench/chaos.py                      # every scenario, ~6 min on 2 cores
    .venv/bin/python bench/chaos.py --quick              # shorter load per scenario, ~3 min
    .venv/bin/python bench/chaos.py --scenario pod-hang --scenario redis-restart
    .venv/bin/python bench/chaos.py --soak 20            # 20-minute soak

Writes bench/results/chaos.json (chaos) or bench/results/soak.json and soak.png (soak); process
logs go to bench/results/chaos-run/<scenario>/ and bench/results/soak-run/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# Run as a script, this file's folder comes first on sys.path, where bench/statesync.py would shadow
# the `statesync` package: take the folder off.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import orjson  # noqa: E402
import yaml  # noqa: E402

from extproc_router.loadtest.workloads import WORDS  # noqa: E402
from extproc_router.stack import LocalStack, StackOptions  # noqa: E402

MODEL = "demo-model"
CHAT_PATH = "/v1/chat/completions"
RESULTS = ROOT / "bench" / "results"
RUNS = Path("bench") / "results"  # process logs, relative to the repository (the working directory)


# --------------------------------------------------------------------------------------- settings


@dataclass
class Settings:
    rate: float = 20.0
    duration: float = 30.0  # seconds of load per scenario
    fault_at: float = 5.0  # seconds into the load
    pods: int = 3
    replicas: int = 2
    ttft_ms: float = 50.0
    itl_ms: float = 35.0
    jitter: float = 0.4  # sim --latency-jitter: ITL 21-49 ms around 35
    min_tokens: int = 40
    max_tokens: int = 80
    stall_threshold: float = 1.0
    hang_s: float = 15.0
    redis_down_s: float = 3.0
    pod_restart_after: float = 10.0
    envoy_drain_time_s: float = 3.0
    request_timeout: float = 60.0
    seed: int = 1
    health_interval: float = 1.0  # the routers' pod health checks (the default)

    def sim_args(self) -> list[str]:
        return ["--latency-jitter", str(self.jitter), "--max-output-tokens", str(self.max_tokens)]


# ----------------------------------------------------------------------------------------- workload


class Prompts:
    """Chat requests sharing system prompts, so prefix-cache routing has prefixes to follow."""

    def __init__(self, seed: int, groups: int = 24, prefix_words: int = 250, question_words: int = 20,
                 fresh_share: float = 0.0) -> None:
        self.rng = random.Random(seed)
        self.systems = [" ".join(self.rng.choices(WORDS, k=prefix_words)) for _ in range(groups)]
        self.prefix_words, self.question_words, self.fresh_share = prefix_words, question_words, fresh_share

    def body(self, min_tokens: int, max_tokens: int) -> tuple[dict[str, Any], int]:
        rng = self.rng
        if rng.random() < self.fresh_share:
            system = " ".join(rng.choices(WORDS, k=self.prefix_words))
        else:
            system = rng.choice(self.systems)
        tokens = rng.randint(min_tokens, max_tokens)
        body = {"model": MODEL, "stream": True, "stream_options": {"include_usage": True}, "max_tokens": tokens,
                "messages": [{"role": "system", "content": system},
                             {"role": "user", "content": " ".join(rng.choices(WORDS, k=self.question_words))}]}
        return body, tokens


# ------------------------------------------------------------------------------------------ client


@dataclass(slots=True)
class Rec:
    """One request. Times are seconds since the load started."""

    start: float
    expected: int
    end: float | None = None
    status: int = 0
    pod: str = ""
    tokens: int = 0
    done: bool = False
    max_gap: float = 0.0  # longest wait: request sent -> first line, or between two lines
    kind: str = "pending"  # ok, or how it failed

    @property
    def complete(self) -> bool:
        return self.kind == "ok"

    @property
    def outcome(self) -> str:
        """ok, late (complete but stalled) or failed."""
        if self.kind != "ok":
            return "failed" if self.kind != "pending" else "pending"
        return "late" if self.max_gap >= STALL[0] else "ok"


STALL = [1.0]  # the stall threshold, set from the settings (one value for the whole run)


def _error_code(raw: bytes) -> str:
    with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
        err = orjson.loads(raw).get("error")
        if isinstance(err, dict):
            return str(err.get("code") or err.get("type") or "")
    text = raw.decode(errors="replace").strip()
    return text[:40] if text else "empty body"


async def stream_one(session: aiohttp.ClientSession, url: str, body: dict[str, Any], rec: Rec,
                     clock: Callable[[], float]) -> None:
    """Send one streaming request and classify what came back into `rec` (never raises, but for cancel)."""
    last = clock()
    try:
        async with session.post(url, data=orjson.dumps(body),
                                headers={"content-type": "application/json", "routing-strategy": "prefix-cache"}
                                ) as resp:
            rec.status = resp.status
            rec.pod = resp.headers.get("target-pod", "")
            if resp.status != 200:
                raw = await resp.content.read(4096)
                rec.kind = f"{resp.status} {_error_code(raw)}"
                return
            now = clock()
            rec.max_gap, last = now - last, now
            async for line in resp.content:
                now = clock()
                rec.max_gap = max(rec.max_gap, now - last)
                last = now
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    rec.done = True
                    continue
                chunk = orjson.loads(data)
                if "error" in chunk:
                    rec.kind = f"sse error {_error_code(data)}"
                    return
                for choice in chunk.get("choices") or ():
                    delta = choice.get("delta") or {}
                    if delta.get("content"):
                        rec.tokens += 1
            if rec.done and rec.tokens == rec.expected:
                rec.kind = "ok"
            elif rec.done:
                rec.kind = f"short ({rec.tokens}/{rec.expected} tokens)"
            else:
                rec.kind = "cut"
    except aiohttp.ClientPayloadError:
        rec.kind = "cut"
    except aiohttp.ClientConnectorError:
        rec.kind = "connect"
    except aiohttp.ServerDisconnectedError:
        rec.kind = "cut" if rec.status else "disconnected"
    except TimeoutError:
        rec.kind = "timeout"
    except (aiohttp.ClientError, orjson.JSONDecodeError, ValueError) as exc:
        rec.kind = type(exc).__name__
    finally:
        rec.end = clock()


class Load:
    """An open-loop Poisson load: requests start on schedule whatever happens to earlier ones."""

    def __init__(self, url: str, rate: float, duration: float, prompts: Prompts, settings: Settings,
                 keep_records: bool = True) -> None:
        self.url = url + CHAT_PATH
        self.rate, self.duration, self.prompts, self.settings = rate, duration, prompts, settings
        self.records: list[Rec] = []
        self.keep_records = keep_records
        self.counts: Counter[str] = Counter()  # outcome of finished requests (soak keeps only these)
        self.kinds: Counter[str] = Counter()
        self.started = 0
        self.in_flight = 0
        self.t0 = time.monotonic()  # begin() sets it again right before the load starts
        self._arrivals = random.Random(settings.seed + 7)

    def clock(self) -> float:
        return time.monotonic() - self.t0

    def begin(self) -> asyncio.Task:
        """Start the load now (its clock's zero) as a task."""
        self.t0 = time.monotonic()
        return asyncio.create_task(self.run())

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=self.settings.request_timeout)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
            tasks: set[asyncio.Task] = set()
            at = 0.0
            while True:
                at += self._arrivals.expovariate(self.rate)
                if at >= self.duration:
                    break
                delay = at - self.clock()
                if delay > 0:
                    await asyncio.sleep(delay)
                body, expected = self.prompts.body(self.settings.min_tokens, self.settings.max_tokens)
                rec = Rec(start=self.clock(), expected=expected)
                self.started += 1
                if self.keep_records:
                    self.records.append(rec)
                task = asyncio.create_task(self._one(session, body, rec))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)

    async def _one(self, session: aiohttp.ClientSession, body: dict[str, Any], rec: Rec) -> None:
        self.in_flight += 1
        try:
            await stream_one(session, self.url, body, rec, self.clock)
        finally:
            self.in_flight -= 1
            self.counts[rec.outcome] += 1
            self.kinds[rec.kind] += 1


# ----------------------------------------------------------------------------------------- metrics

_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        try:
            out.append((name, dict(_LABEL.findall(labels)), float(value)))
        except ValueError:
            continue
    return out


async def router_sample(session: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    """The figures the scenarios follow, from one router's /metrics; None if it does not answer."""
    try:
        async with session.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=1)) as resp:
            text = await resp.text()
    except (TimeoutError, aiohttp.ClientError):
        return None
    s: dict[str, Any] = {"ready_pods": {}, "routed": {}, "resyncs": {}}
    for name, labels, value in parse_metrics(text):
        if name == "extproc_prefix_cache_index_entries":
            s["index_entries"] = int(value)
        elif name == "extproc_pod_ready":
            s["ready_pods"][labels.get("pod", "")] = int(value)
        elif name == "extproc_requests_total" and labels.get("status") == "routed":
            pod = labels.get("pod", "")
            s["routed"][pod] = s["routed"].get(pod, 0) + int(value)
        elif name == "extproc_statesync_connected":
            s["sync_connected"] = int(value)
        elif name == "extproc_statesync_synced":
            s["sync_synced"] = int(value)
        elif name == "extproc_statesync_resyncs_total":
            s["resyncs"][labels.get("reason", "")] = int(value)
        elif name == "extproc_statesync_deltas_applied_total":
            s["deltas_applied"] = s.get("deltas_applied", 0) + int(value)
    return s


async def envoy_stats(session: aiohttp.ClientSession, admin_url: str, names: tuple[str, ...]) -> dict[str, int]:
    pattern = "|".join(f"^{n}$" for n in names)
    try:
        async with session.get(f"{admin_url}/stats", params={"filter": pattern},
                               timeout=aiohttp.ClientTimeout(total=1)) as resp:
            text = await resp.text()
    except (TimeoutError, aiohttp.ClientError):
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        with contextlib.suppress(ValueError):
            out[key] = int(value)
    return out


ENVOY_STATS = (
    "cluster.extproc.membership_healthy", "cluster.extproc.upstream_cx_connect_fail",
    "cluster.model_pods.upstream_rq_retry", "cluster.model_pods.upstream_rq_retry_success",
    "cluster.model_pods.upstream_rq_retry_limit_exceeded", "cluster.model_pods.upstream_cx_connect_fail",
    "http.gateway.downstream_rq_active",
)


class Monitor:
    """Samples every router's /metrics and Envoy's stats every `interval` seconds during a scenario."""

    def __init__(self, stack: LocalStack, load: Load, interval: float = 0.5) -> None:
        self.stack, self.load, self.interval = stack, load, interval
        self.samples: list[dict[str, Any]] = []

    async def run(self, stop: asyncio.Event) -> None:
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                t = self.load.clock()
                routers = await asyncio.gather(*(router_sample(session, r.http_url) for r in self.stack.routers))
                envoy = await envoy_stats(session, self.stack.admin_url, ENVOY_STATS)
                self.samples.append({"t": round(t, 2), "routers": dict(zip([r.name for r in self.stack.routers],
                                                                            routers, strict=True)),
                                     "envoy": envoy})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval)


# ---------------------------------------------------------------------------------------- the stack


class ChaosStack(LocalStack):
    """The local stack, with an optional retry policy on the route to the pods."""

    pod_retry_policy: dict[str, Any] | None = None

    def envoy_bootstrap(self) -> dict:
        boot = super().envoy_bootstrap()
        if self.pod_retry_policy is not None:
            for listener in boot["static_resources"]["listeners"]:
                for chain in listener["filter_chains"]:
                    for f in chain["filters"]:
                        for vh in f["typed_config"].get("route_config", {}).get("virtual_hosts", ()):
                            for route in vh["routes"]:
                                if route.get("name") == "pods":
                                    route["route"]["retry_policy"] = self.pod_retry_policy
        return boot


RETRY_POLICY = {
    "retry_on": "connect-failure,refused-stream,reset-before-request",
    "num_retries": 2,
    # Ask for another host on each retry; ORIGINAL_DST only ever offers the header's address.
    "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
    "host_selection_retry_max_attempts": 3,
}


def make_stack(settings: Settings, run_dir: Path, *, router_args: list[str] | None = None,
               router_env: dict[str, str] | None = None, envoy_args: list[str] | None = None,
               retry: bool = False, values: dict[str, Any] | None = None) -> ChaosStack:
    values_file = None
    if values is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        values_file = run_dir / "values.yaml"
        values_file.write_text(yaml.safe_dump(values))
    opts = StackOptions.on_free_ports(
        values_file=None if values_file is None else str(values_file),
        run_dir=str(run_dir), pods=settings.pods, replicas=settings.replicas, redis=True, supervise=True,
        ttft_ms=settings.ttft_ms, itl_ms=settings.itl_ms, sim_args=settings.sim_args(),
        health_interval=settings.health_interval, router_args=list(router_args or []),
        router_env=dict(router_env or {}), envoy_args=list(envoy_args or []))
    stack = ChaosStack(opts)
    if retry:
        stack.pod_retry_policy = RETRY_POLICY
    LIVE_STACKS.append(stack)
    return stack


LIVE_STACKS: list[LocalStack] = []  # every stack this run made: stopped again on the way out, whatever happens


# ---------------------------------------------------------------------------------------- scenarios


@dataclass
class Ctx:
    """What an injector works with: the stack, the load's clock, and the event log."""

    stack: ChaosStack
    load: Load
    settings: Settings
    events: list[tuple[float, str]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def event(self, what: str) -> float:
        t = self.load.clock()
        self.events.append((round(t, 3), what))
        return t

    async def until(self, t: float) -> None:
        delay = t - self.load.clock()
        if delay > 0:
            await asyncio.sleep(delay)


async def wait_ready(url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError, aiohttp.ClientError):
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=0.5)) as resp:
                    if resp.status == 200:
                        return True
            await asyncio.sleep(0.05)
    return False


async def inject_router(ctx: Ctx, sig: int) -> None:
    stack, name = ctx.stack, ctx.stack.routers[-1].name
    await ctx.until(ctx.settings.fault_at)
    old = stack.procs[name]
    ctx.info.update(router=name, signal=signal.Signals(sig).name)
    ctx.event(f"{signal.Signals(sig).name} {name}")
    old.send_signal(sig)
    code = await asyncio.to_thread(old.wait)
    ctx.event(f"{name} exited with code {code}")
    while stack.procs[name] is old:  # the supervisor spawns a new process
        await asyncio.sleep(0.05)
    ctx.event(f"{name} restarted by the supervisor")
    spec = stack.routers[-1]
    if await wait_ready(spec.http_url + "/ready", 20):
        ctx.event(f"{name} ready again")


async def inject_redis(ctx: Ctx) -> None:
    stack = ctx.stack
    await ctx.until(ctx.settings.fault_at)
    ctx.event("kill -9 redis")
    await asyncio.to_thread(stack.kill, "redis", signal.SIGKILL)
    await ctx.until(ctx.settings.fault_at + ctx.settings.redis_down_s)
    await asyncio.to_thread(stack.start_redis)
    ctx.event("redis restarted (empty)")


async def routed_now(ctx: Ctx, pod: str) -> int | None:
    """How many requests the routers have sent to `pod` so far (None if one does not answer)."""
    async with aiohttp.ClientSession() as session:
        samples = await asyncio.gather(*(router_sample(session, r.http_url) for r in ctx.stack.routers))
    if any(s is None for s in samples):
        return None
    return sum(s["routed"].get(pod, 0) for s in samples if s is not None)


async def inject_pod_kill(ctx: Ctx) -> None:
    stack = ctx.stack
    pod = stack.pods[1]
    ctx.info["pod"] = pod.name
    await ctx.until(ctx.settings.fault_at - 0.2)
    ctx.info["routed_to_pod_at_fault"] = await routed_now(ctx, pod.name)
    await ctx.until(ctx.settings.fault_at)
    ctx.event(f"kill -9 {pod.name}")
    await asyncio.to_thread(stack.kill, pod.name, signal.SIGKILL)
    await ctx.until(ctx.settings.fault_at + ctx.settings.pod_restart_after)
    ctx.event(f"restart {pod.name} (same address)")
    await asyncio.to_thread(stack.start_pod, pod)
    ctx.info["pod_restarted_at"] = ctx.event(f"{pod.name} answers /health again")


async def inject_pod_hang(ctx: Ctx) -> None:
    stack = ctx.stack
    pod = stack.pods[1]
    ctx.info["pod"] = pod.name
    await ctx.until(ctx.settings.fault_at - 0.2)
    ctx.info["routed_to_pod_at_fault"] = await routed_now(ctx, pod.name)
    await ctx.until(ctx.settings.fault_at)
    ctx.event(f"SIGSTOP {pod.name}")
    stack.pause(pod.name)
    await ctx.until(ctx.settings.fault_at + ctx.settings.hang_s)
    stack.resume(pod.name)
    ctx.info["resumed_at"] = ctx.event(f"SIGCONT {pod.name}")


async def inject_pod_hang_forever(ctx: Ctx) -> None:
    stack = ctx.stack
    pod = stack.pods[1]
    ctx.info["pod"] = pod.name
    await ctx.until(ctx.settings.fault_at - 0.2)
    ctx.info["routed_to_pod_at_fault"] = await routed_now(ctx, pod.name)
    await ctx.until(ctx.settings.fault_at)
    ctx.event(f"SIGSTOP {pod.name} (until the load ends)")
    stack.pause(pod.name)
    await ctx.until(ctx.settings.duration)
    stack.resume(pod.name)
    ctx.event(f"load over: SIGCONT {pod.name}")


async def inject_envoy_handover(ctx: Ctx) -> None:
    await ctx.until(ctx.settings.fault_at)
    t = ctx.event("start a second Envoy on the same port, then drain the old one")
    steps = await asyncio.to_thread(ctx.stack.replace_envoy, 30.0)
    ctx.events.append((round(t + steps["new_ready_s"], 3), "new Envoy ready"))
    ctx.events.append((round(t + steps["drain_started_s"], 3), "old Envoy: POST /drain_listeners?graceful"))
    ctx.events.append((round(t + steps["old_idle_s"], 3), "old Envoy has no request left"))
    ctx.events.append((round(t + steps["old_stopped_s"], 3), "old Envoy stopped"))
    ctx.info["handover_steps_s"] = {k: round(v, 3) for k, v in steps.items()}


async def inject_envoy_gap(ctx: Ctx) -> None:
    stack = ctx.stack
    await ctx.until(ctx.settings.fault_at)
    admin = stack.admin_url
    ctx.event("old Envoy: POST /drain_listeners?graceful")
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{admin}/drain_listeners?graceful") as resp:
            await resp.read()
        await ctx.until(ctx.settings.fault_at + ctx.settings.envoy_drain_time_s)
        ctx.event(f"drain time ({ctx.settings.envoy_drain_time_s:g} s) over: the old listener closes")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            active = (await envoy_stats(session, admin, ("http.gateway.downstream_rq_active",))).get(
                "http.gateway.downstream_rq_active")
            if not active:
                break
            await asyncio.sleep(0.1)
    ctx.event("old Envoy has no request left")
    await asyncio.to_thread(stack.kill, "envoy", signal.SIGTERM)
    ctx.info["old_stopped_at"] = ctx.event("old Envoy stopped")
    await asyncio.to_thread(stack.start_envoy)
    ctx.info["new_ready_at"] = ctx.event("new Envoy ready")


@dataclass(frozen=True)
class Scenario:
    name: str
    fault: str  # the table's first column
    inject: Callable[[Ctx], Awaitable[None]]
    router_args: tuple[str, ...] = ()
    envoy_args: tuple[str, ...] = ()
    retry: bool = False
    values: dict[str, Any] | None = None  # the seed's values.yaml keys for Envoy
    expect_zero_failures: bool = False


def _router(sig: int) -> Callable[[Ctx], Awaitable[None]]:
    async def inject(ctx: Ctx) -> None:
        await inject_router(ctx, sig)
    return inject


HANG_ROUTE_TIMEOUT_S = 10  # pod-hang-timeout: Envoy's route timeout (the rendered default: 120 s)


def scenarios(settings: Settings) -> list[Scenario]:
    drain = ("--drain-time-s", f"{settings.envoy_drain_time_s:g}", "--drain-strategy", "immediate")
    return [
        Scenario("router-kill9", "router kill -9 (1 of 2 replicas)", _router(signal.SIGKILL)),
        Scenario("router-sigterm", "router SIGTERM, --drain-delay 0 (the old default)", _router(signal.SIGTERM),
                 expect_zero_failures=True),
        Scenario("router-sigterm-drain", "router SIGTERM, --drain-delay 2", _router(signal.SIGTERM),
                 router_args=("--drain-delay", "2"), expect_zero_failures=True),
        Scenario("redis-restart", f"Redis kill -9, restarted after {settings.redis_down_s:g} s", inject_redis,
                 expect_zero_failures=True),
        Scenario("pod-kill9", "pod kill -9 mid-stream (1 of 3)", inject_pod_kill),
        Scenario("pod-kill9-retry", "pod kill -9, Envoy retry on connect-failure", inject_pod_kill, retry=True),
        Scenario("pod-hang", f"pod hangs (SIGSTOP {settings.hang_s:g} s, then SIGCONT)", inject_pod_hang),
        Scenario("pod-hang-timeout", f"pod hangs for good, route timeout {HANG_ROUTE_TIMEOUT_S} s",
                 inject_pod_hang_forever,
                 values={"gateway": {"envoyPatchPolicy": {"route": {"timeout": f"{HANG_ROUTE_TIMEOUT_S}s"}}}}),
        Scenario("envoy-handover", "Envoy replaced: new one on the same port, old one drained", inject_envoy_handover,
                 envoy_args=drain, expect_zero_failures=True),
        Scenario("envoy-restart-gap", "Envoy drained, stopped, then a new one started", inject_envoy_gap,
                 envoy_args=drain),
    ]


# ---------------------------------------------------------------------------------------- analysis


def recovery(records: list[Rec], fault: float) -> tuple[int | None, float | None]:
    """(recovery seconds, start of the last not-ok request after the fault, relative to the fault)."""
    after = [r for r in records if r.start >= fault]
    bad = [r.start - fault for r in after if r.outcome != "ok"]
    if not bad:
        return 0, None
    last_bad = max(bad)
    s = math.floor(last_bad) + 1
    last_start = max(r.start for r in records) - fault
    return (s if s <= last_start else None), round(last_bad, 2)


def per_second(records: list[Rec], fault: float) -> list[dict[str, Any]]:
    bins: dict[int, Counter[str]] = {}
    for r in records:
        bins.setdefault(math.floor(r.start - fault), Counter())[r.outcome] += 1
    return [{"s": s, **bins[s]} for s in sorted(bins)]


def in_flight_at(records: list[Rec], t: float) -> list[Rec]:
    return [r for r in records if r.start < t and (r.end is None or r.end > t)]


def first_time(samples: list[dict[str, Any]], after: float, pred: Callable[[dict[str, Any]], bool]) -> float | None:
    for s in samples:
        if s["t"] >= after and pred(s):
            return s["t"]
    return None


def routed_to(sample: dict[str, Any], pod: str) -> int | None:
    values = [r["routed"].get(pod, 0) for r in sample["routers"].values() if r is not None]
    return sum(values) if len(values) == len(sample["routers"]) else None


def analyse(sc: Scenario, ctx: Ctx, samples: list[dict[str, Any]]) -> dict[str, Any]:
    records = ctx.load.records
    fault = ctx.events[0][0] if ctx.events else ctx.settings.fault_at
    outcomes = Counter(r.outcome for r in records)
    kinds = Counter(r.kind for r in records if r.outcome == "failed")
    rec_s, last_bad = recovery(records, fault)
    row: dict[str, Any] = {
        "scenario": sc.name, "fault": sc.fault, "fault_at_s": round(fault, 3),
        "started": len(records), "ok": outcomes["ok"], "late": outcomes["late"],
        "completed": outcomes["ok"] + outcomes["late"], "failed": outcomes["failed"] + outcomes["pending"],
        "failure_kinds": dict(kinds.most_common()),
        "recovery_s": rec_s, "last_not_ok_after_fault_s": last_bad,
        "in_flight_at_fault": len(in_flight_at(records, fault)),
        "events": [{"t": t, "what": w} for t, w in sorted(ctx.events)],
        "per_second": per_second(records, fault),
        "failures": [{"start_s": round(r.start - fault, 3), "kind": r.kind, "pod": r.pod, "tokens": r.tokens,
                      "expected": r.expected, "end_s": None if r.end is None else round(r.end - fault, 3)}
                     for r in records if r.outcome != "ok"][:300],
        **ctx.info,
    }
    notes: list[str] = []
    if sc.expect_zero_failures and row["failed"]:
        notes.append(f"EXPECTED ZERO FAILURES, got {row['failed']}")
    analysis = ANALYSES.get(sc.name.removesuffix("-retry").removesuffix("-drain"))
    if analysis is not None:
        analysis(ctx, samples, fault, row, notes)
    row["notes"] = notes
    row["timeline"] = samples
    return row


def _router_notes(ctx: Ctx, samples: list[dict[str, Any]], fault: float, row: dict[str, Any],
                  notes: list[str]) -> None:
    records = ctx.load.records
    healthy = "cluster.extproc.membership_healthy"
    full = ctx.settings.replicas
    out = first_time(samples, fault, lambda s: s["envoy"].get(healthy, full) < full)
    back = first_time(samples, out if out is not None else fault,
                      lambda s: s["envoy"].get(healthy, 0) == full) if out is not None else None
    row["envoy_dropped_router_s"] = None if out is None else round(out - fault, 2)
    row["envoy_readmitted_router_s"] = None if back is None else round(back - fault, 2)
    flying = in_flight_at(records, fault)
    row["in_flight_at_fault_completed"] = sum(r.outcome != "failed" for r in flying)
    notes.append(f"{sum(r.outcome != 'failed' for r in flying)}/{len(flying)} streams in flight at the fault completed")
    if out is not None:
        notes.append(f"Envoy's health check dropped the replica at +{out - fault:.1f} s"
                     + (f", took it back at +{back - fault:.1f} s" if back is not None else ""))
    before = next((s["envoy"] for s in reversed(samples) if s["t"] <= fault and s["envoy"]), {})
    after = next((s["envoy"] for s in reversed(samples) if s["envoy"]), {})
    key = "cluster.extproc.upstream_cx_connect_fail"
    if key in after:
        row["extproc_connect_failures"] = after[key] - before.get(key, 0)
        notes.append(f"Envoy: {row['extproc_connect_failures']} refused connections to the ext_proc cluster "
                     "after the fault")
    routing = row["failure_kinds"].get("503 routing_unavailable", 0)
    if routing:
        bad = [f["start_s"] for f in row["failures"] if f["kind"] == "503 routing_unavailable"]
        notes.append(f"{routing} got 503 routing_unavailable (started +{min(bad):.2f}..+{max(bad):.2f} s)")


def _redis_notes(ctx: Ctx, samples: list[dict[str, Any]], fault: float, row: dict[str, Any],
                 notes: list[str]) -> None:
    restarted = next((t for t, w in ctx.events if w.startswith("redis restarted")), None)
    names = [r.name for r in ctx.stack.routers]

    def entries(s: dict[str, Any]) -> list[int] | None:
        vals = [(s["routers"].get(n) or {}).get("index_entries") for n in names]
        return None if any(v is None for v in vals) else vals

    def gap(s: dict[str, Any]) -> float | None:
        vals = entries(s)
        if not vals:
            return None
        return (max(vals) - min(vals)) / max(100, max(vals))

    before = [g for s in samples if fault - 2 <= s["t"] < fault and (g := gap(s)) is not None]
    during = [g for s in samples if fault <= s["t"] and (g := gap(s)) is not None]
    tol = max(0.01, 2 * max(before, default=0.0))
    row["index_gap_before_max"] = round(max(before, default=0.0), 4)
    row["index_gap_peak"] = round(max(during, default=0.0), 4)
    row["convergence_tolerance"] = round(tol, 4)
    converged = None
    if restarted is not None:
        after = [s for s in samples if s["t"] >= restarted]
        for i, s in enumerate(after):
            if all((g := gap(x)) is not None and g <= tol for x in after[i:]):
                converged = s["t"]
                break
    row["index_converged_after_restart_s"] = None if converged is None or restarted is None \
        else round(converged - restarted, 2)
    reconnected = first_time(samples, restarted or fault, lambda s: all(
        (s["routers"].get(n) or {}).get("sync_connected") == 1 for n in names)) if restarted else None
    synced = first_time(samples, restarted or fault, lambda s: all(
        (s["routers"].get(n) or {}).get("sync_synced") == 1 for n in names)) if restarted else None
    row["statesync_reconnected_after_restart_s"] = None if reconnected is None else round(reconnected - restarted, 2)
    row["statesync_synced_after_restart_s"] = None if synced is None else round(synced - restarted, 2)
    last = samples[-1]["routers"] if samples else {}
    row["resyncs"] = {n: (last.get(n) or {}).get("resyncs") for n in names}
    row["index_entries_end"] = {n: (last.get(n) or {}).get("index_entries") for n in names}
    notes.append(f"index entries of the 2 replicas: gap {100 * row['index_gap_before_max']:.1f}% before, "
                 f"peak {100 * row['index_gap_peak']:.1f}% after the kill")
    if converged is not None and restarted is not None:
        notes.append(f"converged again (gap <= {100 * tol:.1f}%) {converged - restarted:.1f} s after the restart")
    else:
        notes.append("replica indexes did NOT converge again before the end")
    if reconnected is not None and restarted is not None:
        notes.append(f"both replicas' statesync reconnected {reconnected - restarted:.1f} s after the restart")
    outage = [s for s in samples if restarted is not None and fault < s["t"] < restarted]
    row["synced_gauge_during_outage"] = sorted({(s["routers"].get(n) or {}).get("sync_synced") for s in outage
                                                for n in names} - {None})


def _pod_notes(ctx: Ctx, samples: list[dict[str, Any]], fault: float, row: dict[str, Any],
               notes: list[str]) -> None:
    records, pod = ctx.load.records, ctx.info["pod"]
    flying = [r for r in in_flight_at(records, fault) if r.pod == pod]
    flying_other = [r for r in in_flight_at(records, fault) if r.pod != pod]
    row["in_flight_on_pod"] = len(flying)
    row["in_flight_on_pod_outcomes"] = dict(Counter(r.kind if r.outcome == "failed" else r.outcome for r in flying))
    row["in_flight_elsewhere_failed"] = sum(r.outcome == "failed" for r in flying_other)
    # Removal: the first sample from which every router reports the pod not ready.
    removed = first_time(samples, fault, lambda s: all(
        r is not None and r["ready_pods"].get(pod, 1) == 0 for r in s["routers"].values()))
    row["pod_removed_by_all_routers_s"] = None if removed is None else round(removed - fault, 2)
    # The routers' own count: from a scrape 0.2 s before the fault to the first scrape after the removal
    # (it also counts what was routed in those 0.2 s, before the fault).
    after_removal = first_time(samples, removed or fault, lambda s: True) if removed is not None else None
    at_removal = next((s for s in samples if s["t"] == after_removal), None)
    routed_before = ctx.info.get("routed_to_pod_at_fault")
    routed_after = routed_to(at_removal, pod) if at_removal else None
    if routed_before is not None and routed_after is not None:
        row["routed_to_pod_after_fault"] = routed_after - routed_before
    resumed = ctx.info.get("resumed_at") or ctx.info.get("pod_restarted_at")
    new_to_pod = [r for r in records if r.start >= fault and r.pod == pod and (resumed is None or r.start < resumed)]
    row["new_requests_on_pod_client_view"] = dict(Counter(r.kind if r.outcome == "failed" else r.outcome
                                                          for r in new_to_pod))
    env_end = samples[-1]["envoy"] if samples else {}
    row["envoy"] = {k.rsplit(".", 1)[-1]: v for k, v in env_end.items() if k.startswith("cluster.model_pods")}
    notes.append(f"{len(flying)} streams in flight on {pod}: "
                 + ", ".join(f"{n} {k}" for k, n in row["in_flight_on_pod_outcomes"].items()))
    if row["in_flight_elsewhere_failed"]:
        notes.append(f"{row['in_flight_elsewhere_failed']} streams on other pods failed too")
    if removed is not None:
        notes.append(f"every router stopped routing to it by +{removed - fault:.1f} s")
    new_view = row["new_requests_on_pod_client_view"]
    notes.append(f"{sum(new_view.values())} new requests went to it after the fault ("
                 + (", ".join(f"{n} {k}" for k, n in new_view.items()) or "none") + ")"
                 + (f"; the routers counted {row['routed_to_pod_after_fault']} routed to it from 0.2 s before "
                    "the fault to its removal" if "routed_to_pod_after_fault" in row else ""))
    if ctx.stack.pod_retry_policy is not None:
        notes.append(f"Envoy retries: {row['envoy'].get('upstream_rq_retry', 0)}, succeeded "
                     f"{row['envoy'].get('upstream_rq_retry_success', 0)}, gave up "
                     f"{row['envoy'].get('upstream_rq_retry_limit_exceeded', 0)} (same address each time)")
    failed_here = [r for r in flying + new_to_pod if r.outcome == "failed" and r.end is not None]
    if failed_here:
        by_kind: dict[str, list[float]] = {}
        for r in failed_here:
            by_kind.setdefault(r.kind, []).append(r.end - fault)
        row["pod_failures_seen_at_s"] = {k: [round(min(v), 2), round(max(v), 2)] for k, v in by_kind.items()}
        notes.append("clients saw " + ", ".join(f"{k} at +{min(v):.1f}..+{max(v):.1f} s" for k, v in by_kind.items()))
    if resumed is not None:
        back = next((r for r in records if r.start >= resumed and r.pod == pod and r.outcome == "ok"), None)
        if back is not None:
            row["pod_back_in_rotation_s"] = round(back.start - resumed, 2)
            notes.append(f"back in rotation {back.start - resumed:.1f} s after "
                         + ("SIGCONT" if "resumed_at" in ctx.info else "its restart"))
    if "resumed_at" in ctx.info:
        stalled = [r for r in flying if r.outcome == "late"]
        if stalled:
            notes.append(f"in-flight streams stalled {min(r.max_gap for r in stalled):.1f}-"
                         f"{max(r.max_gap for r in stalled):.1f} s, then finished after SIGCONT")


def _envoy_notes(ctx: Ctx, samples: list[dict[str, Any]], fault: float, row: dict[str, Any],
                 notes: list[str]) -> None:
    records = ctx.load.records
    flying = in_flight_at(records, fault)
    notes.append(f"{sum(r.outcome != 'failed' for r in flying)}/{len(flying)} streams in flight at the fault "
                 "completed")
    if row["failed"]:
        bad = [f["start_s"] for f in row["failures"] if f["kind"] != "ok"]
        notes.append(f"failures started +{min(bad):.2f}..+{max(bad):.2f} s: "
                     + ", ".join(f"{n} {k}" for k, n in row["failure_kinds"].items()))
    if "old_stopped_at" in ctx.info:
        gap = ctx.info["new_ready_at"] - ctx.info["old_stopped_at"]
        row["port_closed_s"] = round(ctx.info["new_ready_at"] - (fault + ctx.settings.envoy_drain_time_s), 2)
        notes.append(f"listener closed from the end of the drain time to the new Envoy's start: "
                     f"{row['port_closed_s']:.1f} s (of which stop->ready {gap:.2f} s)")
    if "handover_steps_s" in ctx.info:
        st = ctx.info["handover_steps_s"]
        notes.append(f"new Envoy ready {st['new_ready_s']:.2f} s after the start, old one idle and stopped at "
                     f"+{st['old_stopped_s']:.1f} s")


ANALYSES: dict[str, Callable[..., None]] = {
    "router-kill9": _router_notes, "router-sigterm": _router_notes, "redis-restart": _redis_notes,
    "pod-kill9": _pod_notes, "pod-hang": _pod_notes, "pod-hang-timeout": _pod_notes, "envoy-handover": _envoy_notes,
    "envoy-restart-gap": _envoy_notes,
}


# -------------------------------------------------------------------------------------- progress


class Progress:
    """One live status line (rich when on a terminal), else a plain line every few seconds."""

    def __init__(self) -> None:
        self.live = None
        if sys.stdout.isatty():
            with contextlib.suppress(ImportError):
                from rich.live import Live
                self.live = Live("", refresh_per_second=4, transient=True)
        self._last_print = 0.0

    def __enter__(self) -> Progress:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def update(self, text: str) -> None:
        if self.live is not None:
            self.live.update(text)
        elif time.monotonic() - self._last_print >= 5:
            self._last_print = time.monotonic()
            print("   " + text, flush=True)


async def watch(load: Load, label: str, progress: Progress, stop: asyncio.Event, ctx: Ctx | None = None) -> None:
    while not stop.is_set():
        c = load.counts
        event = f" | last event: {ctx.events[-1][1]}" if ctx and ctx.events else ""
        progress.update(f"{label}: t={load.clock():5.1f}s started {load.started} in flight {load.in_flight} "
                        f"ok {c['ok']} late {c['late']} failed {c['failed']}{event}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)


# -------------------------------------------------------------------------------------------- chaos


async def run_scenario(sc: Scenario, settings: Settings, run_dir: Path, progress: Progress) -> dict[str, Any]:
    stack = make_stack(settings, run_dir, router_args=list(sc.router_args), envoy_args=list(sc.envoy_args),
                       retry=sc.retry, values=sc.values)
    await asyncio.to_thread(stack.start)
    try:
        prompts = Prompts(settings.seed)
        load = Load(stack.url, settings.rate, settings.duration, prompts, settings)
        ctx = Ctx(stack, load, settings)
        monitor = Monitor(stack, load)
        stop = asyncio.Event()
        load_task = load.begin()
        helpers = [asyncio.create_task(monitor.run(stop)), asyncio.create_task(watch(load, sc.name, progress, stop,
                                                                                      ctx))]
        inject = asyncio.create_task(sc.inject(ctx))
        try:
            await load_task
            await asyncio.wait_for(inject, 60)
        finally:
            stop.set()
            for t in (inject, load_task):
                t.cancel()
            await asyncio.gather(*helpers, inject, load_task, return_exceptions=True)
        return analyse(sc, ctx, monitor.samples)
    finally:
        await asyncio.to_thread(stack.stop)


def fmt_recovery(row: dict[str, Any]) -> str:
    if row["recovery_s"] is None:
        return "not recovered"
    return f"{row['recovery_s']} s"


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    out = []
    for r in rows:
        completed = f"{r['completed']}" + (f" ({r['late']} late)" if r["late"] else "")
        failed = str(r["failed"]) + (" (" + ", ".join(f"{n} {k}" for k, n in r["failure_kinds"].items()) + ")"
                                     if r["failed"] else "")
        out.append([r["fault"], str(r["started"]), completed, failed, fmt_recovery(r), "; ".join(r["notes"])])
    return out


HEADERS = ["fault", "started", "completed", "failed", "recovery", "notes"]


def print_table(rows: list[dict[str, Any]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for row in table_rows(rows):
            print(" | ".join(row))
        return
    table = Table(title="chaos: one fault at a time under streaming load", show_lines=True)
    for h in HEADERS:
        table.add_column(h, overflow="fold")
    for row in table_rows(rows):
        table.add_row(*row)
    Console(width=max(160, _columns())).print(table)


def _columns() -> int:
    with contextlib.suppress(OSError):
        return os.get_terminal_size().columns
    return 160


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in table_rows(rows)]
    return "\n".join(lines)


async def chaos(args: argparse.Namespace, settings: Settings) -> int:
    chosen = [s for s in scenarios(settings) if not args.scenario or s.name in args.scenario]
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    with Progress() as progress:
        for i, sc in enumerate(chosen, 1):
            print(f"== [{i}/{len(chosen)}] {sc.name}: {sc.fault}", flush=True)
            row = await run_scenario(sc, settings, RUNS / "chaos-run" / sc.name, progress)
            rows.append(row)
            print(f"   started {row['started']}, completed {row['completed']} ({row['late']} late), failed "
                  f"{row['failed']} {row['failure_kinds'] or ''}, recovery {fmt_recovery(row)}", flush=True)
            for note in row["notes"]:
                print(f"   - {note}", flush=True)
    print_table(rows)
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": _git_commit(), "machine": _machine(),
        "settings": asdict(settings),
        "definitions": {
            "ok": "HTTP 200, every token asked for (max_tokens), then [DONE]",
            "late": f"complete, but a wait of >= {settings.stall_threshold:g} s for the first byte or between chunks",
            "failed": "anything else: HTTP error status (with the error code), cut (200 stream ended before "
                      "[DONE]), connect (refused), disconnected (closed before a response), timeout",
            "recovery_s": "smallest whole s >= 0 such that every request started at fault + s or later was ok; "
                          "null when the last second's requests still were not",
        },
        "scenarios": rows,
        "markdown": markdown(rows),
        "runtime_s": round(time.monotonic() - started, 1),
    }
    out = args.out or RESULTS / "chaos.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\n{report['markdown']}\n\nwrote {_rel(out)} in {report['runtime_s'] / 60:.1f} min", flush=True)
    return 0


# --------------------------------------------------------------------------------------------- soak


def proc_status(pid: int | None) -> dict[str, int] | None:
    """RSS (KiB) and open fds of a process, from /proc; None if it is gone."""
    if pid is None:
        return None
    try:
        rss = 0
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                    break
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    return {"rss_kib": rss, "fds": fds}


def redis_used_memory(port: int) -> int | None:
    data = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"INFO memory\r\n")
            while True:  # one bulk string: $<length>\r\n<payload>\r\n
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                head, sep, rest = data.partition(b"\r\n")
                if sep and head.startswith(b"$") and len(rest) >= int(head[1:]) + 2:
                    break
    except (OSError, ValueError):
        return None
    m = re.search(rb"used_memory:(\d+)", data)
    return int(m.group(1)) if m else None


def slope(points: list[tuple[float, float]]) -> tuple[float, float | None] | None:
    """Least-squares slope of y over x and its standard error (None with fewer than 3 points)."""
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    if n < 3:
        return b, None
    residuals = sum((y - my - b * (x - mx)) ** 2 for x, y in points)
    return b, math.sqrt(residuals / (n - 2) / sxx)


async def soak(args: argparse.Namespace, settings: Settings) -> int:
    minutes = args.soak
    rate = args.rate if args.rate is not None else 10.0
    router_env = {"AIBRIX_PREFIX_CACHE_EVICTION_DURATION_MINS": str(args.soak_index_ttl_mins),
                  "EXTPROC_ROUTER_STATESYNC_STREAM_MAXLEN": str(args.soak_stream_maxlen)}
    if args.soak_index_capacity:
        router_env["AIBRIX_PREFIX_CACHE_BLOCK_NUMBER"] = str(args.soak_index_capacity)
    stack = make_stack(settings, RUNS / "soak-run", router_env=router_env)
    samples: list[dict[str, Any]] = []
    started = time.monotonic()
    load = Load("", rate, minutes * 60.0, Prompts(settings.seed, groups=40, fresh_share=0.5), settings,
                keep_records=False)
    await asyncio.to_thread(stack.start)
    try:
        load.url = stack.url + CHAT_PATH
        assert stack.redis_port is not None
        stop = asyncio.Event()
        load_task = load.begin()

        async def sampler() -> None:
            async with aiohttp.ClientSession() as session:
                n = 0
                while True:
                    t = load.clock()
                    sample: dict[str, Any] = {"minute": round(t / 60, 3), "routers": {}, "ok": load.counts["ok"],
                                              "late": load.counts["late"], "failed": load.counts["failed"],
                                              "started": load.started}
                    for spec in stack.routers:
                        st = proc_status(stack.pid(spec.name)) or {}
                        m = await router_sample(session, spec.http_url) or {}
                        sample["routers"][spec.name] = {**st, "index_entries": m.get("index_entries"),
                                                        "pid": stack.pid(spec.name)}
                    sample["envoy"] = proc_status(stack.pid("envoy"))
                    sample["redis_used_memory"] = await asyncio.to_thread(redis_used_memory, stack.redis_port)
                    samples.append(sample)
                    r = sample["routers"]
                    print(f"   soak minute {sample['minute']:5.1f}: started {load.started} ok {load.counts['ok']} "
                          f"late {load.counts['late']} failed {load.counts['failed']} | "
                          + " | ".join(f"{k} RSS {v.get('rss_kib', 0) / 1024:.1f} MiB fds {v.get('fds')} "
                                       f"index {v.get('index_entries')}" for k, v in r.items())
                          + f" | redis {(sample['redis_used_memory'] or 0) / 1e6:.2f} MB", flush=True)
                    n += 1
                    next_at = n * args.sample_interval
                    if next_at > minutes * 60.0 + 0.5:
                        return
                    delay = next_at - load.clock()
                    if delay > 0:
                        try:
                            await asyncio.wait_for(stop.wait(), delay)
                            return
                        except TimeoutError:
                            pass

        sampling = asyncio.create_task(sampler())
        try:
            await load_task
            await sampling
        finally:
            stop.set()
            for t in (load_task, sampling):
                t.cancel()
            await asyncio.gather(load_task, sampling, return_exceptions=True)
        restarts = {r.name: stack.supervisor.restarts(r.name) for r in stack.routers} if stack.supervisor else {}
    finally:
        await asyncio.to_thread(stack.stop)
    report = soak_report(samples, args, settings, rate, minutes, load, restarts, time.monotonic() - started)
    out = args.out or RESULTS / "soak.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print_soak(report)
    png = out.with_suffix(".png")
    if soak_plot(samples, png):
        print(f"plot: {_rel(png)}")
    print(f"wrote {_rel(out)}", flush=True)
    return 0


def soak_series(samples: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    series: dict[str, list[tuple[float, float]]] = {}

    def add(key: str, x: float, y: float | None) -> None:
        if y is not None:
            series.setdefault(key, []).append((x, float(y)))

    for s in samples:
        x = s["minute"]
        for name, r in s["routers"].items():
            add(f"{name} RSS (KiB)", x, r.get("rss_kib"))
            add(f"{name} open fds", x, r.get("fds"))
            add(f"{name} index entries", x, r.get("index_entries"))
        add("Redis used_memory (bytes)", x, s.get("redis_used_memory"))
        if s.get("envoy"):
            add("Envoy RSS (KiB)", x, s["envoy"].get("rss_kib"))
            add("Envoy open fds", x, s["envoy"].get("fds"))
    return series


def soak_report(samples: list[dict[str, Any]], args: argparse.Namespace, settings: Settings, rate: float,
                minutes: float, load: Load, restarts: dict[str, int], runtime: float) -> dict[str, Any]:
    slopes = {}
    for key, points in soak_series(samples).items():
        used = [(x, y) for x, y in points if x >= args.warmup - 1e-6]
        fit = slope(used)
        sl, se = fit if fit is not None else (None, None)
        mean = sum(y for _, y in used) / len(used) if used else None
        slopes[key] = {
            "slope_per_min": None if sl is None else round(sl, 3),
            "slope_stderr_per_min": None if se is None else round(se, 3),
            "slope_pct_of_mean_per_hour": None if sl is None or not mean else round(100 * sl * 60 / mean, 2),
            "first_after_warmup": used[0][1] if used else None, "last": used[-1][1] if used else None,
            "min": min((y for _, y in used), default=None), "max": max((y for _, y in used), default=None),
            "samples": len(used),
        }
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": _git_commit(), "machine": _machine(),
        "settings": {**asdict(settings), "rate": rate, "minutes": minutes, "warmup_min": args.warmup,
                     "sample_interval_s": args.sample_interval, "index_ttl_mins": args.soak_index_ttl_mins,
                     "statesync_stream_maxlen": args.soak_stream_maxlen, "prompt_pool": 40, "fresh_share": 0.5,
                     "index_capacity": args.soak_index_capacity or "router default (200000)"},
        "requests": {"started": load.started, **dict(load.counts), "failure_kinds":
                     {k: v for k, v in load.kinds.items() if k != "ok"}},
        "router_restarts": restarts,
        "slopes": slopes,
        "samples": samples,
        "runtime_s": round(runtime, 1),
    }


def print_soak(report: dict[str, Any]) -> None:
    req = report["requests"]
    print(f"\nsoak: {report['settings']['minutes']:g} min at {report['settings']['rate']:g} req/s: started "
          f"{req['started']}, ok {req.get('ok', 0)}, late {req.get('late', 0)}, failed {req.get('failed', 0)} "
          f"{req['failure_kinds'] or ''}; router restarts {report['router_restarts']}")
    print(f"slopes over the samples after minute {report['settings']['warmup_min']:g} (least squares):")
    print(f"{'series':<30} {'after warm-up':>14} {'last':>12} {'slope / min':>12} {'std. error':>11} "
          f"{'% of mean / h':>14}")
    for key, s in report["slopes"].items():
        print(f"{key:<30} {s['first_after_warmup']!s:>14} {s['last']!s:>12} {s['slope_per_min']!s:>12} "
              f"{s['slope_stderr_per_min']!s:>11} {s['slope_pct_of_mean_per_hour']!s:>14}")


def soak_plot(samples: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    series = soak_series(samples)
    panels = [("RSS (MiB)", " RSS (KiB)", 1 / 1024), ("open fds", " open fds", 1),
              ("prefix index entries", " index entries", 1), ("Redis used_memory (MB)", "Redis used_memory", 1e-6)]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (title, suffix, scale) in zip(axes.flat, panels, strict=True):
        for key, points in series.items():
            if suffix in key or key.startswith(suffix):
                label = key.replace(suffix, "").strip()
                ax.plot([x for x, _ in points], [y * scale for _, y in points], marker="o", ms=3,
                        label=label if label and not label.startswith("(") else key.split()[0])
        ax.set_title(title)
        ax.set_xlabel("minute")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------- main


def _git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    return None


def _machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def _rel(path: Path) -> str:
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(ROOT))
    return path.name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [s.name for s in scenarios(Settings())]
    p.add_argument("--scenario", action="append", choices=names, help="run only this scenario (repeatable)")
    p.add_argument("--quick", action="store_true", help="12 s of load per scenario, fault at 3 s, 6 s hang")
    p.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second (chaos 20, soak 10)")
    p.add_argument("--duration", type=float, default=None, help="seconds of load per scenario (30)")
    p.add_argument("--fault-at", type=float, default=None, help="seconds into the load (5)")
    p.add_argument("--hang", type=float, default=None, help="pod-hang: seconds between SIGSTOP and SIGCONT (15)")
    p.add_argument("--stall-threshold", type=float, default=1.0,
                   help="a complete request that waited this long for a byte is late, not ok")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--soak", type=float, nargs="?", const=20.0, default=None, metavar="MINUTES",
                   help="run the soak instead of the chaos scenarios (default 20 minutes)")
    p.add_argument("--sample-interval", type=float, default=60.0, help="soak: seconds between samples")
    p.add_argument("--warmup", type=float, default=1.0, help="soak: minutes left out of the slopes")
    p.add_argument("--soak-index-ttl-mins", type=float, default=1.0,
                   help="soak: the routers' prefix index TTL (AIBRIX_PREFIX_CACHE_EVICTION_DURATION_MINS)")
    p.add_argument("--soak-stream-maxlen", type=int, default=500,
                   help="soak: the statesync stream length (EXTPROC_ROUTER_STATESYNC_STREAM_MAXLEN)")
    p.add_argument("--soak-index-capacity", type=int, default=None, metavar="ENTRIES",
                   help="soak: the routers' prefix index capacity (AIBRIX_PREFIX_CACHE_BLOCK_NUMBER; default: "
                   "the router's, 200000). Its arrays are allocated up front but become resident page by page "
                   "as they are first written, so RSS grows until they all are (~8 MB at 200000)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON report (default bench/results/chaos.json, or soak.json with --soak)")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    s = Settings(seed=args.seed, stall_threshold=args.stall_threshold)
    if args.quick:
        s.duration, s.fault_at, s.hang_s, s.pod_restart_after = 12.0, 3.0, 6.0, 5.0
    if args.rate is not None:
        s.rate = args.rate
    if args.duration is not None:
        s.duration = args.duration
    if args.fault_at is not None:
        s.fault_at = args.fault_at
    if args.hang is not None:
        s.hang_s = args.hang
    STALL[0] = s.stall_threshold
    return s


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="   %(name)s: %(message)s")
    settings = settings_from(args)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # stop every process we started on the way out
    try:
        return asyncio.run(soak(args, settings) if args.soak is not None else chaos(args, settings))
    except KeyboardInterrupt:
        print("interrupted: stopping every process this run started", flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for stack in LIVE_STACKS:
            stack.stop()  # idempotent: processes already stopped are skipped


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
