"""InferencePool discovery (`serve --discovery kubernetes --inference-pool NAME`) against the fake API
server of test_k8s_discovery, which serves the InferencePools as a second collection: the pods the
pool's selector picks, in its namespace, are routable at IP:targetPort; the snapshot's default entry
takes every model name it does not know (a GIE gateway sends its picker only the pool's requests);
a selector change re-evaluates the pods; the pool going away leaves nothing to route to (503)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from extproc_router.discovery.kubernetes import (
    POOL_API_VERSIONS,
    POOL_PLURAL,
    KubernetesDiscovery,
    member_from_object,
    pool_from_object,
)
from extproc_router.discovery.static_file import DiscoveryError
from routing.errors import RoutingError
from routing.pods import LABEL_MODEL, PodSnapshot
from routing.request import parse_body
from routing.router import Router
from tests.unit.extproc_router.discovery.test_k8s_discovery import FakeKubeApi, Published, make_pod

POOL = "vllm-pool"


def make_pool(name: str = POOL, *, ns: str = "default", selector: dict[str, str] | None = None,
              port: int = 8000, version: str = "v1") -> dict[str, Any]:
    """An InferencePool as the API server serialises it, in the v1 or the v1alpha2 shape."""
    selector = {"app": "vllm"} if selector is None else selector
    group, ver = POOL_API_VERSIONS[version]
    if version == "v1":
        spec: dict[str, Any] = {"selector": {"matchLabels": selector}, "targetPorts": [{"number": port}],
                                "endpointPickerRef": {"name": "picker", "portNumber": 9002}}
    else:
        spec = {"selector": selector, "targetPortNumber": port, "extensionRef": {"name": "picker"}}
    return {"apiVersion": f"{group}/{ver}", "kind": "InferencePool",
            "metadata": {"name": name, "namespace": ns, "uid": f"uid-{ns}-{name}"}, "spec": spec}


def pool_pod(name: str, *, app: str = "vllm", model: str | None = None, **kw: Any) -> dict[str, Any]:
    """A pod with only the labels a GIE deployment gives it (`app`), and a model label when asked."""
    return make_pod(name, model=model, labels={"app": app}, **kw)


class FakeKubeApiWithPools(FakeKubeApi):
    """The fake pods API plus `inferencepools` of both API versions (each its own collection)."""

    def __init__(self) -> None:
        super().__init__()
        self.pools = {v: FakeKubeApi() for v in POOL_API_VERSIONS}
        self.pool_status = 200  # 404: no CRD
        self.pool_delay = 0.0  # seconds before a pool answer: orders it after the pods' list

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self._pods)
        for version, (group, ver) in POOL_API_VERSIONS.items():
            app.router.add_get(f"/apis/{group}/{ver}/namespaces/{{ns}}/{POOL_PLURAL}", self._pool_handler(version))
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        for pools in self.pools.values():
            pools.end_watches()
        await super().stop()

    def _pool_handler(self, version: str) -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            if self.pool_delay:
                await asyncio.sleep(self.pool_delay)
            if self.pool_status == 404:
                return web.json_response(self._status(404, "NotFound", "the server could not find the requested "
                                                                       "resource"), status=404)
            return await self.pools[version]._pods(request)
        return handle


@contextlib.asynccontextmanager
async def fake_api() -> AsyncIterator[FakeKubeApiWithPools]:
    api = FakeKubeApiWithPools()
    await api.start()
    try:
        yield api
    finally:
        await api.stop()


@contextlib.asynccontextmanager
async def running(tmp_path: Path, api: FakeKubeApiWithPools, **kw: Any) -> AsyncIterator[
        tuple[KubernetesDiscovery, Published]]:
    published = Published()
    kw.setdefault("inference_pool", POOL)
    disc = KubernetesDiscovery(published, kubeconfig=api.kubeconfig(tmp_path / "kubeconfig"), watch_timeout=lambda: 30,
                               backoff=(0.02, 0.1), model_adapters=False, **kw)
    await disc.start()
    try:
        yield disc, published
    finally:
        await disc.stop()


def pool_view(pub: Published) -> tuple[list[str], list[str]] | None:
    """(addresses of all, names of the ready) pods of the latest snapshot's default entry."""
    entry = pub.last.default if pub.snapshots else None
    return None if entry is None else ([p.address for p in entry.pods], [p.name for p in entry.ready])


