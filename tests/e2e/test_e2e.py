"""End to end through real Envoy, the real router process and simulated pods."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter

import aiohttp
import aiohttp.web
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from extproc_router.stack import LocalStack, free_port
from tests.conftest import CHAT


async def post(session: aiohttp.ClientSession, stack: LocalStack, body: object, path: str = "/v1/chat/completions",
               headers: dict[str, str] | None = None, raw: bytes | None = None) -> tuple[int, CIMultiDict, bytes]:
    data = raw if raw is not None else orjson.dumps(body)
    async with session.post(stack.url + path, data=data, headers={"content-type": "application/json",
                                                                  **(headers or {})}) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.read()


async def router_metric(stack: LocalStack, name: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as s, s.get(stack.router_http + "/metrics") as resp:
        text = await resp.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


async def test_strategy_headers_route_and_are_echoed(stack: LocalStack) -> None:
    async with aiohttp.ClientSession() as s:
        for strategy in ("random", "least-request"):
            status, hdrs, body = await post(s, stack, CHAT, headers={"routing-strategy": strategy})
            assert status == 200, body
            assert hdrs["routing-strategy"] == strategy
            assert hdrs["target-pod"] == hdrs["x-sim-pod"]  # the echo names the pod that really served
            assert re.fullmatch(r"127\.0\.0\.1:\d+", hdrs["target-pod-ip"])
            assert hdrs["request-id"]
            assert orjson.loads(body)["choices"]


async def test_no_header_means_random_over_all_pods(stack: LocalStack) -> None:
    async with aiohttp.ClientSession() as s:
        results = await asyncio.gather(*(post(s, stack, CHAT) for _ in range(30)))
    assert all(r[0] == 200 for r in results)
    assert {r[1]["routing-strategy"] for r in results} == {"random"}
    assert len({r[1]["target-pod"] for r in results}) == 3


async def test_least_request_spreads_concurrent_streams_within_one(stack: LocalStack) -> None:
    body = {**CHAT, "stream": True, "max_tokens": 40}

    async def one(s: aiohttp.ClientSession) -> str:
        async with s.post(stack.url + "/v1/chat/completions", json=body,
                          headers={"routing-strategy": "least-request"}) as resp:
            assert resp.status == 200
            await resp.read()
            return resp.headers["target-pod"]

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        pods = await asyncio.gather(*(one(s) for _ in range(30)))
    counts = Counter(pods)
    assert len(counts) == 3 and max(counts.values()) - min(counts.values()) <= 1, counts
    await asyncio.sleep(0.2)
    assert sum((await router_metric(stack, "extproc_inflight_requests")).values()) == 0


async def test_spoofed_target_pod_never_changes_destination(stack: LocalStack) -> None:
    trap_port = free_port()
    hits: list[str] = []

    async def trap(request: aiohttp.web.Request) -> aiohttp.web.Response:
        hits.append(request.path)
        return aiohttp.web.Response(text="trapped")

    app = aiohttp.web.Application()
    app.router.add_route("*", "/{tail:.*}", trap)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    await aiohttp.web.TCPSite(runner, "127.0.0.1", trap_port).start()
    try:
        async with aiohttp.ClientSession() as s:
            for path, body in (("/v1/chat/completions", CHAT), ("/v1/chat/completions", {"model": "nope"}),
                               ("/v1/whatever", CHAT)):
                status, hdrs, _ = await post(s, stack, body, path=path,
                                             headers={"target-pod": f"127.0.0.1:{trap_port}",
                                                      "routing-strategy": "random"})
                if status == 200:
                    assert hdrs["target-pod-ip"] != f"127.0.0.1:{trap_port}"
            async with s.get(stack.url + "/v1/chat/completions",
                             headers={"target-pod": f"127.0.0.1:{trap_port}"}) as resp:
                assert resp.status == 405
    finally:
        await runner.cleanup()
    assert hits == []


@pytest.mark.parametrize(("path", "raw", "headers", "status", "cause"), [
    ("/v1/chat/completions", b"{not json", {}, 400, "x-error-request-body-processing"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}]}', {}, 400,
     "x-error-request-body-processing"),
    ("/v1/chat/completions", orjson.dumps({**CHAT, "model": "no-such-model"}), {}, 404, "x-error-no-model-backends"),
    ("/v1/chat/completions", orjson.dumps(CHAT), {"routing-strategy": "fastest"}, 400, "x-error-routing"),
    ("/v1/unknown", orjson.dumps(CHAT), {}, 404, "x-error-request-path"),
    ("/v1/completions", b"", {}, 400, "x-error-request-body-processing"),
])
async def test_errors_through_envoy(stack: LocalStack, path: str, raw: bytes, headers: dict, status: int,
                                    cause: str) -> None:
    async with aiohttp.ClientSession() as s:
        got, hdrs, body = await post(s, stack, None, path=path, raw=raw, headers=headers)
    assert got == status, body
    assert hdrs["content-type"] == "application/json"
    assert cause in hdrs
    err = orjson.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if cause == "x-error-routing":
        assert "least-request" in err["message"]


async def test_oversized_body_is_413(stack: LocalStack) -> None:
    limit = stack.max_body_bytes()
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * (limit + 10)}]}
    async with aiohttp.ClientSession() as s:
        status, _hdrs, body = await post(s, stack, big)
        assert status == 413, body[:200]
        assert orjson.loads(body)["error"]["code"] == "request_too_large"
        # A body just under the limit still routes.
        ok = {**CHAT, "messages": [{"role": "user", "content": "x" * (limit - 200)}]}
        status, _, body = await post(s, stack, ok)
        assert status == 200, body[:200]


async def test_models_list_from_the_gateway(stack: LocalStack) -> None:
    async with aiohttp.ClientSession() as s, s.get(stack.url + "/v1/models") as resp:
        assert resp.status == 200
        data = await resp.json()
    assert [m["id"] for m in data["data"]] == ["demo-model"]


async def test_sse_arrives_chunk_by_chunk(stack: LocalStack) -> None:
    body = {**CHAT, "stream": True, "max_tokens": 10, "stream_options": {"include_usage": True}}
    arrivals: list[float] = []
    async with aiohttp.ClientSession() as s, s.post(stack.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        t0 = time.perf_counter()
        async for line in resp.content:
            if line.startswith(b"data: "):
                arrivals.append(time.perf_counter() - t0)
    assert len(arrivals) >= 10
    # Chunks are spread over the generation (ITL 10 ms), not delivered in one burst at the end.
    assert arrivals[-1] - arrivals[0] > 0.05


async def test_aborted_client_releases_inflight(stack: LocalStack) -> None:
    body = {**CHAT, "stream": True, "max_tokens": 200}
    async with aiohttp.ClientSession() as s:
        resp = await s.post(stack.url + "/v1/chat/completions", json=body,
                            headers={"routing-strategy": "least-request"})
        assert resp.status == 200
        await resp.content.readline()
        assert sum((await router_metric(stack, "extproc_inflight_requests")).values()) == 1
        resp.close()  # abort mid-stream
    for _ in range(50):
        if sum((await router_metric(stack, "extproc_inflight_requests")).values()) == 0:
            break
        await asyncio.sleep(0.05)
    assert sum((await router_metric(stack, "extproc_inflight_requests")).values()) == 0


async def test_metrics_count_requests_by_model_strategy_pod_status(stack: LocalStack) -> None:
    async with aiohttp.ClientSession() as s:
        await post(s, stack, CHAT, headers={"routing-strategy": "least-request"})
    counts = await router_metric(stack, "extproc_requests_total")
    routed = [k for k in counts if 'status="routed"' in k and 'strategy="least-request"' in k]
    assert routed and all('model="demo-model"' in k for k in routed)
    lat = await router_metric(stack, "extproc_decision_latency_seconds_count")
    assert sum(lat.values()) > 0


_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False)
            | st.text(max_size=20))
_json_values = st.recursive(_scalars,
                            lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
                            max_leaves=12)
_bodies = st.one_of(
    st.binary(max_size=300),
    st.dictionaries(st.sampled_from(["model", "messages", "prompt", "stream", "max_tokens", "x"]), _json_values,
                    max_size=5).map(orjson.dumps),
    st.fixed_dictionaries({"model": st.sampled_from(["demo-model", "other", ""]),
                           "messages": st.lists(st.fixed_dictionaries(
                               {"role": st.text(max_size=8), "content": _json_values}), max_size=3)}).map(orjson.dumps),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=_bodies, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_generated_bodies_never_5xx(stack: LocalStack, raw: bytes, path: str) -> None:
    import urllib.error
    import urllib.request
    req = urllib.request.Request(stack.url + path, data=raw, method="POST",
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
        assert orjson.loads(exc.read())["error"]["message"]
    assert status < 500, (raw, status)
    assert stack.dead_children() == []
