"""A router replica that dies must not cut the generations it routed, and nothing is routed without one.

Fail open for data, closed for routing: the rendered bootstrap has ext_proc `failure_mode_allow: true`,
so a `kill -9` of one of two replicas leaves the streams it routed running to their last token; Envoy's
retry of the ext_proc stream's opening and outlier detection on the ext_proc cluster send every new
request to the survivor (none fails); with no router at all a request (a spoofed `target-pod`
included) gets a clean OpenAI-shaped 503 and never reaches a pod.
`extproc-router up` supervises the routers: a killed replica is restarted and answers again.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict

from extproc_router.envoyconfig.render import (
    EXTPROC_CLUSTER,
    POD_CLUSTER,
    TARGET_POD_HEADER,
    GatewayValues,
    render_bootstrap,
)
from extproc_router.envoyconfig.values import parse_duration
from extproc_router.stack import LocalStack, RestartBackoff, RouterSpec
from tests.conftest import start_stack

STREAMS = 20
TOKENS = 80
ITL_MS = 50.0  # 80 tokens at 50 ms: a 4 s generation, still running well after the kill
KILL_AFTER = 1.5
QUICK = {"model": "demo-model", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
# A user with a tokens/minute limit: the router subscribes to its response bodies (to count usage),
# so each of its chunks passes the ext_proc stream that the kill breaks.
METERED = {"metered": {"tpm": 100_000_000}}
ROUTING_UNAVAILABLE = {
    "error": {
        "message": "The routing service is unavailable; retry shortly.",
        "type": "overloaded_error",
        "param": None,
        "code": "routing_unavailable",
    }
}


def _cluster(boot: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in boot["static_resources"]["clusters"] if c["name"] == name)


def _hcm(boot: dict[str, Any]) -> dict[str, Any]:
    listener = boot["static_resources"]["listeners"][0]
    return listener["filter_chains"][0]["filters"][-1]["typed_config"]


def health_interval() -> float:
    """The ext_proc cluster's active health-check interval, as rendered."""
    check = _cluster(render_bootstrap(GatewayValues()), EXTPROC_CLUSTER)["health_checks"][0]
    return parse_duration(check["interval"]).total_seconds()


# --------------------------------------------------------------------------------------------- fast checks


def test_bootstrap_fails_open_for_data_and_closed_for_routing() -> None:
    boot = render_bootstrap(GatewayValues())
    hcm = _hcm(boot)
    ext_proc = hcm["http_filters"][0]["typed_config"]
    assert ext_proc["failure_mode_allow"] is True
    assert ext_proc["processing_mode"]["response_trailer_mode"] == "SEND"  # why fail-closed would cut streams
    # The client's target-pod is gone before any filter: a request the router did not decide on
    # reaches the pod cluster with no destination at all ...
    assert hcm["early_header_mutation_extensions"][0]["typed_config"]["mutations"] == [{"remove": TARGET_POD_HEADER}]
    # ... and the pod cluster has no other source of one (no metadata key, no port override, no
    # listener filter or use_original_dst that would restore the connection's local address).
    pods = _cluster(boot, POD_CLUSTER)
    assert pods["original_dst_lb_config"] == {"use_http_header": True, "http_header_name": TARGET_POD_HEADER}
    listener = boot["static_resources"]["listeners"][0]
    assert "listener_filters" not in listener and "use_original_dst" not in listener
    # That 503 says what happened, in the OpenAI shape (the first mapper outside the Anthropic-shaped
    # copies that /v1/messages gets).
    first = next(m for m in hcm["local_reply_config"]["mappers"] if '":path"' not in orjson.dumps(m["filter"]).decode())
    assert first["status_code"] == 503
    assert orjson.loads(first["body_format_override"]["text_format_source"]["inline_string"]) == ROUTING_UNAVAILABLE
    # Fail-closed stays available to whoever renders it.
    closed = render_bootstrap(GatewayValues(), failure_mode_allow=False)
    assert _hcm(closed)["http_filters"][0]["typed_config"]["failure_mode_allow"] is False


