"""What the simulator's tests share: in-process sims (the ``start`` fixture) and small HTTP probes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from extproc_router.simulator.server import SimServer
from tests.conftest import running_sims

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
BLOCK = 16

FAST_MODEL: dict[str, Any] = {
    "timing": "model",
    "tokenizer": "bytes",
    "block_size": BLOCK,
    "decode_step_ms": 2.0,
    "decode_ms_per_seq": 0.0,
    "prefill_tokens_per_s": 20000.0,
    "kv_transfer_ms_per_1k_tokens": 3.0,
}
"""Model timing for tests: one token per byte, 2 ms steps; 1000 prompt tokens take 50 ms of prefill
or 3 ms of transfer."""

StartSim = Callable[..., Awaitable[SimServer]]


@pytest.fixture
def sim_defaults() -> dict[str, Any]:
    """The SimConfig fields of every sim that ``start`` starts; a test module overrides this fixture to change them."""
    return FAST_MODEL


@pytest.fixture
async def start(sim_defaults: dict[str, Any]) -> AsyncIterator[StartSim]:
    """Start in-process sims on free ports (``sim_defaults`` plus overrides); all are stopped after the test."""
    async with running_sims(sim_defaults) as starter:
        yield starter


async def stats(http: aiohttp.ClientSession, sim: SimServer) -> dict[str, Any]:
    """The pod's ``GET /sim/stats`` answer."""
    async with http.get(sim.url + "/sim/stats") as resp:
        return await resp.json()


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout: float = 2.0) -> None:
    """Wait until ``predicate()`` holds (effects that happen in the background, such as a release notification)."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)
