"""`extproc-router envoy-config`: values.yaml -> Envoy bootstrap, checked on dicts and with real Envoy."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import orjson
import pytest
import yaml
from aiohttp import web
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from extproc_router.envoyconfig import cli
from extproc_router.envoyconfig.render import (
    METADATA_NAMESPACE,
    RESPONSE_ECHO_HEADERS,
    GatewayValues,
    ValuesError,
    load_values,
    render_bootstrap,
    to_yaml,
)
from extproc_router.envoyconfig.values import parse_duration

ENVOY = Path(sys.executable).parent / "envoy"
REPO = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024

needs_envoy = pytest.mark.skipif(not ENVOY.exists(), reason=f"no Envoy binary next to the interpreter ({ENVOY})")

FULL_VALUES = {
    "gatewayPlugin": {"replicas": 3},  # other chart sections are ignored
    "metadata": {"name": "aibrix"},
    "gateway": {
        "clientTrafficPolicy": {
            "connection": {"bufferLimit": 8 * MIB, "connectionLimit": {"value": 300}},
            "http2": {"maxConcurrentStreams": 77},
        },
        "backendTrafficPolicy": {
            "circuitBreaker": {
                "maxConnections": 11,
                "maxParallelRequests": 12,
                "maxPendingRequests": 13,
                "maxParallelRetries": 14,
                "maxRequestsPerConnection": 15,
            },
            "http2": {"maxConcurrentStreams": 16},
        },
        "envoyPatchPolicy": {
            "route": {"timeout": "2m", "connectTimeout": "1.5s"},
            "circuitBreakers": {"maxConnections": 21, "maxRequests": 22, "maxPendingRequests": 23},
        },
    },
}


# --------------------------------------------------------------------------------------------- helpers


def listener(bootstrap: dict[str, Any]) -> dict[str, Any]:
    return bootstrap["static_resources"]["listeners"][0]


def hcm(bootstrap: dict[str, Any]) -> dict[str, Any]:
    return listener(bootstrap)["filter_chains"][0]["filters"][-1]["typed_config"]


def cluster(bootstrap: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in bootstrap["static_resources"]["clusters"] if c["name"] == name)


def route(bootstrap: dict[str, Any], name: str) -> dict[str, Any]:
    return next(r for r in hcm(bootstrap)["route_config"]["virtual_hosts"][0]["routes"] if r["name"] == name)


def ext_proc_config(bootstrap: dict[str, Any]) -> dict[str, Any]:
    return hcm(bootstrap)["http_filters"][0]["typed_config"]


def pod_thresholds(bootstrap: dict[str, Any]) -> dict[str, Any]:
    return cluster(bootstrap, "model_pods")["circuit_breakers"]["thresholds"][0]


def envoy_validate(bootstrap: dict[str, Any], tmp_path: Path) -> None:
    cfg = tmp_path / "envoy.yaml"
    cfg.write_text(to_yaml(bootstrap))
    done = subprocess.run(
        [str(ENVOY), "--mode", "validate", "-c", str(cfg), "-l", "error"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------- rendering


@needs_envoy
def test_defaults_render_and_pass_envoy_validate(tmp_path: Path) -> None:
    values = load_values(None)
    assert values == GatewayValues()
    assert values.max_body_bytes == 4194304
    boot = render_bootstrap(values)
    envoy_validate(boot, tmp_path)

    assert boot["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9901}
    main = listener(boot)
    assert main["name"] == "main"
    assert main["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 8888}
    assert main["per_connection_buffer_limit_bytes"] == 4194304 + MIB
    # no connectionLimit -> no connection_limit filter
    assert [f["name"] for f in main["filter_chains"][0]["filters"]] == ["envoy.filters.network.http_connection_manager"]
    h = hcm(boot)
    assert h["stat_prefix"] == "gateway"
    assert h["codec_type"] == "AUTO"
    assert h["stream_idle_timeout"] == "300s"
    assert h["http2_protocol_options"]["max_concurrent_streams"] == 1024
    assert route(boot, "pods")["route"]["timeout"] == "120s"
    pods = cluster(boot, "model_pods")
    assert pods["connect_timeout"] == "6s"
    assert pods["per_connection_buffer_limit_bytes"] == 4194304 + MIB
    assert pod_thresholds(boot) == {
        "priority": "DEFAULT",
        "max_connections": 1024,
        "max_pending_requests": 1024,
        "max_requests": 1024,
        "max_retries": 1024,
    }


@needs_envoy
def test_every_values_key_lands_in_its_envoy_field(tmp_path: Path) -> None:
    values = load_values(FULL_VALUES)
    assert values.max_body_bytes == 8 * MIB
    boot = render_bootstrap(values)
    envoy_validate(boot, tmp_path)

    main = listener(boot)
    assert main["per_connection_buffer_limit_bytes"] == 9 * MIB
    limit, manager = main["filter_chains"][0]["filters"]
    assert limit["name"] == "envoy.filters.network.connection_limit"  # before the HCM
    assert limit["typed_config"]["max_connections"] == 300
    assert manager["name"] == "envoy.filters.network.http_connection_manager"
    assert hcm(boot)["http2_protocol_options"]["max_concurrent_streams"] == 77

    pods = cluster(boot, "model_pods")
    assert pods["per_connection_buffer_limit_bytes"] == 9 * MIB
    assert pods["connect_timeout"] == "1.5s"
    assert route(boot, "pods")["route"]["timeout"] == "120s"  # "2m"
    # envoyPatchPolicy wins for the three keys it has; the others come from backendTrafficPolicy
    assert pod_thresholds(boot) == {
        "priority": "DEFAULT",
        "max_connections": 21,
        "max_pending_requests": 23,
        "max_requests": 22,
        "max_retries": 14,
    }
    options = pods["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert options["common_http_protocol_options"] == {"max_requests_per_connection": 15}
    # Plaintext pods speak HTTP/1.1: the h2 stream limit is kept but has no HTTP/1.1 field.
    assert options["explicit_http_config"] == {"http_protocol_options": {}}
    assert values.pod_max_concurrent_streams == 16


def test_pod_route_cluster_and_security_settings() -> None:
    boot = render_bootstrap(GatewayValues())
    pods = cluster(boot, "model_pods")
    assert pods["type"] == "ORIGINAL_DST"
    assert pods["lb_policy"] == "CLUSTER_PROVIDED"
    assert pods["original_dst_lb_config"] == {"use_http_header": True, "http_header_name": "target-pod"}

    early = hcm(boot)["early_header_mutation_extensions"]
    assert early[0]["name"] == "envoy.http.early_header_mutation.header_mutation"
    assert early[0]["typed_config"]["mutations"] == [{"remove": "target-pod"}]

    models = route(boot, "models")
    assert models["match"]["path"] == "/v1/models"
    assert models["match"]["headers"] == [{"name": ":method", "string_match": {"exact": "GET"}}]
    assert models["route"]["cluster"] == "extproc_router_http"
    # ext_proc runs on it: the router answers the list after the API-key check.
    assert "typed_per_filter_config" not in models

    pods_route = route(boot, "pods")
    assert pods_route["match"] == {"prefix": "/"}
    assert pods_route["route"]["cluster"] == "model_pods"
    echo = pods_route["response_headers_to_add"]
    assert [e["header"]["key"] for e in echo] == RESPONSE_ECHO_HEADERS
    for entry in echo:
        name = entry["header"]["key"]
        assert entry["header"]["value"] == f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:{name})%"
        assert entry["append_action"] == "OVERWRITE_IF_EXISTS_OR_ADD"
        assert "keep_empty_value" not in entry  # false: a missing decision adds no header

    assert [f["name"] for f in hcm(boot)["http_filters"]] == [
        "envoy.filters.http.ext_proc",
        "envoy.filters.http.router",
    ]
    xp = ext_proc_config(boot)
    assert xp["grpc_service"]["envoy_grpc"] == {"cluster_name": "extproc"}
    assert xp["failure_mode_allow"] is True  # fail open for data; no decision still means 503
    assert xp["message_timeout"] == "60s"
    assert xp["allow_mode_override"] is True
    assert xp["metadata_options"] == {"receiving_namespaces": {"untyped": ["extproc-router"]}}
    assert xp["processing_mode"] == {
        "request_header_mode": "SEND",
        "response_header_mode": "SKIP",
        "request_body_mode": "BUFFERED",
        "response_body_mode": "NONE",
        "request_trailer_mode": "SKIP",
        "response_trailer_mode": "SEND",
    }
    assert "body_format" not in hcm(boot)["local_reply_config"]  # router bodies pass untouched


@needs_envoy
def test_several_extproc_endpoints_and_hostnames(tmp_path: Path) -> None:
    boot = render_bootstrap(
        GatewayValues(),
        listen_host="0.0.0.0",
        listen_port=10080,
        admin_port=19000,
        extproc_endpoints=[("10.0.0.5", 50052), ("10.0.0.6", 50053), ("10.0.0.7", 50054)],
        router_http=("router", 8080),
    )
    envoy_validate(boot, tmp_path)
    xp = cluster(boot, "extproc")
    assert xp["type"] == "STATIC"
    assert xp["lb_policy"] == "ROUND_ROBIN"
    endpoints = xp["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"] for e in endpoints] == [
        {"address": "10.0.0.5", "port_value": 50052},
        {"address": "10.0.0.6", "port_value": 50053},
        {"address": "10.0.0.7", "port_value": 50054},
    ]
    options = xp["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert options["explicit_http_config"] == {"http2_protocol_options": {}}
    assert xp["circuit_breakers"]["thresholds"][0]["max_requests"] >= 100_000
    router_http = cluster(boot, "extproc_router_http")
    assert router_http["type"] == "STRICT_DNS"  # a name, not an IP
    assert listener(boot)["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 10080}
    assert boot["admin"]["address"]["socket_address"]["port_value"] == 19000


# --------------------------------------------------------------------------------------------- values


def gw(**policies: Any) -> dict[str, Any]:
    return {"gateway": policies}


CTP, BTP, EPP = "gateway.clientTrafficPolicy", "gateway.backendTrafficPolicy", "gateway.envoyPatchPolicy"


@pytest.mark.parametrize(
    ("data", "key", "problem"),
    [
        (gw(clientTrafficPolicy={"connection": {"bufferLimit": "abc"}}), f"{CTP}.connection.bufferLimit", "positive"),
        (gw(clientTrafficPolicy={"connection": {"bufferLimit": True}}), f"{CTP}.connection.bufferLimit", "positive"),
        (gw(clientTrafficPolicy={"connection": {"bufferLimit": 0}}), f"{CTP}.connection.bufferLimit", "positive"),
        (gw(clientTrafficPolicy={"connection": {"bufferLimit": 1.5}}), f"{CTP}.connection.bufferLimit", "positive"),
        (gw(clientTrafficPolicy={"connection": {"bufferLimit": 2**32}}), f"{CTP}.connection.bufferLimit", "at most"),
        (
            gw(clientTrafficPolicy={"connection": {"connectionLimit": {"value": -1}}}),
            f"{CTP}.connection.connectionLimit.value",
            "positive",
        ),
        (
            gw(clientTrafficPolicy={"http2": {"maxConcurrentStreams": 0}}),
            f"{CTP}.http2.maxConcurrentStreams",
            "positive",
        ),
        (
            gw(backendTrafficPolicy={"circuitBreaker": {"maxConnections": -5}}),
            f"{BTP}.circuitBreaker.maxConnections",
            "positive",
        ),
        (
            gw(backendTrafficPolicy={"circuitBreaker": {"maxRequestsPerConnection": "10"}}),
            f"{BTP}.circuitBreaker.maxRequestsPerConnection",
            "positive",
        ),
        (
            gw(backendTrafficPolicy={"http2": {"maxConcurrentStreams": 2**31}}),
            f"{BTP}.http2.maxConcurrentStreams",
            "at most",
        ),
        (
            gw(envoyPatchPolicy={"circuitBreakers": {"maxRequests": 0}}),
            f"{EPP}.circuitBreakers.maxRequests",
            "positive",
        ),
        (gw(envoyPatchPolicy={"route": {"timeout": "2 minutes"}}), f"{EPP}.route.timeout", "duration"),
        (gw(envoyPatchPolicy={"route": {"timeout": "1d"}}), f"{EPP}.route.timeout", "duration"),
        (gw(envoyPatchPolicy={"route": {"timeout": "-5s"}}), f"{EPP}.route.timeout", "duration"),
        (gw(envoyPatchPolicy={"route": {"timeout": -5}}), f"{EPP}.route.timeout", "negative"),
        (gw(envoyPatchPolicy={"route": {"timeout": 1.5}}), f"{EPP}.route.timeout", "duration"),
        (gw(envoyPatchPolicy={"route": {"timeout": ""}}), f"{EPP}.route.timeout", "duration"),
        (gw(envoyPatchPolicy={"route": {"timeout": True}}), f"{EPP}.route.timeout", "duration"),
        (gw(envoyPatchPolicy={"route": {"connectTimeout": "0s"}}), f"{EPP}.route.connectTimeout", "positive"),
        (gw(envoyPatchPolicy={"route": {"connectTimeout": "10y"}}), f"{EPP}.route.connectTimeout", "duration"),
        # unknown keys: named, with the allowed keys at that level
        (
            gw(clientTrafficPolicy={"connection": {"bufferLimt": 1}}),
            f"{CTP}.connection.bufferLimt",
            "did you mean 'bufferLimit'?); allowed here: bufferLimit, connectionLimit",
        ),
        (gw(backendTrafficPolicy={"retries": {}}), f"{BTP}.retries", "allowed here: circuitBreaker, http2"),
        (
            gw(envoyPatchPolicy={"circuitBreakers": {"maxRetries": 3}}),
            f"{EPP}.circuitBreakers.maxRetries",
            "allowed here: maxConnections, maxRequests, maxPendingRequests",
        ),
        (gw(clientTraficPolicy={}), "gateway.clientTraficPolicy", "did you mean 'clientTrafficPolicy'"),
        # wrong shapes
        (gw(clientTrafficPolicy={"connection": 5}), f"{CTP}.connection", "expected a mapping"),
        ({"gateway": "on"}, "gateway", "expected a mapping"),
    ],
)
def test_bad_values_name_the_key(data: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(ValuesError) as err:
        load_values(data)
    assert str(err.value).startswith(f"{key}: ")
    assert problem in str(err.value)
    assert err.value.path == key


def test_bad_value_message_is_exact() -> None:
    with pytest.raises(ValuesError) as err:
        load_values(gw(clientTrafficPolicy={"connection": {"bufferLimit": "abc"}}))
    assert str(err.value) == (
        "gateway.clientTrafficPolicy.connection.bufferLimit: expected a positive integer, got 'abc'"
    )


def test_nulls_and_foreign_keys_keep_defaults() -> None:
    data = {
        "gatewayPlugin": {"image": "x"},
        "gateway": {
            "enabled": True,  # other gateway.* chart keys are not ours
            "clientTrafficPolicy": None,
            "backendTrafficPolicy": {"circuitBreaker": None},
            "envoyPatchPolicy": {"route": {"timeout": None}},
        },
    }
    assert load_values(data) == GatewayValues()
    assert load_values({}) == GatewayValues()
    assert load_values(gw(clientTrafficPolicy={"connection": {"connectionLimit": None}})).connection_limit is None


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # patch policy set explicitly -> it wins over an explicit backend policy
        (
            gw(
                backendTrafficPolicy={"circuitBreaker": {"maxConnections": 10, "maxParallelRequests": 20}},
                envoyPatchPolicy={"circuitBreakers": {"maxConnections": 30, "maxRequests": 40}},
            ),
            (30, 40, 1024),
        ),
        # patch policy left at its defaults -> the explicit backend policy stays
        (gw(backendTrafficPolicy={"circuitBreaker": {"maxConnections": 10, "maxPendingRequests": 5}}), (10, 1024, 5)),
        # an explicit patch value equal to the default still wins
        (
            gw(
                backendTrafficPolicy={"circuitBreaker": {"maxParallelRequests": 7}},
                envoyPatchPolicy={"circuitBreakers": {"maxRequests": 1024}},
            ),
            (1024, 1024, 1024),
        ),
        # only the patch policy set
        (gw(envoyPatchPolicy={"circuitBreakers": {"maxPendingRequests": 3}}), (1024, 1024, 3)),
    ],
)
def test_patch_policy_precedence(data: dict[str, Any], expected: tuple[int, int, int]) -> None:
    values = load_values(data)
    assert (values.pod_max_connections, values.pod_max_requests, values.pod_max_pending_requests) == expected
    thresholds = pod_thresholds(render_bootstrap(values))
    assert (thresholds["max_connections"], thresholds["max_requests"], thresholds["max_pending_requests"]) == expected


@pytest.mark.parametrize(
    ("raw", "seconds", "rendered"),
    [
        ("120s", 120, "120s"),
        ("2m", 120, "120s"),
        ("1h30m", 5400, "5400s"),
        ("1.5s", 1.5, "1.5s"),
        ("500ms", 0.5, "0.5s"),
        ("250us", 0.00025, "0.00025s"),
        (".5m", 30, "30s"),
        (90, 90, "90s"),
        ("0", 0, "0s"),
        (0, 0, "0s"),
    ],
)
def test_durations(raw: Any, seconds: float, rendered: str) -> None:
    assert parse_duration(raw) == timedelta(seconds=seconds)
    values = load_values(gw(envoyPatchPolicy={"route": {"timeout": raw}}))
    assert route(render_bootstrap(values), "pods")["route"]["timeout"] == rendered


# --------------------------------------------------------------------------------------------- CLI


def cli_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    cli.register(sub)
    return parser.parse_args(["envoy-config", *argv])


def test_cli_prints_yaml_with_values_and_endpoints(tmp_path: Path) -> None:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(FULL_VALUES))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "extproc_router.envoyconfig",
            "-f",
            str(values_file),
            "--listen",
            "127.0.0.1:10080",
            "--admin-port",
            "19001",
            "--extproc",
            "127.0.0.1:50052",
            "--extproc",
            "127.0.0.1:50053",
            "--router-http",
            "127.0.0.1:18080",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    boot = yaml.safe_load(done.stdout)
    assert listener(boot)["address"]["socket_address"]["port_value"] == 10080
    assert boot["admin"]["address"]["socket_address"]["port_value"] == 19001
    assert listener(boot)["per_connection_buffer_limit_bytes"] == 9 * MIB
    ports = [
        e["endpoint"]["address"]["socket_address"]["port_value"]
        for e in cluster(boot, "extproc")["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]
    assert ports == [50052, 50053]
    assert boot == render_bootstrap(
        load_values(FULL_VALUES),
        listen_port=10080,
        admin_port=19001,
        extproc_endpoints=[("127.0.0.1", 50052), ("127.0.0.1", 50053)],
        router_http=("127.0.0.1", 18080),
    )


def test_cli_exits_2_on_bad_values(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "values.yaml"
    bad.write_text("gateway:\n  envoyPatchPolicy:\n    route:\n      timeout: soon\n")
    assert cli.run(cli_args("-f", str(bad))) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "gateway.envoyPatchPolicy.route.timeout" in err
    assert "'soon'" in err

    bad.write_text("gateway: [unclosed\n")
    assert cli.run(cli_args("-f", str(bad))) == 2
    assert "not valid YAML" in capsys.readouterr().err

    assert cli.run(cli_args("-f", str(tmp_path / "missing.yaml"))) == 2
    assert "cannot read" in capsys.readouterr().err


def test_extproc_router_envoy_config_subcommand(tmp_path: Path) -> None:
    bad = tmp_path / "values.yaml"
    bad.write_text("gateway:\n  clientTrafficPolicy:\n    connection:\n      bufferLimit: -1\n")
    done = subprocess.run(
        [sys.executable, "-m", "extproc_router", "envoy-config", "-f", str(bad)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert "gateway.clientTrafficPolicy.connection.bufferLimit: expected a positive integer, got -1" in done.stderr


def test_cli_writes_output_file(tmp_path: Path) -> None:
    out = tmp_path / "envoy.yaml"
    assert cli.run(cli_args("-o", str(out))) == 0
    assert yaml.safe_load(out.read_text()) == render_bootstrap(GatewayValues())


@pytest.mark.parametrize("bad", ["8888", "host:", "host:0", "host:70000", ":80"])
def test_cli_rejects_bad_host_port(bad: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_args("--listen", bad)
    assert exit_info.value.code == 2


# --------------------------------------------------------------------------------------------- live Envoy


@contextlib.asynccontextmanager
async def serve_app(app: web.Application) -> AsyncIterator[int]:
    """Run an aiohttp app on a free 127.0.0.1 port; yield the port."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def running_envoy(tmp_path: Path, **render_kw: Any) -> AsyncIterator[str]:
    """Start real Envoy on free ports with the rendered bootstrap; yield its base URL."""
    listen_port, admin_port = free_port(), free_port()
    cfg = tmp_path / f"envoy-{listen_port}.yaml"
    cfg.write_text(
        to_yaml(render_bootstrap(GatewayValues(), listen_port=listen_port, admin_port=admin_port, **render_kw))
    )
    log = tmp_path / f"envoy-{listen_port}.log"
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [str(ENVOY), "-c", str(cfg), "--disable-hot-restart", "--concurrency", "1", "-l", "warning"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 15
        async with aiohttp.ClientSession() as session:
            while True:
                assert proc.poll() is None, f"Envoy exited: {log.read_text()}"
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(f"http://127.0.0.1:{admin_port}/ready") as ready:
                        if ready.status == 200:
                            break
                assert time.monotonic() < deadline, f"Envoy not ready: {log.read_text()}"
                await asyncio.sleep(0.05)
        yield f"http://127.0.0.1:{listen_port}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


MODELS = {"object": "list", "data": [{"id": "m1", "object": "model", "created": 0, "owned_by": "aibrix"}]}


async def models_app_and_trap() -> tuple[web.Application, list[str]]:
    """The router's HTTP server stand-in; any other path is a trap that records its hits."""
    hits: list[str] = []

    async def models(_request: web.Request) -> web.Response:
        return web.json_response(MODELS)

    async def trap(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"reached": "backend"})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_route("*", "/{tail:.*}", trap)
    return app, hits