def test_restart_backoff_grows_while_crashing_and_resets_after_a_good_run() -> None:
    backoff = RestartBackoff(first=0.5, cap=4.0, reset_after=30.0)
    assert [backoff.delay(uptime=0.1) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff.delay(uptime=31.0) == 0.5  # it ran long enough: healthy again
    assert backoff.delay(uptime=2.0) == 1.0


# --------------------------------------------------------------------------------------------- helpers


def count_tokens(payloads: list[bytes]) -> int:
    count = 0
    for p in payloads:
        if p == b"[DONE]":
            continue
        for choice in orjson.loads(p).get("choices") or ():
            if (choice.get("delta") or {}).get("content"):
                count += 1
    return count


async def stream_completion(session: aiohttp.ClientSession, stack: LocalStack, i: int,
                            metered: bool = False) -> tuple[int, list[bytes]]:
    body: dict[str, Any] = {"model": "demo-model", "stream": True, "max_tokens": TOKENS,
                            "messages": [{"role": "user", "content": f"Tell me long story number {i}."}]}
    headers = {}
    if metered:
        body["stream_options"] = {"include_usage": True}
        headers["user"] = next(iter(METERED))
    payloads: list[bytes] = []
    try:
        async with session.post(stack.url + "/v1/chat/completions", json=body, headers=headers) as resp:
            async for line in resp.content:
                if line.startswith(b"data: "):
                    payloads.append(line[6:].strip())
            return resp.status, payloads
    except aiohttp.ClientError:  # a cut stream: the count of what arrived tells how far it got
        return -1, payloads


async def metric_sum(session: aiohttp.ClientSession, url: str, name: str) -> float:
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith((name + "{", name + " ")))


async def quick(session: aiohttp.ClientSession, stack: LocalStack,
                headers: dict[str, str] | None = None) -> tuple[int, CIMultiDict[str], bytes]:
    async with session.post(stack.url + "/v1/chat/completions", json=QUICK, headers=headers or {}) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.read()


async def http_ok(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=0.5)) as resp:
            return resp.status == 200
    except (TimeoutError, aiohttp.ClientError):
        return False


# --------------------------------------------------------------------------------------------- end to end


def test_a_dead_replica_is_retried_around_and_ejected_at_its_first_failure() -> None:
    boot = render_bootstrap(GatewayValues())
    retry = _hcm(boot)["http_filters"][0]["typed_config"]["grpc_service"]["retry_policy"]
    # Only the stream's opening: nothing has reached a router yet, so no decision is made twice.
    assert set(retry["retry_on"].split(",")) == {"connect-failure", "refused-stream", "reset-before-request"}
    assert retry["retry_host_predicate"][0]["name"] == "envoy.retry_host_predicates.previous_hosts"
    outlier = _cluster(boot, EXTPROC_CLUSTER)["outlier_detection"]
    assert outlier["split_external_local_origin_errors"] is True
    assert outlier["consecutive_local_origin_failure"] == 1
    # Upstream (router-answered) errors never eject: a router that answers is alive.
    assert outlier["enforcing_consecutive_5xx"] == 0 and outlier["enforcing_consecutive_gateway_failure"] == 0
    assert outlier["enforcing_success_rate"] == 0


