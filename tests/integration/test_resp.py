"""The pipelined RESP client (extproc_router/resp.py) against a real Redis."""

from __future__ import annotations

import asyncio

import pytest

from extproc_router.resp import PipelinedRedis, RespLimits, RespProtocolError


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


async def test_a_snapshot_sized_value_round_trips_within_the_default_limits(redis_server: tuple) -> None:
    host, port, _ = redis_server
    c = PipelinedRedis(host, port, timeout=10.0)
    blob = bytes(range(256)) * (20 * 4096)  # 20 MiB: more than a default index's largest snapshot (16 MiB)
    assert await c.call("SET", "snap", blob) == b"OK"
    assert await c.call("GET", "snap") == blob
    assert c.buffered == 0
    await c.close()


async def test_a_reply_over_a_configured_limit_fails_only_that_connection(redis_server: tuple) -> None:
    host, port, _ = redis_server
    c = PipelinedRedis(host, port, limits=RespLimits(max_bulk_bytes=1024))
    assert await c.call("SET", "big", b"x" * 2048) == b"OK"
    with pytest.raises(RespProtocolError, match="max_bulk_bytes"):
        await c.call("GET", "big")
    assert c.buffered == 0
    assert await c.call("SET", "small", "y") == b"OK"  # reconnected
    assert await c.call("GET", "small") == b"y"
    await c.close()


async def test_auth(redis_server: tuple) -> None:
    host, port, _ = redis_server
    admin = PipelinedRedis(host, port)
    assert await admin.call("CONFIG", "SET", "requirepass", "s3cret") == b"OK"
    try:
        c = PipelinedRedis(host, port, password="s3cret")
        assert await asyncio.gather(*(c.call("PING") for _ in range(50))) == [b"PONG"] * 50  # all behind one AUTH
        wrong = PipelinedRedis(host, port, password="nope")
        with pytest.raises(ConnectionError, match="refused AUTH"):
            await wrong.call("PING")
        assert wrong.pending == 0
        await c.close()
    finally:
        await admin.call("CONFIG", "SET", "requirepass", "")  # our connection authenticated before the change
        await admin.close()