@needs_envoy
async def test_live_router_down_gives_openai_error_and_models_still_served(tmp_path: Path) -> None:
    app, hits = await models_app_and_trap()
    async with serve_app(app) as backend_port:
        dead_port = free_port()  # nothing listens here: the router is down
        async with (
            running_envoy(
                tmp_path, extproc_endpoints=[("127.0.0.1", dead_port)], router_http=("127.0.0.1", backend_port)
            ) as url,
            aiohttp.ClientSession() as session,
        ):
            # (a) Envoy's own empty 500 becomes an OpenAI-shaped, retryable 503; a client-supplied
            # target-pod pointing at a live server does not get the request through either.
            async with session.post(
                f"{url}/v1/chat/completions",
                json={"model": "m1", "messages": [{"role": "user", "content": "hi"}]},
                headers={"target-pod": f"127.0.0.1:{backend_port}"},
            ) as resp:
                assert resp.status == 503
                assert resp.headers["content-type"] == "application/json"
                body = await resp.json()
            assert body == {
                "error": {
                    "message": "The routing service is unavailable; retry shortly.",
                    "type": "overloaded_error",
                    "param": None,
                    "code": "routing_unavailable",
                }
            }
            # (b) the model list bypasses ext_proc and reaches the router's HTTP server
            async with session.get(f"{url}/v1/models") as resp:
                assert resp.status == 200
                assert await resp.json() == MODELS
            assert hits == []