def route(snapshot: PodSnapshot, model: str) -> str:
    """The address a router with `snapshot` picks for a chat request naming `model`."""
    router = Router()
    router.update_snapshot(snapshot)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
    decision = router.decide(parse_body("/v1/chat/completions", body, "application/json"), "random")
    router.release(decision)
    return decision.pod.address


def test_pool_translation_reads_v1_and_v1alpha2() -> None:
    for version in POOL_API_VERSIONS:
        pool = pool_from_object(make_pool(selector={"app": "vllm", "tier": "a"}, port=8100, version=version))
        assert pool is not None and (pool.name, pool.namespace, pool.port) == (POOL, "default", 8100)
        assert pool.selects({"app": "vllm", "tier": "a", "x": "y"}) and not pool.selects({"app": "vllm"})
    assert pool_from_object(make_pool(port=0)).port is None  # type: ignore[union-attr]
    empty = pool_from_object({"metadata": {"name": "p"}, "spec": {"selector": {}}})
    assert empty is not None and empty.port is None and not empty.selects({"app": "vllm"})  # selects nothing
    assert pool_from_object({"metadata": {}}) is None
    m = member_from_object(pool_pod("a", ip="fd00::7"))
    assert m is not None and m.routable and m.pod("p", 8000).address == "[fd00::7]:8000"  # type: ignore[union-attr]
    assert member_from_object(pool_pod("b", ready=False)).reason == "not Ready"  # type: ignore[union-attr]


async def test_pool_pods_on_the_target_port_and_selector_changes(tmp_path: Path) -> None:
    async with fake_api() as api:
        api.pools["v1"].put(make_pool())
        api.pools["v1"].put(make_pool("other-pool", selector={"app": "other"}))  # not ours
        api.put(pool_pod("a", ip="127.0.10.1"))
        api.put(pool_pod("b", ip="127.0.10.2", ready=False))
        api.put(pool_pod("c", ip="127.0.10.3", model="llama"))  # its model label names its model
        api.put(pool_pod("d", ip="127.0.10.4", app="other"))  # not selected
        api.put(pool_pod("e", ip="127.0.10.5", ns="team"))  # another namespace
        api.put(pool_pod("f", ip=None))  # selected, no IP yet
        async with running(tmp_path, api) as (disc, pub):
            assert disc.ready
            assert pool_view(pub) == (["127.0.10.1:8000", "127.0.10.2:8000", "127.0.10.3:8000"], ["a", "c"])
            assert pub.last.default is not None and pub.last.default.name == POOL
            assert pub.view() == {POOL: (["default/a", "default/b"], ["default/a"]),
                                  "llama": (["default/c"], ["default/c"])}
            # A model name nobody serves goes to the pool; a known one to its own pods.
            assert {route(pub.last, "meta-llama/whatever") for _ in range(20)} == {"127.0.10.1:8000",
                                                                                   "127.0.10.3:8000"}
            assert route(pub.last, "llama") == "127.0.10.3:8000"
            assert route(pub.last, POOL) == "127.0.10.1:8000"
            api.put(pool_pod("b", ip="127.0.10.2"))  # becomes Ready
            await pub.until(lambda: pool_view(pub) == (
                ["127.0.10.1:8000", "127.0.10.2:8000", "127.0.10.3:8000"], ["a", "b", "c"]))
            # The selector (and the port) change: the pods are selected again from what is known.
            api.pools["v1"].put(make_pool(selector={"app": "other"}, port=9000))
            await pub.until(lambda: pool_view(pub) == (["127.0.10.4:9000"], ["d"]))
            assert pub.view() == {POOL: (["default/d"], ["default/d"])}
            api.put(pool_pod("g", ip="127.0.10.6", app="other"))  # a new pod matching the new selector
            await pub.until(lambda: pool_view(pub) == (["127.0.10.4:9000", "127.0.10.6:9000"], ["d", "g"]))
            api.put(pool_pod("d", ip="127.0.10.4", app="vllm"))  # its labels change: it leaves the pool
            await pub.until(lambda: pool_view(pub) == (["127.0.10.6:9000"], ["g"]))
        pool_requests = api.pools["v1"].requests
        assert {p for p, _ in pool_requests} == {
            f"/apis/inference.networking.k8s.io/v1/namespaces/default/{POOL_PLURAL}"}
        assert {q.get("fieldSelector") for _, q in pool_requests} == {f"metadata.name={POOL}"}
        assert {p for p, _ in api.requests} == {"/api/v1/namespaces/default/pods"}


