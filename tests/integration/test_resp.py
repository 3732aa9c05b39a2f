"""The pipelined RESP client (extproc_router/resp.py) against a real Redis."""

from __future__ import annotations

import asyncio

from extproc_router.resp import PipelinedRedis


async def test_pipelined_client_bursts_and_reconnects(redis_server: tuple) -> None:
    host, port, _ = redis_server
    c = PipelinedRedis(host, port)
    results = await asyncio.gather(*(c.call("INCR", "burst") for _ in range(3000)))
    assert sorted(results) == list(range(1, 3001))  # one connection, every reply to its caller
    assert await c.call("SET", "k", "v") == b"OK" and await c.call("GET", "k") == b"v"
    assert await c.call("GET", "missing") is None
    assert await c.call("MGET", "k", "missing") == [b"v", None]
    await c.call("CLIENT", "KILL", "TYPE", "normal")  # drop our own connection server-side
    await asyncio.sleep(0.05)
    assert await c.call("GET", "k") == b"v"  # reconnected
    assert await c.eval_script("return ARGV[1]", [], ["x"]) == b"x"