class FakeRouter(ep_grpc.ExternalProcessorServicer):
    """A minimal router for the BUFFERED body mode the bootstrap uses: answers the headers at once,
    routes in its answer to the buffered body, records decisions as dynamic metadata."""

    def __init__(self, pod: str) -> None:
        self.pod = pod
        self.seen_target_pod: list[str | None] = []
        self.stream_ends: list[float] = []

    async def Process(self, requests: Any, context: Any) -> AsyncIterator[ep.ProcessingResponse]:
        headers: dict[str, str] = {}
        try:
            async for req in requests:
                kind = req.WhichOneof("request")
                if kind == "request_headers":
                    headers = {h.key: h.raw_value.decode() for h in req.request_headers.headers.headers}
                    self.seen_target_pod.append(headers.get("target-pod"))
                    if headers.get("x-test") == "immediate":
                        yield immediate_error()
                        return
                    if req.request_headers.end_of_stream:
                        yield self.decision()
                    else:
                        yield ep.ProcessingResponse(request_headers=ep.HeadersResponse())
                elif kind == "request_body":
                    yield self.decision(phase="request_body")
                elif kind == "response_trailers":
                    yield ep.ProcessingResponse(response_trailers=ep.TrailersResponse())
        finally:
            self.stream_ends.append(time.monotonic())

    def decision(self, phase: str = "request_headers") -> ep.ProcessingResponse:
        metadata = struct_pb2.Struct()
        metadata.update(
            {
                METADATA_NAMESPACE: {"target-pod": "pod-a", "target-pod-ip": self.pod, "routing-strategy": ""},
                "other-namespace": {"x": "y"},
            }
        )
        target = base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key="target-pod", raw_value=self.pod.encode()),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
        )
        mutation = ep.CommonResponse(header_mutation=ep.HeaderMutation(set_headers=[target]))
        if phase == "request_body":
            return ep.ProcessingResponse(request_body=ep.BodyResponse(response=mutation), dynamic_metadata=metadata)
        return ep.ProcessingResponse(request_headers=ep.HeadersResponse(response=mutation), dynamic_metadata=metadata)


