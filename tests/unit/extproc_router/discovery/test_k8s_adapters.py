"""AIBrix ModelAdapters in Kubernetes discovery (extproc_router/discovery/kubernetes.py): listed and
watched with the pods' machinery against the fake API server of test_k8s_discovery, which serves them
as a second collection; an adapter is served by the pods its status.instances names. Without the CRD
(404) or the permission (403) discovery works as before and checks again later."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

from extproc_router.discovery.kubernetes import (
    ADAPTER_GROUP,
    ADAPTER_PLURAL,
    ADAPTER_VERSION,
    KubernetesDiscovery,
    adapter_from_object,
)
from tests.unit.extproc_router.discovery.test_k8s_discovery import FakeKubeApi, Published, make_pod


def make_adapter(name: str, instances: list[str], *, ns: str = "default", base: str | None = "demo-model",
                 phase: str = "Running") -> dict[str, Any]:
    """A ModelAdapter as the API server serialises it (model.aibrix.ai/v1alpha1)."""
    spec: dict[str, Any] = {"podSelector": {"matchLabels": {"model.aibrix.ai/name": "demo-model"}},
                            "artifactURL": f"huggingface://org/{name}"}
    if base:
        spec["baseModel"] = base
    return {"apiVersion": f"{ADAPTER_GROUP}/{ADAPTER_VERSION}", "kind": "ModelAdapter",
            "metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}"}, "spec": spec,
            "status": {"phase": phase, "instances": instances, "readyReplicas": len(instances)}}


class FakeKubeApiWithAdapters(FakeKubeApi):
    """The fake pods API plus `modeladapters.model.aibrix.ai` (a second collection with its own history),
    which can be uninstalled (404) or forbidden (403)."""

    def __init__(self) -> None:
        super().__init__()
        self.adapters = FakeKubeApi()
        self.adapter_status = 200  # 404: no CRD; 403: no permission

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_get("/api/v1/pods", self._pods)
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self._pods)
        base = f"/apis/{ADAPTER_GROUP}/{ADAPTER_VERSION}"
        app.router.add_get(f"{base}/{ADAPTER_PLURAL}", self._adapters)
        app.router.add_get(f"{base}/namespaces/{{ns}}/{ADAPTER_PLURAL}", self._adapters)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        self.adapters.end_watches()
        await super().stop()

    async def _adapters(self, request: web.Request) -> web.StreamResponse:
        if self.adapter_status == 404:
            return web.json_response(self._status(404, "NotFound", "the server could not find the requested resource"),
                                     status=404)
        if self.adapter_status == 403:
            return web.json_response(self._status(403, "Forbidden", "modeladapters.model.aibrix.ai is forbidden"),
                                     status=403)
        return await self.adapters._pods(request)


@contextlib.asynccontextmanager
async def running(tmp_path: Path, api: FakeKubeApiWithAdapters, **kw: Any) -> AsyncIterator[
        tuple[KubernetesDiscovery, Published]]:
    published = Published()
    disc = KubernetesDiscovery(published, kubeconfig=api.kubeconfig(tmp_path / "kubeconfig"),
                               watch_timeout=lambda: 30, backoff=(0.02, 0.1), **kw)
    await disc.start()
    try:
        yield disc, published
    finally:
        await disc.stop()


@contextlib.asynccontextmanager
async def fake_api() -> AsyncIterator[FakeKubeApiWithAdapters]:
    api = FakeKubeApiWithAdapters()
    await api.start()
    try:
        yield api
    finally:
        await api.stop()


def served(pub: Published, adapter: str) -> list[str] | None:
    """Names of the ready pods serving `adapter` in the latest snapshot; None when it is not served."""
    entry = pub.last.model(adapter) if pub.snapshots else None
    return None if entry is None else [p.name for p in entry.ready]


def test_model_adapter_translation() -> None:
    a = adapter_from_object(make_adapter("sql", ["demo-0", "demo-1", "demo-0", ""]))
    assert a is not None and (a.name, a.namespace, a.base_model) == ("sql", "default", "demo-model")
    assert a.instances == ("demo-0", "demo-1") and a.pod_keys() == ["default/demo-0", "default/demo-1"]
    bare = adapter_from_object({"metadata": {"name": "x", "namespace": "team"}, "status": {"instances": "oops"}})
    assert bare is not None and bare.instances == () and bare.base_model is None
    assert adapter_from_object({"metadata": {}}) is None


async def test_adapters_follow_their_instances(tmp_path: Path) -> None:
    async with fake_api() as api:
        for i in range(3):
            api.put(make_pod(f"demo-{i}", ip=f"127.0.10.{i + 1}", ready=i != 2))
        api.adapters.put(make_adapter("sql", ["demo-0"]))
        api.adapters.put(make_adapter("other-ns", ["demo-0"], ns="team"))  # names a pod of its own namespace
        async with running(tmp_path, api) as (disc, pub):
            assert disc.ready
            assert served(pub, "sql") == ["demo-0"] and served(pub, "other-ns") is None
            assert pub.last.model("sql").parent == "demo-model"
            api.adapters.put(make_adapter("sql", ["demo-0", "demo-1", "demo-2"]))  # loaded on more pods
            await pub.until(lambda: served(pub, "sql") == ["demo-0", "demo-1"])  # demo-2 is not Ready
            api.put(make_pod("demo-2", ip="127.0.10.3"))
            await pub.until(lambda: served(pub, "sql") == ["demo-0", "demo-1", "demo-2"])
            api.adapters.put(make_adapter("chat", ["demo-1"]))
            await pub.until(lambda: served(pub, "chat") == ["demo-1"])
            api.adapters.delete("default", "sql")
            await pub.until(lambda: served(pub, "sql") is None)
            assert served(pub, "chat") == ["demo-1"] and pub.last.model_names() == ["demo-model"]
            # 410 Gone for the adapters' watch: a relist replaces them, as for pods.
            await api.adapters.watching()
            api.adapters.silently(lambda: (api.adapters.delete("default", "chat"),
                                           api.adapters.put(make_adapter("new", ["demo-2"]))))
            api.adapters.end_watches()
            await pub.until(lambda: served(pub, "chat") is None and served(pub, "new") == ["demo-2"])
        paths = {p for p, _ in api.adapters.requests}
        assert paths == {f"/apis/{ADAPTER_GROUP}/{ADAPTER_VERSION}/{ADAPTER_PLURAL}"}


async def test_named_namespaces_watch_their_adapters(tmp_path: Path) -> None:
    async with fake_api() as api:
        api.put(make_pod("demo-0", ns="team", ip="127.0.10.1"))
        api.adapters.put(make_adapter("sql", ["demo-0"], ns="team"))
        async with running(tmp_path, api, namespaces=["team"]) as (_, pub):
            assert served(pub, "sql") == ["demo-0"]
        assert {p for p, _ in api.adapters.requests} == {
            f"/apis/{ADAPTER_GROUP}/{ADAPTER_VERSION}/namespaces/team/{ADAPTER_PLURAL}"}


async def test_no_crd_or_no_permission_is_no_error(tmp_path: Path) -> None:
    for status in (404, 403):
        async with fake_api() as api:
            api.adapter_status = status
            api.put(make_pod("demo-0", ip="127.0.10.1"))
            api.adapters.put(make_adapter("sql", ["demo-0"]))
            async with running(tmp_path, api, adapter_absent_recheck=0.1) as (disc, pub):
                assert disc.ready and [p.name for p in pub.last.model("demo-model").ready] == ["demo-0"]
                assert served(pub, "sql") is None
                await asyncio.sleep(0.15)
                assert disc.ready
                api.adapter_status = 200  # the CRD gets installed (or the RBAC fixed): picked up at the recheck
                await pub.until(lambda: served(pub, "sql") == ["demo-0"])
                api.adapter_status = status  # and removed again: its adapters go with it
                api.adapters.end_watches()
                await pub.until(lambda: served(pub, "sql") is None)


async def test_adapters_can_be_left_out(tmp_path: Path) -> None:
    async with fake_api() as api:
        api.put(make_pod("demo-0", ip="127.0.10.1"))
        api.adapters.put(make_adapter("sql", ["demo-0"]))
        async with running(tmp_path, api, model_adapters=False) as (_, pub):
            assert served(pub, "sql") is None
        assert not api.adapters.requests
        assert json.loads(json.dumps(pub.last.pod_adapters)) == {}
