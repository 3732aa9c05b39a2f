"""Everything a client can reach is authenticated or harmless, and every answer Envoy gives itself is
OpenAI-shaped JSON: through real Envoy and a real router with API keys configured."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from extproc_router.stack import LocalStack
from tests.conftest import CHAT, running_stack

KEY = "k-secret"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with running_stack(tmp_path_factory.mktemp("auth"), pods=1, ttft_ms=1.0, itl_ms=1.0,
                       file_extra={"auth": {"api_keys": [KEY]}}) as stack:
        yield stack


def _openai_error(body: bytes) -> dict:
    err = orjson.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


async def test_model_list_needs_the_key_through_envoy_and_on_the_router_port(keyed: LocalStack) -> None:
    bearer = {"authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession() as s:
        for base in (keyed.url, keyed.router_http):  # Envoy, and the router's own HTTP port
            async with s.get(base + "/v1/models") as resp:
                assert resp.status == 401, base
                assert _openai_error(await resp.read())["code"] == "invalid_api_key"
            async with s.get(base + "/v1/models", headers={"authorization": "Bearer wrong"}) as resp:
                assert resp.status == 401, base
            async with s.get(base + "/v1/models", headers=bearer) as resp:
                assert resp.status == 200, base
                assert [m["id"] for m in (await resp.json())["data"]] == ["demo-model"]
        async with s.post(keyed.url + "/v1/chat/completions", json=CHAT, headers=bearer) as resp:
            assert resp.status == 200


async def test_flush_cache_needs_the_key_and_probes_stay_open(keyed: LocalStack) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(keyed.router_http + "/flush_cache") as resp:
            assert resp.status == 401
        async with s.post(keyed.router_http + "/flush_cache", headers={"authorization": f"Bearer {KEY}"}) as resp:
            assert resp.status == 200 and "flushed_entries" in await resp.json()
        for path in ("/metrics", "/health", "/ready"):  # Prometheus and the kubelet carry no key
            async with s.get(keyed.router_http + path) as resp:
                assert resp.status == 200, path


async def _raw(stack: LocalStack, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes to Envoy's listener; the status, headers and body of its answer."""
    host, _, port = stack.url.removeprefix("http://").rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 5)
        return status, headers, body
    finally:
        writer.close()


@pytest.mark.parametrize(("request_bytes", "status", "code"), [
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nx-big: " + b"a" * 100_000 + b"\r\n\r\n", 431,
     "headers_too_large"),
    (b"GET /v1/models HTTP/1.0\r\n\r\n", 426, "upgrade_required"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400, "bad_http_request"),
])
async def test_envoys_own_codec_replies_are_openai_json(keyed: LocalStack, request_bytes: bytes, status: int,
                                                        code: str) -> None:
    got, headers, body = await _raw(keyed, request_bytes)
    assert got == status
    assert headers.get("content-type") == "application/json", headers
    assert _openai_error(body)["code"] == code


def test_kubernetes_manifests_limit_the_router_ports() -> None:
    import yaml

    root = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
    kustomization = yaml.safe_load((root / "kustomization.yaml").read_text())
    docs = [d for name in kustomization["resources"] for d in yaml.safe_load_all((root / name).read_text()) if d]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    name = "app.kubernetes.io/name"
    router = next(p for p in policies if p["spec"]["podSelector"]["matchLabels"].get(name) == "extproc-router")
    rules = router["spec"]["ingress"]
    grpc = [r for r in rules if any(p["port"] == 50052 for p in r["ports"])]
    assert grpc and all(peer["podSelector"]["matchLabels"][name] == "envoy"
                        for r in grpc for peer in r["from"]), grpc
    http = [r for r in rules if any(p["port"] == 8080 for p in r["ports"])]
    assert http and not any(peer == {} for r in rules for peer in r["from"]), rules  # no rule open to all
    redis = next(p for p in policies if p["spec"]["podSelector"]["matchLabels"].get(name) == "redis")
    (peer,) = redis["spec"]["ingress"][0]["from"]
    assert peer["podSelector"]["matchLabels"][name] == "extproc-router"
