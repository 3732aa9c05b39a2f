"""The local stack's fault helpers (bench/chaos.py drives them): freezing a pod, handing Envoy's
listener over to a new Envoy without refusing a connection, and stopping a stack with a frozen process."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from extproc_router.stack import LocalStack
from tests.conftest import content_tokens, running_stack

TOKENS = 40
QUICK = {"model": "demo-model", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
DRAIN = ["--drain-time-s", "1", "--drain-strategy", "immediate"]


async def stream(session: aiohttp.ClientSession, stack: LocalStack, first: asyncio.Event) -> tuple[int, list[bytes]]:
    body = {"model": "demo-model", "stream": True, "max_tokens": TOKENS,
            "messages": [{"role": "user", "content": "Tell me a story."}]}
    async with session.post(stack.url + "/v1/chat/completions", json=body) as resp:
        payloads: list[bytes] = []
        async for line in resp.content:
            if line.startswith(b"data: "):
                payloads.append(line[6:].strip())
                first.set()
        return resp.status, payloads


async def quick_status(session: aiohttp.ClientSession, stack: LocalStack, timeout: float = 5.0) -> int | str:
    try:
        async with session.post(stack.url + "/v1/chat/completions", json=QUICK,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            await resp.read()
            return resp.status
    except TimeoutError:
        return "timeout"


async def test_pause_freezes_a_pod_and_resume_thaws_it(tmp_path: Path) -> None:
    with running_stack(tmp_path, pods=1, ttft_ms=5.0, itl_ms=1.0) as stack:
        pod = stack.pods[0].name
        pid = stack.pid(pod)
        assert pid is not None
        async with aiohttp.ClientSession() as session:
            assert await quick_status(session, stack) == 200
            stack.pause(pod)
            # Frozen, not dead: the kernel still accepts the connection, nothing answers.
            assert await quick_status(session, stack, timeout=0.7) == "timeout"
            assert stack.pid(pod) == pid
            stack.resume(pod)
            deadline = time.monotonic() + 10
            while await quick_status(session, stack) != 200:
                assert time.monotonic() < deadline, "the pod did not serve again after resume"
                await asyncio.sleep(0.2)


async def test_stop_ends_a_frozen_process(tmp_path: Path) -> None:
    with running_stack(tmp_path, pods=1) as stack:
        pod = stack.pods[0].name
        stack.pause(pod)
        t0 = time.monotonic()
        stack.stop()
        assert time.monotonic() - t0 < 8
        assert stack.procs[pod].returncode == 0  # it was thawed and handled SIGTERM itself


async def test_replace_envoy_hands_the_port_over_without_failing_a_request(tmp_path: Path) -> None:
    with running_stack(tmp_path, pods=1, ttft_ms=20.0, itl_ms=50.0, envoy_args=DRAIN) as stack:
        old = stack.procs["envoy"]
        old_admin = stack.admin_url
        async with aiohttp.ClientSession() as session:
            first = asyncio.Event()
            in_flight = asyncio.create_task(stream(session, stack, first))  # ~2 s
            await asyncio.wait_for(first.wait(), 10)
            replacing = asyncio.create_task(asyncio.to_thread(stack.replace_envoy, 20.0))
            statuses = []
            while not replacing.done():  # requests all through the handover, new connections each
                async with aiohttp.ClientSession() as fresh:
                    statuses.append(await quick_status(fresh, stack))
                await asyncio.sleep(0.05)
            steps = await replacing
            status, payloads = await in_flight
        assert status == 200 and payloads[-1] == b"[DONE]" and content_tokens(payloads) == TOKENS
        assert statuses and set(statuses) == {200}, statuses
        assert old.poll() is not None and "envoy-draining" not in stack.procs
        assert stack.procs["envoy"].poll() is None and stack.admin_url != old_admin
        assert steps["new_ready_s"] <= steps["drain_started_s"] <= steps["old_stopped_s"]
        async with aiohttp.ClientSession() as session:
            assert await quick_status(session, stack) == 200
