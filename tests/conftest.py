"""Shared fixtures and helpers: the real local stack (Envoy + router + simulated pods) on free ports,
a real redis-server, in-process simulated pods."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest

from extproc_router.stack import LocalStack, StackOptions, free_port

# A minimal chat request for the stack's model (`demo-model`).
CHAT = {"model": "demo-model", "messages": [{"role": "user", "content": "Hello!"}]}


def start_stack(tmp: Path, **kw: object) -> LocalStack:
    opts = StackOptions.on_free_ports(run_dir=str(tmp), **kw)
    stack = LocalStack(opts)
    stack.start()
    return stack


@contextmanager
def running_stack(tmp: Path, **kw: object) -> Iterator[LocalStack]:
    """`start_stack`, stopped again on exit."""
    s = start_stack(tmp, **kw)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """A stack shared by a module's tests: 3 pods of demo-model, TTFT 20 ms, ITL 10 ms."""
    with running_stack(tmp_path_factory.mktemp("stack"), ttft_ms=20.0, itl_ms=10.0, health_interval=0.2) as s:
        yield s


def content_tokens(payloads: list[bytes]) -> int:
    """How many content tokens a stream's `data:` payloads carried (the `[DONE]` marker aside)."""
    count = 0
    for p in payloads:
        if p == b"[DONE]":
            continue
        for choice in orjson.loads(p).get("choices") or ():
            if (choice.get("delta") or {}).get("content"):
                count += 1
    return count


def start_redis(port: int, directory: Path) -> subprocess.Popen:
    """A redis-server on loopback `port`, in memory only, answering PING (the binary comes from `make test`'s
    install step)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: run `make test` (it installs it) or scripts/install-redis.sh")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("redis-server did not start")
        time.sleep(0.05)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[tuple[str, int, subprocess.Popen]]:
    """A real redis-server on a free loopback port."""
    port = free_port()
    proc = start_redis(port, tmp_path)
    try:
        yield "127.0.0.1", port, proc
    finally:
        proc.terminate()
        proc.wait(5)


def chain(seed: int, n: int = 32) -> np.ndarray:
    """A chain of `n` distinct nonzero uint64 hashes, including values above 2**63 (statesync's tests)."""
    rng = np.random.default_rng(seed)
    return rng.integers(1, 2**63, size=n, dtype=np.int64).astype(np.uint64) | np.uint64(1 << 63)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for tests that talk to in-process servers."""
    async with aiohttp.ClientSession() as session:
        yield session


@asynccontextmanager
async def running_sims(defaults: dict[str, Any]) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """A starter of in-process simulated pods (`defaults` plus per-call overrides); all stopped on exit."""
    from extproc_router.simulator.server import SimConfig, SimServer, start_sim

    servers: list[SimServer] = []

    async def _start(**overrides: Any) -> SimServer:
        server = await start_sim(SimConfig(**{**defaults, **overrides}))
        servers.append(server)
        return server

    try:
        yield _start
    finally:
        for server in servers:
            await server.stop()