async def test_pool_removal_empties_the_snapshot(tmp_path: Path) -> None:
    async with fake_api() as api:
        api.pools["v1"].put(make_pool())
        api.put(pool_pod("a", ip="127.0.10.1"))
        async with running(tmp_path, api) as (_, pub):
            assert pool_view(pub) == (["127.0.10.1:8000"], ["a"])
            api.pools["v1"].delete("default", POOL)
            await pub.until(lambda: pool_view(pub) == ([], []))
            assert pub.last.models == {}
            with pytest.raises(RoutingError) as err:
                route(pub.last, "anything")
            assert err.value.status == 503
            api.pools["v1"].put(make_pool())  # created again
            await pub.until(lambda: pool_view(pub) == (["127.0.10.1:8000"], ["a"]))


@pytest.mark.parametrize("pool_delay", [0.0, 0.2])
async def test_no_pool_crd_is_no_pods(tmp_path: Path, pool_delay: float) -> None:
    """Ready with no pods, whichever answers first: the pods' list or the pool's 404 (once flaky:
    a 404 after the pods' list set `synced` without telling anyone, so discovery never got ready)."""
    async with fake_api() as api:
        api.pool_status = 404
        api.pool_delay = pool_delay
        api.put(pool_pod("a", ip="127.0.10.1"))
        async with running(tmp_path, api, pool_absent_recheck=0.1) as (disc, pub):
            assert disc.ready and pool_view(pub) == ([], [])
            api.pools["v1"].put(make_pool())
            api.pool_status, api.pool_delay = 200, 0.0  # the CRD gets installed: picked up at the recheck
            await pub.until(lambda: pool_view(pub) == (["127.0.10.1:8000"], ["a"]))


async def test_v1alpha2_pool_in_a_named_namespace(tmp_path: Path) -> None:
    async with fake_api() as api:
        api.pools["v1alpha2"].put(make_pool(ns="team", port=8100, version="v1alpha2"))
        api.put(pool_pod("a", ns="team", ip="127.0.10.1", model="llama"))
        api.put(pool_pod("b", ip="127.0.10.2"))  # the default namespace: not the pool's
        async with running(tmp_path, api, namespaces=["team"], inference_pool_version="v1alpha2") as (_, pub):
            assert pool_view(pub) == (["127.0.10.1:8100"], ["a"])
            assert pub.last.model_names() == ["llama"]
        assert {p for p, _ in api.pools["v1alpha2"].requests} == {
            f"/apis/inference.networking.x-k8s.io/v1alpha2/namespaces/team/{POOL_PLURAL}"}
        assert not api.pools["v1"].requests


def test_pool_mode_takes_one_namespace_and_other_modes_keep_the_404() -> None:
    with pytest.raises(DiscoveryError):
        KubernetesDiscovery(lambda _: None, namespaces=["a", "b"], inference_pool=POOL)
    assert KubernetesDiscovery(lambda _: None, inference_pool=POOL).namespaces == ("default",)
    plain = PodSnapshot.build([], set(), {"demo-model": None})
    assert plain.default is None
    with pytest.raises(RoutingError) as err:
        route(plain, "unknown-model")
    assert err.value.status == 404
    assert LABEL_MODEL == "model.aibrix.ai/name"
