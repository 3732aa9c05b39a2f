"""statesync end to end: several real router processes behind one real Envoy, a real Redis.

Envoy balances ext_proc streams round robin over the routers; which router handled a request is
read from the routers' own request counters (requests are sent one at a time).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from extproc_router.stack import LocalStack
from tests.conftest import running_stack, start_stack

MATCH = "x-prefix-cache-match"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """3 router replicas sharing state through the stack's Redis; snapshots every second."""
    with running_stack(tmp_path_factory.mktemp("statesync"), pods=3, replicas=3, redis=True, ttft_ms=5.0,
                       itl_ms=1.0, health_interval=0.5,
                       router_env={"EXTPROC_ROUTER_STATESYNC_SNAPSHOT_INTERVAL": "1"}) as s:
        yield s


async def metrics(http: aiohttp.ClientSession, url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a router's /metrics: (name, sorted labels) -> value; {} if it does not answer."""
    try:
        async with http.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=2)) as resp:
            text = await resp.text()
    except (aiohttp.ClientError, TimeoutError):
        return {}
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


async def routed_counts(http: aiohttp.ClientSession, stack: LocalStack) -> list[float]:
    all_metrics = await asyncio.gather(*(metrics(http, r.http_url) for r in stack.routers))
    return [total(m, "extproc_requests_total") for m in all_metrics]


def body(system: str, question: str) -> dict:
    return {"model": "demo-model", "max_tokens": 2,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]}


def system_prompt(tag: str) -> str:
    return f"[{tag}] You are the assistant of team {tag}; answer briefly and cite sources. " * 30  # ~2.5 KB


async def send(http: aiohttp.ClientSession, stack: LocalStack, payload: dict,
               strategy: str = "prefix-cache") -> tuple[int, int, dict[str, str]]:
    """POST through Envoy; (router index that routed it, status, response headers)."""
    before = await routed_counts(http, stack)
    async with http.post(stack.url + "/v1/chat/completions", data=orjson.dumps(payload),
                         headers={"content-type": "application/json", "routing-strategy": strategy}) as resp:
        status, headers = resp.status, dict(resp.headers)
        await resp.read()
    after = await routed_counts(http, stack)
    moved = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if b > a]
    return (moved[0] if len(moved) == 1 else -1), status, headers


def share(headers: dict[str, str]) -> float:
    return float(headers[MATCH].split(";")[0])


async def reach_every_router(http: aiohttp.ClientSession, stack: LocalStack, system: str, routers: set[int],
                             tries: int = 20) -> dict[int, dict[str, str]]:
    """Send questions behind `system` until each router in `routers` has routed one; their headers."""
    seen: dict[int, dict[str, str]] = {}
    for i in range(tries):
        router, status, headers = await send(http, stack, body(system, f"question {i}"))
        assert status == 200, headers
        if router in routers and router not in seen:
            seen[router] = headers
        if seen.keys() == routers:
            return seen
        await asyncio.sleep(0.05)
    raise AssertionError(f"routers {routers - seen.keys()} never got a request in {tries} tries")


async def wait_for(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.1)


async def test_a_prefix_routed_via_one_replica_routes_to_the_same_pod_via_the_others(
        fleet: LocalStack, http: aiohttp.ClientSession) -> None:
    system = system_prompt("alpha")
    first, status, headers = await send(http, fleet, body(system, "first question"))
    assert status == 200 and first >= 0
    assert share(headers) == 0.0
    pod = headers["target-pod"]
    await asyncio.sleep(0.1)  # propagation lag: milliseconds
    others = {0, 1, 2} - {first}
    for headers in (await reach_every_router(http, fleet, system, others)).values():
        assert headers["target-pod"] == pod and share(headers) > 0.9 and headers[MATCH].endswith("sel=prefix_match")
    # Every router sees the two others' load reports and is connected.
    for r in fleet.routers:
        m = await metrics(http, r.http_url)
        assert total(m, "extproc_statesync_connected") == 1 and total(m, "extproc_statesync_remote_replicas") == 2
        assert total(m, "extproc_statesync_deltas_applied_total") >= 1


