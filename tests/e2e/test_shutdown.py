"""Graceful shutdown of the router, through real Envoy with long streaming requests in flight.

On SIGTERM the router must: turn readiness false at once (HTTP /ready and gRPC health), keep serving
new streams for --drain-delay (so Envoy / Kubernetes can move traffic first), then refuse new
streams (GOAWAY, listener closed) while every in-flight stream runs to completion, and exit 0 before
--shutdown-grace runs out.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from pathlib import Path

import aiohttp
import grpc

from extproc_router.stack import LocalStack
from tests.conftest import content_tokens, start_stack

DRAIN_DELAY = 1.5
GRACE = 15.0
TOKENS = 60  # at 50 ms per token: a 3 s stream, still running well after the drain delay
STREAMS = 4


async def ready_status(stack: LocalStack) -> int:
    async with aiohttp.ClientSession() as s, s.get(stack.router_http + "/ready") as resp:
        return resp.status


def grpc_health(port: int) -> bytes:
    """grpc.health.v1.Health/Check for service "" over a new connection; the raw response message."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=2)


def grpc_port_refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return True
    return False


async def stream_completion(session: aiohttp.ClientSession, stack: LocalStack,
                            first_chunk: asyncio.Event) -> tuple[int, list[bytes]]:
    body = {"model": "demo-model", "stream": True, "max_tokens": TOKENS,
            "messages": [{"role": "user", "content": "Tell me a long story."}]}
    async with session.post(stack.url + "/v1/chat/completions", json=body) as resp:
        payloads: list[bytes] = []
        async for line in resp.content:
            if line.startswith(b"data: "):
                payloads.append(line[6:].strip())
                first_chunk.set()
        return resp.status, payloads


async def test_sigterm_finishes_in_flight_streams_and_exits_cleanly(tmp_path: Path) -> None:
    stack = await asyncio.to_thread(
        start_stack, tmp_path, pods=2, ttft_ms=20.0, itl_ms=50.0,
        router_args=["--drain-delay", str(DRAIN_DELAY), "--shutdown-grace", str(GRACE)])
    try:
        router = stack.procs["router"]
        grpc_port = stack.opts.grpc_port
        assert grpc_health(grpc_port) == b"\x08\x01"  # SERVING
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            started = [asyncio.Event() for _ in range(STREAMS)]
            streams = [asyncio.create_task(stream_completion(session, stack, ev)) for ev in started]
            await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in started)), 10)

            t0 = time.monotonic()
            router.send_signal(signal.SIGTERM)

            # 1. Readiness goes false first, while every stream is still open ...
            while await ready_status(stack) != 503:
                assert time.monotonic() - t0 < 1.0, "/ready still 200 one second after SIGTERM"
                await asyncio.sleep(0.02)
            assert await asyncio.to_thread(grpc_health, grpc_port) == b"\x08\x02"  # NOT_SERVING
            assert not any(t.done() for t in streams)

            # 2. ... and during the drain delay new requests are still routed.
            quick = {"model": "demo-model", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
            async with session.post(stack.url + "/v1/chat/completions", json=quick) as resp:
                assert resp.status == 200, await resp.text()
            assert time.monotonic() - t0 < DRAIN_DELAY

            # 3. After the delay the router takes no new streams, but the old ones keep going.
            while not await asyncio.to_thread(grpc_port_refuses, grpc_port):
                assert time.monotonic() - t0 < DRAIN_DELAY + 2, "gRPC port still open after the drain delay"
                await asyncio.sleep(0.05)
            assert time.monotonic() - t0 >= DRAIN_DELAY - 0.1
            assert not any(t.done() for t in streams), "a stream ended before the drain delay was over"

            # 4. Every in-flight request completes with its whole stream.
            results = await asyncio.wait_for(asyncio.gather(*streams), GRACE)
        for status, payloads in results:
            assert status == 200
            assert payloads[-1] == b"[DONE]"
            assert content_tokens(payloads) == TOKENS

        # 5. The router exits 0 once they are done, well within the grace period.
        code = await asyncio.to_thread(router.wait, GRACE)
        elapsed = time.monotonic() - t0
        assert code == 0
        assert elapsed < DRAIN_DELAY + GRACE
        log = (tmp_path / "router.log").read_text()
        assert "readiness is false" in log and "stopped" in log
    finally:
        await asyncio.to_thread(stack.stop)