async def test_killed_replica_keeps_its_streams_survivor_takes_over_and_no_router_is_a_clean_503(
        tmp_path: Path) -> None:
    interval = health_interval()
    stack = await asyncio.to_thread(start_stack, tmp_path, replicas=2, pods=2, ttft_ms=20.0, itl_ms=ITL_MS,
                                    file_extra={"users": METERED})
    try:
        victim, survivor = stack.routers[1], stack.routers[0]
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            # 1. Twenty streams, about half of them routed (and held open) by each replica; half
            # of them (in pairs, so round robin gives each replica some) of a metered user.
            t0 = time.monotonic()
            streams = [asyncio.create_task(stream_completion(session, stack, i, metered=i % 4 < 2))
                       for i in range(STREAMS)]
            await asyncio.sleep(KILL_AFTER - 0.1)
            victim_inflight = await metric_sum(session, victim.http_url, "extproc_inflight_requests")
            assert victim_inflight >= 1, "the replica to kill routed none of the streams"
            assert not any(t.done() for t in streams)
            await asyncio.sleep(max(0.0, t0 + KILL_AFTER - time.monotonic()))
            await asyncio.to_thread(stack.kill, victim.name, signal.SIGKILL)
            killed_at = time.monotonic()

            # 2. New requests, from the kill through the health check that drops the dead replica
            # and beyond: every one routed by the survivor. The stream opening to the dead replica
            # is retried on the survivor (the grpc_service retry policy), and the first failure
            # ejects the replica (outlier detection) before the health check notices.
            probes: list[tuple[float, int]] = []
            while time.monotonic() - killed_at < 2 * interval + 0.5:
                status, _, body = await quick(session, stack)
                probes.append((time.monotonic() - killed_at, status))
                assert status == 200, (status, body, probes)
                await asyncio.sleep(0.02)

            # 3. Every stream, those of the dead replica included, ends with every token and [DONE].
            results = await asyncio.wait_for(asyncio.gather(*streams), 30)
            for i, (status, payloads) in enumerate(results):
                assert status == 200, (i, status, len(payloads))
                assert payloads[-1] == b"[DONE]"
                assert count_tokens(payloads) == TOKENS
                if i % 4 < 2:  # the metered streams end with their usage chunk
                    assert orjson.loads(payloads[-2])["usage"]["completion_tokens"] == TOKENS
            assert time.monotonic() - killed_at > 1.0  # the streams really outlived the kill

            # 4. No router left: a clean 503, and a spoofed target-pod pointing at a live pod does
            # not reach it. Before and after Envoy's health check has marked both replicas down.
            await asyncio.to_thread(stack.kill, survivor.name, signal.SIGKILL)
            pod = stack.pods[0]
            pod_url = f"http://127.0.0.1:{pod.port}"
            before = await metric_sum(session, pod_url, "vllm:prompt_tokens_total")
            no_router: list[int] = []
            for _ in range(4):
                for headers in ({}, {TARGET_POD_HEADER: f"127.0.0.1:{pod.port}"}):
                    status, hdrs, body = await quick(session, stack, headers)
                    assert status == 503, (status, body)
                    assert hdrs["content-type"] == "application/json"
                    assert orjson.loads(body) == ROUTING_UNAVAILABLE
                    assert "x-sim-pod" not in hdrs and "target-pod" not in hdrs
                    no_router.append(status)
                await asyncio.sleep(interval / 2)
            assert await metric_sum(session, pod_url, "vllm:prompt_tokens_total") == before
        # Only the routers died; pods and Envoy kept running.
        assert {name for name, _ in stack.dead_children()} == {victim.name, survivor.name}
        print(f"\nkilled replica had {victim_inflight:.0f} of {STREAMS} streams in flight; "
              f"{sum(s == 200 for s, _ in results)}/{STREAMS} streams completed with {TOKENS} tokens; "
              f"survivor answered all {len(probes)} requests sent in the {probes[-1][0]:.2f} s after the kill; "
              f"no router: {len(no_router)} requests, all 503 routing_unavailable")
    finally:
        await asyncio.to_thread(stack.stop)


async def test_supervised_stack_restarts_a_killed_replica(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="extproc_router.stack")
    stack = await asyncio.to_thread(start_stack, tmp_path, replicas=2, pods=1, supervise=True)
    try:
        assert stack.supervisor is not None
        replica: RouterSpec = stack.routers[1]
        old_pid = stack.procs[replica.name].pid
        async with aiohttp.ClientSession() as session:
            await asyncio.to_thread(stack.kill, replica.name, signal.SIGKILL)
            killed_at = time.monotonic()
            ready = replica.http_url + "/ready"
            while not (stack.procs[replica.name].pid != old_pid and await http_ok(session, ready)):
                assert time.monotonic() - killed_at < 15, "the killed replica did not come back"
                await asyncio.sleep(0.05)
            back_after = time.monotonic() - killed_at
            assert await http_ok(session, replica.http_url + "/health")
            # Envoy's health check puts it back in rotation: it routes requests again.
            while await metric_sum(session, replica.http_url, "extproc_requests_total") == 0:
                assert time.monotonic() - killed_at < back_after + 3 * health_interval() + 2, "never routed again"
                status, _, body = await quick(session, stack)
                assert status == 200, body
                await asyncio.sleep(0.05)
            routing_after = time.monotonic() - killed_at
        assert stack.supervisor.restarts(replica.name) == 1
        assert stack.supervisor.restarts(stack.routers[0].name) == 0
        messages = [r.getMessage() for r in caplog.records if r.name == "extproc_router.stack"]
        assert any(f"router replica {replica.name} (pid {old_pid}) exited with code -9 (SIGKILL)" in m
                   and "restarted in" in m for m in messages), messages
        assert any(f"router replica {replica.name} restarted" in m for m in messages), messages
        print(f"\nreplica {replica.name} ready again {back_after:.2f} s after kill -9, routing again after "
              f"{routing_after:.2f} s; log: {messages}")
    finally:
        await asyncio.to_thread(stack.stop)
    # stop() ended the supervisor first: nothing was restarted behind it.
    assert stack.supervisor is None
    assert all(p.poll() is not None for p in stack.procs.values())
