"""Shared fixtures: the real local stack (Envoy + router + simulated pods) on free ports."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from extproc_router.stack import LocalStack, StackOptions, free_port


def start_stack(tmp: Path, **kw: object) -> LocalStack:
    opts = StackOptions.on_free_ports(run_dir=str(tmp), **kw)
    stack = LocalStack(opts)
    stack.start()
    return stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """A stack shared by a module's tests: 3 pods of demo-model, TTFT 20 ms, ITL 10 ms."""
    s = start_stack(tmp_path_factory.mktemp("stack"), ttft_ms=20.0, itl_ms=10.0, health_interval=0.2)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[tuple[str, int, subprocess.Popen]]:
    """A real redis-server on a free loopback port (the binary comes from `make test`'s install step)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed: run `make test` (it installs it) or scripts/install-redis.sh")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("redis-server did not start")
        time.sleep(0.05)
    try:
        yield "127.0.0.1", port, proc
    finally:
        proc.terminate()
        proc.wait(5)


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
