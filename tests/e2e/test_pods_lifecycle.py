"""Pods going away and coming in: health checks and pod-file reloads, through the real stack."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
import yaml

from extproc_router.stack import LocalStack, PodSpec, free_port
from tests.conftest import CHAT, running_stack


async def served_by(stack: LocalStack, n: int) -> Counter:
    async with aiohttp.ClientSession() as s:
        async def one() -> tuple[int, str]:
            async with s.post(stack.url + "/v1/chat/completions", json=CHAT) as resp:
                await resp.read()
                return resp.status, resp.headers.get("target-pod", "")
        results = await asyncio.gather(*(one() for _ in range(n)))
    return Counter(pod if status == 200 else f"status-{status}" for status, pod in results)


@pytest.fixture
def lifecycle_stack(tmp_path: Path):
    with running_stack(tmp_path, ttft_ms=1.0, itl_ms=1.0, health_interval=0.2) as s:
        yield s


async def test_killed_pod_stops_receiving_requests(lifecycle_stack: LocalStack) -> None:
    stack = lifecycle_stack
    assert len(await served_by(stack, 30)) == 3
    victim = stack.pods[0].name
    stack.kill(victim)
    await asyncio.sleep(0.6)  # > health interval + probe timeout path (connection refused is immediate)
    after = await served_by(stack, 60)
    assert victim not in after
    assert set(after) == {stack.pods[1].name, stack.pods[2].name}, after


async def test_pod_file_reload_adds_and_removes_pods(lifecycle_stack: LocalStack) -> None:
    stack = lifecycle_stack
    new = PodSpec(name="demo-model-new", model="demo-model", port=free_port())
    stack.start_pod(new)
    doc = yaml.safe_load(stack.pod_file.read_text())
    doc["models"]["demo-model"]["pods"] = [
        {"name": new.name, "address": f"127.0.0.1:{new.port}"}]
    doc["models"]["second-model"] = {"pods": [{"name": "second-0", "address": f"127.0.0.1:{stack.pods[0].port}"}]}
    tmp = stack.pod_file.with_suffix(".new")
    tmp.write_text(yaml.safe_dump(doc))
    tmp.replace(stack.pod_file)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        seen = await served_by(stack, 10)
        if set(seen) == {new.name}:
            break
        await asyncio.sleep(0.2)
    assert set(seen) == {new.name}
    async with aiohttp.ClientSession() as s, s.get(stack.url + "/v1/models") as resp:
        assert sorted(m["id"] for m in (await resp.json())["data"]) == ["demo-model", "second-model"]


async def test_broken_pod_file_keeps_serving(lifecycle_stack: LocalStack) -> None:
    stack = lifecycle_stack
    stack.pod_file.write_text("models: [this is: not valid")
    await asyncio.sleep(1.5)
    assert len(await served_by(stack, 30)) == 3
    assert "reload failed" in (Path(stack.opts.run_dir) / "router.log").read_text()
