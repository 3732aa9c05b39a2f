"""Kubernetes pod discovery against a local fake API server that speaks the real list/watch wire
format: paginated lists with a resourceVersion, watches as JSON lines from a resourceVersion,
BOOKMARK events, label-selector semantics (a pod leaving the selector is DELETED for the watcher),
and 410 Gone for a resourceVersion older than the server's history (as an ERROR event, the way the
API server answers watches, or as an HTTP status). The client is the real kubernetes-asyncio client,
configured from a kubeconfig file that points at the fake with a bearer token.

Pod IPs are loopback addresses: kubernetes discovery never connects to pods, but if it ever did,
the traffic would stay on this machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from extproc_router.discovery.kubernetes import KubernetesDiscovery, pod_from_object
from extproc_router.discovery.static_file import DiscoveryError
from extproc_router.stack import free_port
from routing.pods import ANNOTATION_CONFIG, LABEL_MODEL, LABEL_PORT, PodSnapshot

TOKEN = "test-token"


def make_pod(name: str, *, ns: str = "default", model: str | None = "demo-model", ip: str | None = "127.0.10.1",
             ready: bool = True, labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None,
             deleting: bool = False) -> dict[str, Any]:
    """A Pod object as the API server serialises it (only the fields discovery reads, plus a few)."""
    all_labels = {"app": name, **({LABEL_MODEL: model} if model else {}), **(labels or {})}
    meta: dict[str, Any] = {"name": name, "namespace": ns, "uid": f"uid-{ns}-{name}", "labels": all_labels}
    if annotations:
        meta["annotations"] = annotations
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    status: dict[str, Any] = {"phase": "Running" if ip else "Pending",
                              "conditions": [{"type": "PodScheduled", "status": "True"},
                                             {"type": "Ready", "status": "True" if ready else "False"}]}
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    return {"kind": "Pod", "apiVersion": "v1", "metadata": meta, "spec": {"containers": [{"name": "c"}]},
            "status": status}


def _matches(obj: dict[str, Any] | None, selector: str | None) -> bool:
    if obj is None:
        return False
    if not selector:
        return True
    # Only the "label exists" form is needed here; refuse anything else so a client change shows up.
    assert selector == LABEL_MODEL, f"unexpected labelSelector {selector!r}"
    return selector in (obj["metadata"].get("labels") or {})


@dataclass
class _Change:
    rv: int
    key: str
    old: dict[str, Any] | None
    new: dict[str, Any] | None  # None: deleted


@dataclass(eq=False)  # identity: kept in a set
class _Watcher:
    namespace: str | None
    selector: str | None
    bookmarks: bool
    queue: asyncio.Queue[dict[str, Any] | None] = field(default_factory=asyncio.Queue)


class FakeKubeApi:
    """The pods part of a kube-apiserver: list (with limit/continue), watch, bookmarks, 410 Gone."""

    def __init__(self, *, gone_as_http_status: bool = False) -> None:
        self.pods: dict[str, dict[str, Any]] = {}
        self.rv = 100
        self.history: list[_Change] = []
        self.oldest_rv = self.rv  # watches from an older resourceVersion get 410 Gone
        self.watchers: set[_Watcher] = set()
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.gone_as_http_status = gone_as_http_status
        self.runner: web.AppRunner | None = None
        self.port = 0

    # -- cluster changes ---------------------------------------------------------------------------
    def put(self, obj: dict[str, Any]) -> None:
        """Create or update a pod (ADDED / MODIFIED for the watchers whose selection it is in)."""
        obj = json.loads(json.dumps(obj))
        key = f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        old = self.pods.get(key)
        self.pods[key] = obj
        self._record(_Change(self.rv, key, old, obj))

    def delete(self, ns: str, name: str) -> None:
        key = f"{ns}/{name}"
        old = self.pods.pop(key)
        self.rv += 1
        self._record(_Change(self.rv, key, old, None))

    def silently(self, change: Callable[[], None]) -> None:
        """Apply a change that no watcher hears about and that history forgets (as after compaction)."""
        watchers, self.watchers = self.watchers, set()
        change()
        self.watchers = watchers
        self.compact()

    def compact(self) -> None:
        """Forget all history: every resourceVersion seen so far is now too old."""
        self.history.clear()
        self.oldest_rv = self.rv + 1

    def bookmark(self) -> None:
        self.rv += 1  # e.g. other objects changed; a bookmark tells the watcher it may skip ahead
        for w in self.watchers:
            if w.bookmarks:
                w.queue.put_nowait({"type": "BOOKMARK",
                                    "object": {"kind": "Pod", "apiVersion": "v1",
                                               "metadata": {"resourceVersion": str(self.rv)}}})

    async def watching(self, count: int = 1, timeout: float = 5.0) -> None:
        """Wait until `count` watches are open."""
        deadline = time.monotonic() + timeout
        while len(self.watchers) < count:
            assert time.monotonic() < deadline, f"{len(self.watchers)} watches open, expected {count}"
            await asyncio.sleep(0.01)

    def end_watches(self) -> None:
        """Close every open watch normally, as the server does when timeoutSeconds is reached."""
        for w in self.watchers:
            w.queue.put_nowait(None)

    def _record(self, change: _Change) -> None:
        self.history.append(change)
        for w in self.watchers:
            event = self._event_for(w, change)
            if event is not None:
                w.queue.put_nowait(event)

    def _event_for(self, w: _Watcher, change: _Change) -> dict[str, Any] | None:
        ns = change.key.split("/", 1)[0]
        if w.namespace is not None and ns != w.namespace:
            return None
        was, now = _matches(change.old, w.selector), _matches(change.new, w.selector)
        if change.new is None:
            return {"type": "DELETED", "object": change.old} if was else None
        if was and now:
            return {"type": "MODIFIED", "object": change.new}
        if now:
            return {"type": "ADDED", "object": change.new}
        if was:  # left the label selection: watchers see a delete
            return {"type": "DELETED", "object": change.new}
        return None

    # -- HTTP ---------------------------------------------------------------------------------------
    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_get("/api/v1/pods", self._pods)
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self._pods)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        self.end_watches()
        if self.runner is not None:
            await self.runner.cleanup()

    def kubeconfig(self, path: Path) -> str:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}],
            "users": [{"name": "router", "user": {"token": TOKEN}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "router"}}],
        }))
        return str(path)

    def watch_requests(self) -> list[dict[str, str]]:
        return [q for _, q in self.requests if q.get("watch") in ("true", "True", "1")]

    def list_requests(self) -> list[dict[str, str]]:
        return [q for _, q in self.requests if q.get("watch") not in ("true", "True", "1")]

    @staticmethod
    def _status(code: int, reason: str, message: str) -> dict[str, Any]:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
                "reason": reason, "code": code}

    async def _pods(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        self.requests.append((request.path, query))
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response(self._status(401, "Unauthorized", "Unauthorized"), status=401)
        namespace = request.match_info.get("ns")
        selector = query.get("labelSelector")
        if query.get("watch") in ("true", "True", "1"):
            return await self._watch(request, namespace, selector, query)
        return self._list(namespace, selector, query)

    def _list(self, namespace: str | None, selector: str | None, query: dict[str, str]) -> web.Response:
        items = [p for k, p in sorted(self.pods.items())
                 if (namespace is None or k.startswith(namespace + "/")) and _matches(p, selector)]
        start, snapshot_rv = 0, self.rv
        if query.get("continue"):
            snapshot_rv, start = (int(x) for x in query["continue"].split(":"))
            if snapshot_rv < self.oldest_rv:
                return web.json_response(self._status(410, "Expired", "continue token expired"), status=410)
        limit = int(query.get("limit") or 0) or len(items)
        page = items[start:start + limit]
        meta: dict[str, Any] = {"resourceVersion": str(snapshot_rv)}
        if start + limit < len(items):
            meta["continue"] = f"{snapshot_rv}:{start + limit}"
        return web.json_response({"kind": "PodList", "apiVersion": "v1", "metadata": meta, "items": page})

    async def _watch(self, request: web.Request, namespace: str | None, selector: str | None,
                     query: dict[str, str]) -> web.StreamResponse:
        since = int(query.get("resourceVersion") or self.rv)
        if since < self.oldest_rv - 1:
            gone = self._status(410, "Expired", f"too old resource version: {since} ({self.oldest_rv})")
            if self.gone_as_http_status:
                return web.json_response(gone, status=410)
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            await resp.write(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
            return resp
        watcher = _Watcher(namespace, selector, query.get("allowWatchBookmarks") in ("true", "True", "1"))
        for change in self.history:  # replay what happened after `since`
            if change.rv > since:
                event = self._event_for(watcher, change)
                if event is not None:
                    watcher.queue.put_nowait(event)
        self.watchers.add(watcher)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 3600)
        try:
            while True:
                try:
                    event = await asyncio.wait_for(watcher.queue.get(), max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    break
                if event is None:
                    break
                await resp.write(json.dumps(event).encode() + b"\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.watchers.discard(watcher)
        return resp


# ------------------------------------------------------------------------------------------ fixtures


@dataclass
class Published:
    snapshots: list[PodSnapshot] = field(default_factory=list)

    def __call__(self, snap: PodSnapshot) -> None:
        self.snapshots.append(snap)

    @property
    def last(self) -> PodSnapshot:
        assert self.snapshots, "nothing published yet"
        return self.snapshots[-1]

    def view(self) -> dict[str, tuple[list[str], list[str]]]:
        """model -> (all pod keys, ready pod keys) of the latest snapshot."""
        if not self.snapshots:
            return {}
        return {name: (sorted(p.key for p in m.pods), sorted(p.key for p in m.ready))
                for name, m in self.last.models.items()}

    async def until(self, check: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout}s; last view: {self.view()}")
            await asyncio.sleep(0.01)


@pytest.fixture
async def api() -> AsyncIterator[FakeKubeApi]:
    server = FakeKubeApi()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def running(api: FakeKubeApi, tmp_path: Path, **kw: Any) -> AsyncIterator[tuple[KubernetesDiscovery, Published]]:
    published = Published()
    kw.setdefault("watch_timeout", lambda: 30)
    kw.setdefault("backoff", (0.02, 0.1))
    disc = KubernetesDiscovery(published, kubeconfig=api.kubeconfig(tmp_path / "kubeconfig"), **kw)
    await disc.start()
    try:
        yield disc, published
    finally:
        await disc.stop()


# ------------------------------------------------------------------------------------------ tests


def test_pod_translation_follows_the_reference_rules() -> None:
    t = pod_from_object(make_pod("a", labels={LABEL_PORT: "8100", "role-name": "prefill", "roleset-name": "rs0"},
                                 annotations={ANNOTATION_CONFIG: '{"profiles": {}}'}))
    assert t is not None and t.routable and t.pod is not None
    assert (t.pod.address, t.pod.key, t.pod.model) == ("127.0.10.1:8100", "default/a", "demo-model")
    assert (t.pod.role, t.pod.roleset) == ("prefill", "rs0")
    assert t.pod.annotations[ANNOTATION_CONFIG] == '{"profiles": {}}'

    t = pod_from_object(make_pod("b", ip="fd00::5"))
    assert t is not None and t.pod is not None and t.pod.address == "[fd00::5]:8000"  # default port 8000

    for pod, reason in ((make_pod("c", ready=False), "not Ready"), (make_pod("d", deleting=True), "terminating"),
                        (make_pod("e", ip=None), "no IP yet"), (make_pod("f", labels={LABEL_PORT: "http"}),
                                                                  f"bad {LABEL_PORT}")):
        t = pod_from_object(pod)
        assert t is not None and not t.routable and t.reason == reason and t.model == "demo-model"

    assert pod_from_object(make_pod("g", model=None)) is None
    assert pod_from_object(make_pod("h", labels={"ray.io/node-type": "worker"})) is None
    assert pod_from_object(make_pod("i", labels={"stormservice.orchestration.aibrix.ai/pod-group-index": "1"})) is None
    assert pod_from_object(make_pod("j", labels={"stormservice.orchestration.aibrix.ai/pod-group-index": "0"}))


async def test_list_then_watch_add_update_delete_and_readiness(api: FakeKubeApi, tmp_path: Path) -> None:
    api.put(make_pod("demo-0", ip="127.0.10.1"))
    api.put(make_pod("demo-1", ip="127.0.10.2", ready=False))
    api.put(make_pod("pending", ip=None, model="other-model"))
    api.put(make_pod("not-a-model-pod", model=None))
    async with running(api, tmp_path) as (disc, pub):
        assert disc.ready
        assert pub.view() == {"demo-model": (["default/demo-0", "default/demo-1"], ["default/demo-0"]),
                              "other-model": ([], [])}  # known model, no IP yet: 503 rather than 404
        first_list = api.list_requests()[0]
        assert first_list["labelSelector"] == LABEL_MODEL and first_list["limit"] == "500"

        api.put(make_pod("demo-2", ip="127.0.10.3"))  # add
        await pub.until(lambda: pub.view()["demo-model"][1] == ["default/demo-0", "default/demo-2"])

        api.put(make_pod("demo-1", ip="127.0.10.2", ready=True))  # readiness flips on ...
        await pub.until(lambda: "default/demo-1" in pub.view()["demo-model"][1])
        api.put(make_pod("demo-1", ip="127.0.10.2", ready=False))  # ... and off
        await pub.until(lambda: "default/demo-1" not in pub.view()["demo-model"][1])

        api.put(make_pod("demo-0", ip="127.0.10.1", labels={"role-name": "decode"},  # update: labels, profile
                         annotations={ANNOTATION_CONFIG: '{"defaultProfile": "p"}'}))
        await pub.until(lambda: pub.last.model("demo-model").config_json == '{"defaultProfile": "p"}')
        assert pub.last.pod_by_address("127.0.10.1:8000").role == "decode"

        api.put(make_pod("demo-2", ip="127.0.10.3", deleting=True))  # terminating: out at once
        await pub.until(lambda: pub.view()["demo-model"][1] == ["default/demo-0"])
        assert "default/demo-2" in pub.view()["demo-model"][0]
        api.delete("default", "demo-2")  # then gone
        await pub.until(lambda: "default/demo-2" not in pub.view()["demo-model"][0])

        api.put(make_pod("demo-1", ip="127.0.10.2", model=None))  # label removed: the watch says DELETED
        await pub.until(lambda: pub.view()["demo-model"][0] == ["default/demo-0"])

        api.put(make_pod("pending", ip="127.0.10.9", model="other-model"))  # got its IP and is Ready
        await pub.until(lambda: pub.view()["other-model"] == (["default/pending"], ["default/pending"]))
        assert len(api.list_requests()) == 1  # all of it through one watch, no relist

        n = len(pub.snapshots)
        pod = make_pod("demo-0", ip="127.0.10.1", labels={"role-name": "decode"},
                       annotations={ANNOTATION_CONFIG: '{"defaultProfile": "p"}'})
        pod["status"]["conditions"].append({"type": "ContainersReady", "status": "True"})
        api.put(pod)  # a status change the router does not read publishes nothing
        api.put(make_pod("demo-3", ip="127.0.10.4"))
        await pub.until(lambda: "default/demo-3" in pub.view()["demo-model"][1])
        assert len(pub.snapshots) == n + 1
        versions = [s.version for s in pub.snapshots]
        assert versions == sorted(set(versions))


async def test_named_namespaces_only(api: FakeKubeApi, tmp_path: Path) -> None:
    for ns in ("team-a", "team-b", "team-c"):
        api.put(make_pod(f"{ns}-0", ns=ns, ip=f"127.0.10.{len(api.pods) + 1}"))
    async with running(api, tmp_path, namespaces=["team-a", "team-b", "team-a"]) as (_, pub):
        assert pub.view()["demo-model"][1] == ["team-a/team-a-0", "team-b/team-b-0"]
        api.put(make_pod("team-c-1", ns="team-c", ip="127.0.10.20"))
        api.put(make_pod("team-b-1", ns="team-b", ip="127.0.10.21"))
        await pub.until(lambda: "team-b/team-b-1" in pub.view()["demo-model"][1])
        assert "team-c/team-c-1" not in pub.view()["demo-model"][0]
    paths = {p for p, _ in api.requests}
    assert paths == {"/api/v1/namespaces/team-a/pods", "/api/v1/namespaces/team-b/pods"}


@pytest.mark.parametrize("gone_as_http_status", [False, True], ids=["error-event", "http-status"])
async def test_expired_resource_version_relists(tmp_path: Path, gone_as_http_status: bool) -> None:
    api = FakeKubeApi(gone_as_http_status=gone_as_http_status)
    await api.start()
    try:
        api.put(make_pod("demo-0", ip="127.0.10.1"))
        api.put(make_pod("demo-1", ip="127.0.10.2"))
        async with running(api, tmp_path) as (_, pub):
            assert pub.view()["demo-model"][1] == ["default/demo-0", "default/demo-1"]
            await api.watching()
            stale = api.watch_requests()[-1]["resourceVersion"]
            # While the watch is down, demo-0 is deleted and demo-5 added, and history is compacted:
            # a resumed watch cannot replay those events, only a new LIST can tell.
            api.silently(lambda: (api.delete("default", "demo-0"), api.put(make_pod("demo-5", ip="127.0.10.5"))))
            api.end_watches()
            await pub.until(lambda: pub.view()["demo-model"][1] == ["default/demo-1", "default/demo-5"])
            assert len(api.list_requests()) == 2
            await api.watching()
            watches = api.watch_requests()
            assert watches[-2]["resourceVersion"] == stale  # it first tried to resume ...
            assert watches[-1]["resourceVersion"] == str(api.rv)  # ... then watched from the new list
            api.put(make_pod("demo-6", ip="127.0.10.6"))  # and the new watch works
            await pub.until(lambda: "default/demo-6" in pub.view()["demo-model"][1])
    finally:
        await api.stop()


async def test_watch_resumes_from_the_last_bookmark(api: FakeKubeApi, tmp_path: Path) -> None:
    api.put(make_pod("demo-0"))
    async with running(api, tmp_path) as (_, pub):
        await api.watching()
        assert api.watch_requests()[0]["allowWatchBookmarks"] in ("true", "True")
        api.bookmark()
        bookmark_rv = str(api.rv)
        await asyncio.sleep(0.1)
        api.end_watches()  # server-side timeout
        await pub.until(lambda: len(api.watch_requests()) == 2)
        assert api.watch_requests()[1]["resourceVersion"] == bookmark_rv
        assert len(api.list_requests()) == 1  # resuming needs no relist


async def test_pagination_and_server_side_watch_timeout(api: FakeKubeApi, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("extproc_router.discovery.kubernetes.LIST_PAGE_SIZE", 2)
    for i in range(5):
        api.put(make_pod(f"demo-{i}", ip=f"127.0.10.{i + 1}"))
    async with running(api, tmp_path, watch_timeout=lambda: 1) as (_, pub):
        assert len(pub.view()["demo-model"][1]) == 5
        assert [q.get("continue") is not None for q in api.list_requests()] == [False, True, True]
        await pub.until(lambda: len(api.watch_requests()) >= 2, timeout=4)  # the 1 s watch ended, resumed
        api.put(make_pod("demo-9", ip="127.0.10.9"))
        await pub.until(lambda: "default/demo-9" in pub.view()["demo-model"][1])
        assert len(api.list_requests()) == 3


async def test_not_ready_until_the_api_server_answers(tmp_path: Path) -> None:
    api = FakeKubeApi()
    port = free_port()
    api.port = port  # the kubeconfig points at a port nothing listens on yet
    published = Published()
    disc = KubernetesDiscovery(published, kubeconfig=api.kubeconfig(tmp_path / "kubeconfig"),
                               backoff=(0.02, 0.05), initial_sync_timeout=0.2)
    await disc.start()
    try:
        assert not disc.ready and not published.snapshots
        api.put(make_pod("demo-0"))
        await api.start(port)
        await published.until(lambda: disc.ready and published.view().get("demo-model") is not None)
    finally:
        await disc.stop()
        await api.stop()


async def test_rejected_credentials_keep_it_not_ready(api: FakeKubeApi, tmp_path: Path) -> None:
    path = Path(api.kubeconfig(tmp_path / "kubeconfig"))
    path.write_text(path.read_text().replace(TOKEN, "wrong"))
    disc = KubernetesDiscovery(Published(), kubeconfig=str(path), backoff=(0.02, 0.05), initial_sync_timeout=0.2)
    await disc.start()
    try:
        await asyncio.sleep(0.1)
        assert not disc.ready and len(api.requests) >= 2  # retried
    finally:
        await disc.stop()


async def test_missing_kubeconfig_is_a_start_error(tmp_path: Path) -> None:
    disc = KubernetesDiscovery(Published(), kubeconfig=str(tmp_path / "nope"))
    with pytest.raises(DiscoveryError, match="kubeconfig"):
        await disc.start()


async def test_router_serves_pods_from_kubernetes(api: FakeKubeApi, tmp_path: Path) -> None:
    """`serve --discovery kubernetes` wiring: the CLI flags parse, readiness and /v1/models follow the API."""
    from extproc_router.cli import build_parser
    from extproc_router.config import build_config
    from extproc_router.serve import RouterProcess

    args = build_parser().parse_args(["serve", "--discovery", "kubernetes", "--namespace", "default",
                                      "--namespace", "models"])
    assert (args.discovery, args.namespace, args.config) == ("kubernetes", ["default", "models"], None)

    api.put(make_pod("demo-0", ip="127.0.10.1"))
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
    cfg = build_config(env={}, flags={"grpc_listen": "127.0.0.1:0", "http_listen": "127.0.0.1:0"})
    proc = RouterProcess(cfg, make_discovery=lambda publish: KubernetesDiscovery(
        publish, namespaces=args.namespace, kubeconfig=kubeconfig, backoff=(0.02, 0.1)))
    await proc.start()
    try:
        base = f"http://127.0.0.1:{proc.http_port}"
        async with aiohttp.ClientSession() as s:
            async with s.get(base + "/ready") as resp:
                assert resp.status == 200
            async with s.get(base + "/v1/models") as resp:
                assert [m["id"] for m in (await resp.json())["data"]] == ["demo-model"]
            api.put(make_pod("demo-1", ns="models", model="second-model", ip="127.0.10.2"))
            for _ in range(200):
                async with s.get(base + "/v1/models") as resp:
                    if len((await resp.json())["data"]) == 2:
                        break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("second-model never appeared in /v1/models")
    finally:
        await proc.stop()
