"""The router as a Gateway API Inference Extension endpoint picker (`--protocol gie`), behind a real
Envoy configured the way those gateways configure an InferencePool: ext_proc with the request body
buffered and the `envoy.lb.subset_hint` metadata forwarded, and an ORIGINAL_DST cluster keyed on
`x-gateway-destination-endpoint`. A Lua filter stands in for the gateway that sets the subset hint
(from a test header here)."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
import yaml

from extproc_router.stack import envoy_binary, free_port
from tests.conftest import running_sims
from tests.unit.extproc_router.test_serve import MODEL, router_over, wait_for, write_pod_file

GIE_HEADER = "x-gateway-destination-endpoint"

_LUA = """
function envoy_on_request(handle)
  local subset = handle:headers():get("x-test-subset")
  if subset ~= nil then
    local list = {}
    for item in string.gmatch(subset, "[^,]+") do table.insert(list, item) end
    handle:streamInfo():dynamicMetadata():set("envoy.lb.subset_hint",
      "x-gateway-destination-endpoint-subset", list)
  end
end
"""


def gie_bootstrap(listen_port: int, admin_port: int, picker_port: int) -> dict:
    t = "@type"
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "gateway",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        t: "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                           "HttpConnectionManager",
                        "stat_prefix": "gie",
                        "route_config": {"virtual_hosts": [{"name": "pool", "domains": ["*"], "routes": [
                            {"match": {"prefix": "/"}, "route": {"cluster": "inference_pool", "timeout": "30s"}}]}]},
                        "http_filters": [
                            {"name": "envoy.filters.http.lua", "typed_config": {
                                t: "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                                "default_source_code": {"inline_string": _LUA}}},
                            {"name": "envoy.filters.http.ext_proc", "typed_config": {
                                t: "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
                                "grpc_service": {"envoy_grpc": {"cluster_name": "endpoint_picker"}},
                                "failure_mode_allow": False,
                                "processing_mode": {"request_header_mode": "SEND", "request_body_mode": "BUFFERED",
                                                    "response_header_mode": "SKIP", "response_body_mode": "NONE",
                                                    "request_trailer_mode": "SKIP",
                                                    "response_trailer_mode": "SKIP"},
                                "metadata_options": {"forwarding_namespaces": {"untyped": ["envoy.lb.subset_hint"]}},
                                "message_timeout": "10s"}},
                            {"name": "envoy.filters.http.router", "typed_config": {
                                t: "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
                        ],
                    },
                }]}],
            }],
            "clusters": [
                {"name": "inference_pool", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
                 "connect_timeout": "2s",
                 "original_dst_lb_config": {"use_http_header": True, "http_header_name": GIE_HEADER}},
                {"name": "endpoint_picker", "type": "STATIC", "connect_timeout": "2s",
                 "typed_extension_protocol_options": {
                     "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                         t: "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                         "explicit_http_config": {"http2_protocol_options": {}}}},
                 "load_assignment": {"cluster_name": "endpoint_picker", "endpoints": [{"lb_endpoints": [
                     {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1",
                                                                   "port_value": picker_port}}}}]}]}},
            ],
        },
    }


@asynccontextmanager
async def gie_gateway(tmp_path: Path, picker_port: int) -> AsyncIterator[str]:
    port, admin = free_port(), free_port()
    config = tmp_path / "envoy-gie.yaml"
    config.write_text(yaml.safe_dump(gie_bootstrap(port, admin, picker_port)))
    log = (tmp_path / "envoy.log").open("w")
    proc = subprocess.Popen([envoy_binary(), "-c", str(config), "--disable-hot-restart", "--concurrency", "1",
                             "-l", "warning"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(200):
                if proc.poll() is not None:
                    pytest.fail(f"envoy exited: {(tmp_path / 'envoy.log').read_text()[-2000:]}")
                try:
                    async with s.get(f"http://127.0.0.1:{admin}/ready") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


async def chat(s: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, str, bytes]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "shared prefix " * 50 + "hello"}]}
    async with s.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
        data = await resp.read()
        return resp.status, resp.headers.get("x-sim-pod", ""), data


@pytest.mark.parametrize("strategy", ["random", "least-request", "prefix-cache", "session-affinity",
                                      "least-request:1,prefix-cache:1"])
async def test_every_strategy_routes_as_an_endpoint_picker(tmp_path: Path, strategy: str) -> None:
    pod_file = tmp_path / "gateway.yaml"
    async with running_sims({}) as start:
        sims = {name: await start(pod_name=name) for name in ("pod-a", "pod-b", "pod-c")}
        write_pod_file(pod_file, sims)
        async with router_over(pod_file, EXTPROC_ROUTER_PROTOCOL="gie") as proc:
            await wait_for(lambda: len(proc.router.snapshot.models[MODEL].ready) == 3, 5, "3 ready pods")
            async with gie_gateway(tmp_path, proc.grpc_port) as url, aiohttp.ClientSession() as s:
                served = set()
                for _ in range(12):
                    status, pod, _ = await chat(s, url, **{"routing-strategy": strategy})
                    assert status == 200
                    served.add(pod)
                assert served <= set(sims)
                # A client cannot pick the endpoint: its header is removed before Envoy routes.
                target = sims["pod-c"]
                picked = [(await chat(s, url, **{GIE_HEADER: f"127.0.0.1:{target.port}",
                                                 "routing-strategy": "least-request"}))[1] for _ in range(9)]
                assert set(picked) != {"pod-c"}, picked


async def test_the_subset_hint_limits_the_pick_and_an_empty_one_is_503(tmp_path: Path) -> None:
    pod_file = tmp_path / "gateway.yaml"
    async with running_sims({}) as start:
        sims = {name: await start(pod_name=name) for name in ("pod-a", "pod-b", "pod-c")}
        write_pod_file(pod_file, sims)
        async with router_over(pod_file, EXTPROC_ROUTER_PROTOCOL="gie") as proc:
            await wait_for(lambda: len(proc.router.snapshot.models[MODEL].ready) == 3, 5, "3 ready pods")
            async with gie_gateway(tmp_path, proc.grpc_port) as url, aiohttp.ClientSession() as s:
                a, b = sims["pod-a"].port, sims["pod-b"].port
                for strategy in ("random", "least-request", "prefix-cache"):
                    seen = {(await chat(s, url, **{"routing-strategy": strategy,
                                                   "x-test-subset": f"127.0.0.1:{a},127.0.0.1:{b}"}))[1]
                            for _ in range(12)}
                    assert seen <= {"pod-a", "pod-b"}, (strategy, seen)
                only_c = {(await chat(s, url, **{"x-test-subset": f"127.0.0.1:{sims['pod-c'].port}"}))[1]
                          for _ in range(5)}
                assert only_c == {"pod-c"}
                # No eligible endpoint in the hint (unknown address): 503 from the picker, per the protocol.
                status, pod, body = await chat(s, url, **{"x-test-subset": "127.0.0.1:1"})
                assert status == 503 and not pod and b"service_unavailable" in body


async def test_grpc_health_services_of_the_protocol(tmp_path: Path) -> None:
    import grpc

    pod_file = tmp_path / "gateway.yaml"
    async with running_sims({}) as start:
        write_pod_file(pod_file, {"pod-a": await start(pod_name="pod-a")})
        async with router_over(pod_file, EXTPROC_ROUTER_PROTOCOL="gie") as proc, \
                grpc.aio.insecure_channel(f"127.0.0.1:{proc.grpc_port}") as channel:
            check = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=lambda b: b,
                                        response_deserializer=lambda b: b)

            def request(service: str) -> bytes:
                name = service.encode()
                return b"\x0a" + bytes([len(name)]) + name if name else b""

            for service in ("liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor", ""):
                assert await check(request(service), timeout=5) == b"\x08\x01", service  # SERVING
            proc.draining = True  # shutting down: not ready to pick, still alive
            assert await check(request("readiness"), timeout=5) == b"\x08\x02"
            assert await check(request("liveness"), timeout=5) == b"\x08\x01"
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await check(request("nope"), timeout=5)
            assert exc.value.code() == grpc.StatusCode.NOT_FOUND