async def test_garbage_on_the_stream_is_survived(fleet: LocalStack, http: aiohttp.ClientSession) -> None:
    assert fleet.redis_port is not None
    r = aioredis.Redis(port=fleet.redis_port)
    try:
        await r.xadd("extproc:sync:{prefix}:stream", {"hello": "world"})
        await r.xadd("extproc:sync:{prefix}:stream", {"v1": b"\x00\xffnot a protobuf message"})
    finally:
        await r.aclose()
    system = system_prompt("after-garbage")
    first, status, headers = await send(http, fleet, body(system, "q"))
    assert status == 200
    await asyncio.sleep(0.1)
    for h in (await reach_every_router(http, fleet, system, {0, 1, 2} - {first})).values():
        assert h["target-pod"] == headers["target-pod"] and share(h) > 0.9
    for router in fleet.routers:
        m = await metrics(http, router.http_url)
        assert total(m, "extproc_statesync_deltas_dropped_total", reason="foreign") == 1
        assert total(m, "extproc_statesync_deltas_dropped_total", reason="malformed") == 1


async def test_a_new_replica_catches_up(fleet: LocalStack, http: aiohttp.ClientSession) -> None:
    systems = [system_prompt(f"before-restart-{i}") for i in range(4)]
    pods = []
    for system in systems:  # routed by whichever replicas Envoy picks, router-2 among them
        _, status, headers = await send(http, fleet, body(system, "q"))
        assert status == 200
        pods.append(headers["target-pod"])
    # router-2 restarts: a new process with an empty index and a new replica id. (No requests in
    # between: Envoy would still send router-2 its share until its health check notices.)
    fleet.kill("router-2", signal.SIGTERM)
    await asyncio.sleep(1.2)  # a snapshot round (interval 1 s)
    await asyncio.to_thread(fleet.start_router, 2)  # ready only once caught up
    m = await metrics(http, fleet.routers[2].http_url)
    assert total(m, "extproc_statesync_resyncs_total", reason="join") == 1
    assert total(m, "extproc_statesync_snapshots_loaded_total") >= 1
    assert total(m, "extproc_prefix_cache_index_entries") >= len(systems) * 20
    for system, pod in zip(systems, pods, strict=True):
        headers = (await reach_every_router(http, fleet, system, {2}))[2]
        assert headers["target-pod"] == pod and share(headers) > 0.9


async def test_redis_killed_and_restarted_mid_run(fleet: LocalStack, http: aiohttp.ClientSession) -> None:
    fleet.kill("redis")
    # Routing goes on with local state: nothing fails.
    for i in range(12):
        _, status, _ = await send(http, fleet, body(system_prompt("plain"), f"q{i}"), strategy="random")
        assert status == 200
    system = system_prompt("during-outage")
    first, status, headers = await send(http, fleet, body(system, "q"))
    assert status == 200 and share(headers) == 0.0
    pod = headers["target-pod"]
    for i in range(6):
        _, status, _ = await send(http, fleet, body(system_prompt("plain"), f"r{i}"), strategy="least-request")
        assert status == 200

    await asyncio.to_thread(fleet.start_redis)  # empty: the restart lost everything

    async def all_connected() -> bool:
        ms = await asyncio.gather(*(metrics(http, r.http_url) for r in fleet.routers))
        return all(total(m, "extproc_statesync_connected") == 1 and total(m, "extproc_statesync_synced") == 1
                   for m in ms)

    await wait_for(all_connected, 15, "every router reconnected")
    await asyncio.sleep(0.2)
    # The decision made during the outage reached the others once Redis was back.
    for h in (await reach_every_router(http, fleet, system, {0, 1, 2} - {first})).values():
        assert h["target-pod"] == pod and share(h) > 0.9
    for router in fleet.routers:
        m = await metrics(http, router.http_url)
        assert total(m, "extproc_statesync_resyncs_total", reason="redis_restart") == 1
        assert total(m, "extproc_statesync_redis_errors_total") >= 1


async def test_flag_off_means_no_sync_even_with_redis_host(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    stack = await asyncio.to_thread(start_stack, tmp_path, pods=2, replicas=2, redis=True, ttft_ms=5.0,
                                    itl_ms=1.0, router_env={"AIBRIX_STATESYNC_ENABLED": "false"})
    try:
        system = system_prompt("unshared")
        first, status, headers = await send(http, stack, body(system, "q"))
        assert status == 200 and share(headers) == 0.0
        await asyncio.sleep(0.2)
        other = (await reach_every_router(http, stack, system, {1 - first}))[1 - first]
        assert share(other) == 0.0  # the other replica never heard of it
        assert stack.redis_port is not None
        r = aioredis.Redis(port=stack.redis_port)
        try:
            assert await r.keys("extproc:sync:*") == []
        finally:
            await r.aclose()
        m = await metrics(http, stack.routers[0].http_url)
        assert not any(name.startswith("extproc_statesync_") for name, _ in m)
    finally:
        await asyncio.to_thread(stack.stop)