ROUTER_ERROR = {"error": {"message": "no ready pod", "type": "overloaded_error", "param": None, "code": None}}


def immediate_error() -> ep.ProcessingResponse:
    content_type = base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key="content-type", raw_value=b"application/json")
    )
    return ep.ProcessingResponse(
        immediate_response=ep.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=503),
            headers=ep.HeaderMutation(set_headers=[content_type]),
            body=orjson.dumps(ROUTER_ERROR),
            details="extproc_router_routing",
        )
    )


@needs_envoy
async def test_live_decisions_echoed_and_router_errors_untouched(tmp_path: Path) -> None:
    received: list[float] = []

    async def pod(request: web.Request) -> web.Response:
        received.append(time.monotonic())
        await request.read()
        await asyncio.sleep(0.3)  # the ext_proc stream must outlive this
        return web.json_response({"target": request.headers.get("target-pod")})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", pod)
    async with serve_app(app) as pod_port:
        router = FakeRouter(f"127.0.0.1:{pod_port}")
        server = grpc.aio.server()
        ep_grpc.add_ExternalProcessorServicer_to_server(router, server)
        grpc_port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with (
                running_envoy(tmp_path, extproc_endpoints=[("127.0.0.1", grpc_port)]) as url,
                aiohttp.ClientSession() as session,
            ):
                async with session.post(
                    f"{url}/v1/chat/completions", json={"model": "m1"}, headers={"target-pod": "10.9.9.9:1"}
                ) as resp:
                    assert resp.status == 200
                    assert await resp.json() == {"target": f"127.0.0.1:{pod_port}"}
                    assert resp.headers["target-pod"] == "pod-a"
                    assert resp.headers["target-pod-ip"] == f"127.0.0.1:{pod_port}"
                    # a missing key, and a key set to "", add no header at all (not an empty one)
                    for name in RESPONSE_ECHO_HEADERS[2:]:
                        assert name not in resp.headers, name
                # the client's target-pod never reached the router (removed before any filter)
                assert router.seen_target_pod == [None]
                # the gRPC stream stayed open until the response was complete
                await asyncio.sleep(0.1)
                assert router.stream_ends[0] - received[0] >= 0.25

                async with session.post(f"{url}/v1/completions", json={}, headers={"x-test": "immediate"}) as resp:
                    assert resp.status == 503
                    assert await resp.read() == orjson.dumps(ROUTER_ERROR)  # not rewritten by a mapper
        finally:
            await server.stop(None)
