"""`session-affinity` through real Envoy: the response's `x-session-id` brings a conversation back to
its pod (the reference lost the header in its own whitelist, #2122), a lost pod's sessions move by
rendezvous hash, and profiles and weighted mixes can use it."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import aiohttp
import pytest

from extproc_router.stack import LocalStack
from routing.strategies.session_affinity import rendezvous
from tests.conftest import CHAT, running_stack


async def send(s: aiohttp.ClientSession, stack: LocalStack, **headers: str) -> tuple[int, str, str]:
    async with s.post(stack.url + "/v1/chat/completions", json=CHAT, headers=headers) as resp:
        await resp.read()
        return resp.status, resp.headers.get("x-sim-pod", ""), resp.headers.get("x-session-id", "")


@pytest.fixture
def sessions_stack(tmp_path: Path):
    with running_stack(tmp_path, ttft_ms=1.0, itl_ms=1.0, health_interval=0.2) as s:
        yield s


async def test_sessions_stick_and_move_only_when_their_pod_goes(sessions_stack: LocalStack) -> None:
    stack = sessions_stack
    async with aiohttp.ClientSession() as s:
        status, pod, sid = await send(s, stack, **{"routing-strategy": "session-affinity"})
        assert status == 200 and sid
        assert base64.b64decode(sid).decode() == next(f"127.0.0.1:{p.port}" for p in stack.pods if p.name == pod)
        # Ten turns of the same conversation, concurrent with other new sessions: always the same pod.
        for _ in range(10):
            turns = await asyncio.gather(send(s, stack, **{"routing-strategy": "session-affinity",
                                                            "x-session-id": sid}),
                                         *(send(s, stack, **{"routing-strategy": "session-affinity"})
                                           for _ in range(3)))
            assert turns[0] == (200, pod, sid)
        # Its pod dies: with a session key the conversation moves to the rendezvous pod of the rest.
        stack.kill(pod)
        await asyncio.sleep(0.8)
        key = "conversation-7"
        from routing.pods import Pod
        rest = [Pod(p.name, f"127.0.0.1:{p.port}", "demo-model") for p in stack.pods if p.name != pod]
        expected = rendezvous(key, rest).name
        status, moved, new_sid = await send(s, stack, **{"routing-strategy": "session-affinity",
                                                         "x-session-id": sid, "x-aibrix-session-key": key})
        assert (status, moved) == (200, expected) and new_sid != sid
        assert await send(s, stack, **{"routing-strategy": "session-affinity", "x-session-id": new_sid}) == (
            200, expected, new_sid)


async def test_weighted_mix_and_spoofed_sessions(stack: LocalStack) -> None:
    async with aiohttp.ClientSession() as s:
        status, pod, sid = await send(s, stack, **{"routing-strategy": "session-affinity:10,prefix-cache:1"})
        assert status == 200 and sid
        for _ in range(5):
            assert await send(s, stack, **{"routing-strategy": "session-affinity:10,prefix-cache:1",
                                           "x-session-id": sid}) == (200, pod, sid)
        # A session id naming an address that is no pod of this model is ignored, not followed.
        spoof = base64.b64encode(b"127.0.0.1:1").decode()
        status, pod, sid = await send(s, stack, **{"routing-strategy": "session-affinity", "x-session-id": spoof})
        assert status == 200 and pod and sid != spoof
