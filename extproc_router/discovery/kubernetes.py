"""Pod discovery from the Kubernetes API: list + watch the pods labelled `model.aibrix.ai/name`.

What is tracked and when a pod is routable follows the reference gateway (its pod informer):

* pods with the label `model.aibrix.ai/name` (the model they serve), cluster-wide or in the named
  namespaces; `ray.io/node-type=worker` pods and `stormservice.orchestration.aibrix.ai/pod-group-index`
  above 0 are skipped (only the group leader serves);
* routable when the pod has an IP, its `Ready` condition is True and it is not terminating
  (`metadata.deletionTimestamp` is set as soon as a delete starts, before the containers stop);
* port from the label `model.aibrix.ai/port` (default 8000), roles from `role-name` / `roleset-name`,
  the model's profiles from the annotation `model.aibrix.ai/config` (read by PodSnapshot.build);
* the engine's KV-cache events from the annotation (or label) `model.aibrix.ai/kv-events-port`, plus
  `model.aibrix.ai/kv-events-replay-port` for its replay socket, both on the pod's IP (vLLM's
  `--kv-events-config` endpoint `tcp://*:PORT` and replay_endpoint); read by `extproc_router.kv_events`,
  a bad value is logged there and the pod is routed by the approximate index.

Readiness comes from the pod's `Ready` condition alone, not from HTTP probes of our own: the kubelet
already runs the pod's readiness probe, the reference gateway trusts the same condition, and probing
every pod from every router replica would multiply that load for no new information.

The watch is an informer in miniature: LIST (paginated) gives the full set and a resourceVersion,
WATCH from there streams ADDED / MODIFIED / DELETED / BOOKMARK events as JSON lines. A watch that ends
(server timeout) resumes from the last resourceVersion seen, bookmarks included, so it replays
nothing. A 410 Gone (the version fell out of the API server's history: HTTP status or an ERROR event)
triggers a fresh LIST that replaces the whole set, so deletions missed in the gap are not kept.
Other failures retry with exponential backoff; the last good pod set stays in service meanwhile.

LoRA adapters: AIBrix's `ModelAdapter` resources (`model.aibrix.ai/v1alpha1`, `modeladapters`) are
listed and watched the same way (`ModelAdapterWatch`). An adapter is served by the pods its
`status.instances` names, in the adapter's namespace, under the adapter's name (`metadata.name`: the
name AIBrix loads it into vLLM with, and the name clients ask for). Without the CRD (404) or without
permission to read it (403) the router says so once and keeps checking every few minutes: adapters
then come from the pods' own `/v1/models` (`extproc_router.discovery.adapters`), which the router
polls in any case.

InferencePool (`serve --inference-pool NAME`, the Gateway API Inference Extension): the pool
`inferencepools.inference.networking.k8s.io/v1` NAME of the one namespace is watched
(`InferencePoolWatch`; `spec.selector.matchLabels` and `spec.targetPorts[0].number`; the older
`inference.networking.x-k8s.io/v1alpha2` shape, `spec.selector` as a map and `spec.targetPortNumber`,
is read too), and so are all the pods of that namespace (`PoolPodWatch`, no label selector, so a
selector change is re-evaluated at once without a new watch). The pods whose labels contain every
selector label (an empty selector selects nothing) are the pool's; one is routable at `IP:targetPort`
when it has an IP, is Ready and not terminating (the `model.aibrix.ai/*` label rules above do not
apply: no port label, no worker or group-index skipping). Its model is its `model.aibrix.ai/name`
label, else the pool's name. A GIE gateway sends its picker only the requests of its pool, whatever
model they name, so the snapshot's `default` entry (every pool pod, under the pool's name) serves the
models it does not know. No pool (deleted, not created yet, or the CRD missing) = no pods: 503s.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import aiohttp
import orjson

from extproc_router.discovery.static_file import DEFAULT_POD_PORT, DiscoveryError
from routing.pods import LABEL_MODEL, LABEL_PORT, Pod, PodSnapshot

if TYPE_CHECKING:
    from kubernetes_asyncio.client import ApiClient, CoreV1Api, CustomObjectsApi

log = logging.getLogger("extproc_router.discovery.kubernetes")

LABEL_RAY_NODE_TYPE = "ray.io/node-type"
LABEL_POD_GROUP_INDEX = "stormservice.orchestration.aibrix.ai/pod-group-index"
LIST_PAGE_SIZE = 500
_GONE = 410
_NOT_FOUND = 404
_FORBIDDEN = 403
# AIBrix's ModelAdapter custom resource.
ADAPTER_GROUP, ADAPTER_VERSION, ADAPTER_PLURAL = "model.aibrix.ai", "v1alpha1", "modeladapters"
ADAPTER_ABSENT_RECHECK_S = 300.0  # how often a missing ModelAdapter CRD (or permission) is checked again
# The Gateway API Inference Extension's InferencePool (v1; v1alpha2 lived in the x-k8s.io group).
POOL_GROUP, POOL_VERSION, POOL_PLURAL = "inference.networking.k8s.io", "v1", "inferencepools"
POOL_API_VERSIONS = {"v1": (POOL_GROUP, "v1"), "v1alpha2": ("inference.networking.x-k8s.io", "v1alpha2")}
POOL_ABSENT_RECHECK_S = 30.0  # how often a missing InferencePool CRD (or permission) is checked again


class ResourceExpired(Exception):
    """410 Gone: the resourceVersion (or list continue token) is no longer in the API server's history."""


class ApiFailure(Exception):
    """The API server answered a list or watch with an error status (e.g. 403 when RBAC is missing)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class TrackedPod:
    """What discovery keeps of one model pod."""

    model: str
    pod: Pod | None  # None until the pod has an IP: the model is known, but nothing can be routed to
    routable: bool
    reason: str  # why it is not routable ("" when it is); for the logs


def _is_ready(status: Mapping[str, Any]) -> bool:
    for cond in status.get("conditions") or ():
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def _skipped(labels: Mapping[str, str]) -> bool:
    if labels.get(LABEL_RAY_NODE_TYPE) == "worker":
        return True
    index = labels.get(LABEL_POD_GROUP_INDEX)
    return index is not None and index.strip() not in ("", "0")


def pod_from_object(obj: Mapping[str, Any]) -> TrackedPod | None:
    """Translate one Pod object (API JSON); None when it is not a model pod the gateway routes to."""
    meta = obj.get("metadata") or {}
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    model = labels.get(LABEL_MODEL)
    if not model or _skipped(labels):
        return None
    name = str(meta.get("name") or "")
    namespace = str(meta.get("namespace") or "default")
    port_text = labels.get(LABEL_PORT, str(DEFAULT_POD_PORT))
    try:
        port = int(port_text)
        if not 0 < port < 65536:
            raise ValueError
    except ValueError:
        log.warning("pod %s/%s: label %s=%r is not a port; not routing to it", namespace, name, LABEL_PORT,
                    port_text)
        return TrackedPod(model, None, False, f"bad {LABEL_PORT}")
    status = obj.get("status") or {}
    ip_text = status.get("podIP")
    if not ip_text:
        return TrackedPod(model, None, False, "no IP yet")
    try:
        ip = ipaddress.ip_address(ip_text)
    except ValueError:
        return TrackedPod(model, None, False, f"bad podIP {ip_text!r}")
    address = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    annotations = {str(k): str(v) for k, v in (meta.get("annotations") or {}).items()}
    pod = Pod(name=name, address=address, model=model, namespace=namespace, labels=labels, annotations=annotations)
    if meta.get("deletionTimestamp"):
        return TrackedPod(model, pod, False, "terminating")
    if not _is_ready(status):
        return TrackedPod(model, pod, False, "not Ready")
    return TrackedPod(model, pod, True, "")


@dataclass(frozen=True, slots=True)
class TrackedAdapter:
    """What discovery keeps of one ModelAdapter: its name, and the pods (of its namespace) serving it."""

    name: str
    namespace: str
    base_model: str | None
    instances: tuple[str, ...]

    def pod_keys(self) -> list[str]:
        return [f"{self.namespace}/{pod}" for pod in self.instances]


def adapter_from_object(obj: Mapping[str, Any]) -> TrackedAdapter | None:
    """Translate one ModelAdapter object (API JSON); None when it has no name."""
    meta = obj.get("metadata") or {}
    name = str(meta.get("name") or "")
    if not name:
        return None
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    base = spec.get("baseModel") if isinstance(spec, dict) else None
    base = base.strip() if isinstance(base, str) else ""
    raw = status.get("instances") if isinstance(status, dict) else None
    instances = tuple(dict.fromkeys(i for i in raw if isinstance(i, str) and i)) if isinstance(raw, list) else ()
    return TrackedAdapter(name=name, namespace=str(meta.get("namespace") or "default"), base_model=base or None,
                          instances=instances)


@dataclass(frozen=True, slots=True)
class TrackedPool:
    """What discovery keeps of the InferencePool: its pod selector and the port its pods serve on
    (None when the spec has none that is valid: its pods are then known but not routable)."""

    name: str
    namespace: str
    selector: Mapping[str, str]
    port: int | None

    def selects(self, labels: Mapping[str, str]) -> bool:
        return bool(self.selector) and all(labels.get(k) == v for k, v in self.selector.items())


def _valid_port(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536 else None


def pool_from_object(obj: Mapping[str, Any]) -> TrackedPool | None:
    """Translate one InferencePool (API JSON, v1 or v1alpha2 shape); None when it has no name."""
    meta = obj.get("metadata") or {}
    name = str(meta.get("name") or "")
    if not name:
        return None
    spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
    raw = spec.get("selector")
    if isinstance(raw, dict) and isinstance(raw.get("matchLabels"), dict):  # v1: a LabelSelector
        raw = raw["matchLabels"]
    selector = {str(k): str(v) for k, v in raw.items() if isinstance(v, str)} if isinstance(raw, dict) else {}
    port = None
    ports = spec.get("targetPorts")
    if isinstance(ports, list) and ports and isinstance(ports[0], dict):  # v1: the first (and only) port
        port = _valid_port(ports[0].get("number"))
    elif "targetPortNumber" in spec:  # v1alpha2
        port = _valid_port(spec.get("targetPortNumber"))
    return TrackedPool(name=name, namespace=str(meta.get("namespace") or "default"), selector=selector, port=port)


@dataclass(frozen=True, slots=True)
class PoolMember:
    """What discovery keeps of any pod of the pool's namespace: enough to select it and route to it."""

    name: str
    namespace: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    host: str | None  # the pod IP as it goes before ":port" ("[v6]" bracketed); None without one
    routable: bool
    reason: str

    def pod(self, model: str, port: int) -> Pod | None:
        if self.host is None:
            return None
        return Pod(name=self.name, address=f"{self.host}:{port}", model=model, namespace=self.namespace,
                   labels=self.labels, annotations=self.annotations)


def member_from_object(obj: Mapping[str, Any]) -> PoolMember | None:
    """Translate one Pod object (API JSON) for the InferencePool mode; None when it has no name."""
    meta = obj.get("metadata") or {}
    name = str(meta.get("name") or "")
    if not name:
        return None
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    annotations = {str(k): str(v) for k, v in (meta.get("annotations") or {}).items()}
    status = obj.get("status") or {}
    host, reason = None, ""
    ip_text = status.get("podIP")
    if not ip_text:
        reason = "no IP yet"
    else:
        try:
            ip = ipaddress.ip_address(ip_text)
            host = f"[{ip}]" if ip.version == 6 else str(ip)
        except ValueError:
            reason = f"bad podIP {ip_text!r}"
    if not reason and meta.get("deletionTimestamp"):
        reason = "terminating"
    if not reason and not _is_ready(status):
        reason = "not Ready"
    return PoolMember(name=name, namespace=str(meta.get("namespace") or "default"), labels=labels,
                      annotations=annotations, host=host, routable=not reason, reason=reason)


def _object_key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace') or 'default'}/{meta.get('name') or ''}"


def _resource_version(obj: Mapping[str, Any]) -> str | None:
    return (obj.get("metadata") or {}).get("resourceVersion") or None


async def _json_lines(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """Split a watch body into lines without aiohttp's line-length cap (a pod can exceed 128 KiB)."""
    buf = b""
    async for chunk in resp.content.iter_any():
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line.strip():
                yield line
    if buf.strip():
        yield buf


def _status_message(body: bytes) -> str:
    try:
        status = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:200].decode("utf-8", "replace")
    return str(status.get("message") or status.get("reason") or status) if isinstance(status, dict) else str(status)


T = TypeVar("T")


class ListWatch(Generic[T]):
    """The list/watch loop of one collection in one scope (one namespace, or all of them when
    `namespace` is None): `items` maps "namespace/name" to what `translate` keeps of each object."""

    kind = "object"  # for the logs

    def __init__(self, namespace: str | None, on_change: Callable[[], None], *,
                 watch_timeout: Callable[[], int], backoff: tuple[float, float]) -> None:
        self.namespace = namespace
        self.items: dict[str, T] = {}
        self.resource_version: str | None = None
        self.synced = asyncio.Event()  # set after the first successful LIST
        self._on_change = on_change
        self._watch_timeout = watch_timeout
        self._backoff = backoff

    @property
    def scope(self) -> str:
        return f"namespace {self.namespace}" if self.namespace else "all namespaces"

    def translate(self, obj: Mapping[str, Any]) -> T | None:
        raise NotImplementedError

    async def _call(self, **kwargs: Any) -> aiohttp.ClientResponse:
        """GET the collection. `_preload_content=False` hands back the raw aiohttp response: the
        body is parsed here (a watch is a stream of lines) and error statuses are not raised."""
        raise NotImplementedError

    async def _failed(self, exc: ApiFailure, delay: float) -> None:
        """A list or watch answered with an error status; wait before the next try."""
        await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # jitter: replicas must not retry in step

    async def _wait_absent(self, recheck: float) -> None:
        """The resource is not there (no CRD, no permission): nothing to wait for. Forget what was
        known of it, count as synced, and look again after `recheck` seconds."""
        self.resource_version = None
        first = not self.synced.is_set()
        self.synced.set()
        if self.items or first:
            # The first sync must be announced even with nothing to forget: readiness waits for
            # every watch, and the others may all have synced before this one.
            self.items = {}
            self._on_change()
        await asyncio.sleep(recheck)

    async def run(self) -> None:
        """List, then watch, forever; only cancellation stops it."""
        delay = self._backoff[0]
        while True:
            try:
                if self.resource_version is None:
                    await self.relist()
                await self.watch_once()
                delay = self._backoff[0]
            except ResourceExpired:
                log.info("%s watch (%s): resourceVersion %s expired (410 Gone); listing again", self.kind,
                         self.scope, self.resource_version)
                self.resource_version = None
            except ApiFailure as exc:
                await self._failed(exc, delay)
                delay = min(delay * 2, self._backoff[1])
            except Exception as exc:  # the loop must outlive any failure: keep the last items, retry
                log.warning("%s watch (%s) failed: %s; retrying in %.1fs", self.kind, self.scope,
                            str(exc) or type(exc).__name__, delay)
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self._backoff[1])

    async def relist(self) -> None:
        """LIST every matching object (page by page) and replace the tracked set with the result."""
        items: list[dict[str, Any]] = []
        token: str | None = None
        version: str | None = None
        while True:
            extra: dict[str, Any] = {"limit": LIST_PAGE_SIZE, "_request_timeout": 60}
            if token:
                extra["_continue"] = token
            resp = await self._call(**extra)
            try:
                body = await resp.read()
            finally:
                resp.release()
            if resp.status == _GONE:  # the continue token expired mid-way: start over
                raise ResourceExpired
            if resp.status != 200:
                raise ApiFailure(f"list {self.kind}s: HTTP {resp.status}: {_status_message(body)}", resp.status)
            page = orjson.loads(body)
            items.extend(page.get("items") or ())
            meta = page.get("metadata") or {}
            version = version or meta.get("resourceVersion")
            token = meta.get("continue")
            if not token:
                break
        new: dict[str, T] = {}
        for obj in items:
            tracked = self.translate(obj)
            if tracked is not None:
                new[_object_key(obj)] = tracked
        added, removed = new.keys() - self.items.keys(), self.items.keys() - new.keys()
        self.items = new
        self.resource_version = version
        self._listed(added, removed, version)
        self.synced.set()
        self._on_change()

    def _listed(self, added: set[str], removed: set[str], version: str | None) -> None:
        log.info("%s list (%s): %d (+%d -%d) at resourceVersion %s", self.kind, self.scope, len(self.items),
                 len(added), len(removed), version)

    async def watch_once(self) -> None:
        """One WATCH request from `resource_version`, applied event by event until the server ends it."""
        timeout = self._watch_timeout()
        resp = await self._call(
            watch=True, resource_version=self.resource_version, allow_watch_bookmarks=True,
            timeout_seconds=timeout,
            # The server ends the watch after `timeout`; the read timeout only catches a silent dead peer.
            _request_timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=timeout + 30))
        try:
            if resp.status == _GONE:
                raise ResourceExpired
            if resp.status != 200:
                raise ApiFailure(f"watch {self.kind}s: HTTP {resp.status}: {_status_message(await resp.read())}",
                                 resp.status)
            async for line in _json_lines(resp):
                self._apply(orjson.loads(line))
        finally:
            resp.release()

    def _apply(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == _GONE:
                raise ResourceExpired
            raise ApiFailure(f"watch error event: {obj.get('code')} {obj.get('message')}", obj.get("code"))
        self.resource_version = _resource_version(obj) or self.resource_version
        if kind == "BOOKMARK":
            return
        key = _object_key(obj)
        before = self.items.get(key)
        after = self.translate(obj) if kind in ("ADDED", "MODIFIED") else None
        if after is None:
            self.items.pop(key, None)
        else:
            self.items[key] = after
        if before != after:
            self._transition(key, before, after)
            self._on_change()

    def _transition(self, key: str, before: T | None, after: T | None) -> None:
        log.info("%s %s %s", self.kind, key, "removed" if after is None else "changed")


class PodWatch(ListWatch[TrackedPod]):
    """The model pods (label `model.aibrix.ai/name`) of one scope."""

    kind = "pod"

    def __init__(self, api: CoreV1Api, namespace: str | None, on_change: Callable[[], None], *,
                 watch_timeout: Callable[[], int], backoff: tuple[float, float]) -> None:
        super().__init__(namespace, on_change, watch_timeout=watch_timeout, backoff=backoff)
        self.api = api

    @property
    def pods(self) -> dict[str, TrackedPod]:
        return self.items

    def translate(self, obj: Mapping[str, Any]) -> TrackedPod | None:
        return pod_from_object(obj)

    async def _call(self, **kwargs: Any) -> aiohttp.ClientResponse:
        kwargs.update(label_selector=LABEL_MODEL, _preload_content=False)
        if self.namespace is None:
            return await self.api.list_pod_for_all_namespaces(**kwargs)
        return await self.api.list_namespaced_pod(self.namespace, **kwargs)

    async def _failed(self, exc: ApiFailure, delay: float) -> None:
        log.warning("pod watch (%s) failed: %s; retrying in %.1fs", self.scope, exc, delay)
        await super()._failed(exc, delay)

    def _listed(self, added: set[str], removed: set[str], version: str | None) -> None:
        log.info("pod list (%s): %d model pods, %d routable (+%d -%d) at resourceVersion %s", self.scope,
                 len(self.items), sum(t.routable for t in self.items.values()), len(added), len(removed), version)

    def _transition(self, key: str, before: TrackedPod | None, after: TrackedPod | None) -> None:
        _log_transition(key, before, after)


class ModelAdapterWatch(ListWatch[TrackedAdapter]):
    """AIBrix's ModelAdapters of one scope. A missing CRD (404) or a missing permission (403) is no
    error: the watch counts as synced (nothing to wait for), says so once, and checks again every
    `absent_recheck` seconds."""

    kind = "ModelAdapter"

    def __init__(self, api: CustomObjectsApi, namespace: str | None, on_change: Callable[[], None], *,
                 watch_timeout: Callable[[], int], backoff: tuple[float, float],
                 absent_recheck: float = ADAPTER_ABSENT_RECHECK_S) -> None:
        super().__init__(namespace, on_change, watch_timeout=watch_timeout, backoff=backoff)
        self.api = api
        self.absent_recheck = absent_recheck
        self.absent: int | None = None  # the status (404, 403) that said the resource is unavailable

    def translate(self, obj: Mapping[str, Any]) -> TrackedAdapter | None:
        return adapter_from_object(obj)

    async def _call(self, **kwargs: Any) -> aiohttp.ClientResponse:
        kwargs["_preload_content"] = False
        if self.namespace is None:
            return await self.api.list_cluster_custom_object(ADAPTER_GROUP, ADAPTER_VERSION, ADAPTER_PLURAL,
                                                             **kwargs)
        return await self.api.list_namespaced_custom_object(ADAPTER_GROUP, ADAPTER_VERSION, self.namespace,
                                                            ADAPTER_PLURAL, **kwargs)

    async def relist(self) -> None:
        await super().relist()
        if self.absent is not None:
            log.info("ModelAdapters (%s) are readable now: following them", self.scope)
            self.absent = None

    async def _failed(self, exc: ApiFailure, delay: float) -> None:
        if exc.status not in (_NOT_FOUND, _FORBIDDEN):
            log.warning("ModelAdapter watch (%s) failed: %s; retrying in %.1fs", self.scope, exc, delay)
            await super()._failed(exc, delay)
            return
        if self.absent != exc.status:
            why = ("the ModelAdapter CRD (model.aibrix.ai/v1alpha1) is not installed" if exc.status == _NOT_FOUND
                   else "the router may not list modeladapters.model.aibrix.ai (RBAC)")
            log.info("no ModelAdapters (%s): %s; LoRA adapters come from the pods' /v1/models and metrics; "
                     "checking again every %.0fs", self.scope, why, self.absent_recheck)
            self.absent = exc.status
        await self._wait_absent(self.absent_recheck)

    def _listed(self, added: set[str], removed: set[str], version: str | None) -> None:
        log.info("ModelAdapter list (%s): %d adapters (+%d -%d) at resourceVersion %s", self.scope,
                 len(self.items), len(added), len(removed), version)

    def _transition(self, key: str, before: TrackedAdapter | None, after: TrackedAdapter | None) -> None:
        if after is None:
            log.info("ModelAdapter %s removed", key)
        else:
            log.info("ModelAdapter %s served by pods %s", key, ", ".join(after.instances) or "(none yet)")


class PoolPodWatch(ListWatch[PoolMember]):
    """Every pod of the InferencePool's namespace (the pool's selector is applied when the snapshot
    is built, so a selector change needs no new watch)."""

    kind = "pod"

    def __init__(self, api: CoreV1Api, namespace: str, on_change: Callable[[], None], *,
                 watch_timeout: Callable[[], int], backoff: tuple[float, float]) -> None:
        super().__init__(namespace, on_change, watch_timeout=watch_timeout, backoff=backoff)
        self.api = api

    def translate(self, obj: Mapping[str, Any]) -> PoolMember | None:
        return member_from_object(obj)

    async def _call(self, **kwargs: Any) -> aiohttp.ClientResponse:
        return await self.api.list_namespaced_pod(self.namespace, _preload_content=False, **kwargs)

    async def _failed(self, exc: ApiFailure, delay: float) -> None:
        log.warning("pod watch (%s) failed: %s; retrying in %.1fs", self.scope, exc, delay)
        await super()._failed(exc, delay)

    def _transition(self, key: str, before: PoolMember | None, after: PoolMember | None) -> None:
        log.debug("pod %s %s", key, "removed" if after is None else after.reason or "routable")


class InferencePoolWatch(ListWatch[TrackedPool]):
    """The one InferencePool `name` of `namespace` (listed and watched with a field selector on its
    name). A missing CRD (404) or permission (403) means no pool: synced and empty, said once, and
    checked again every `absent_recheck` seconds."""

    kind = "InferencePool"

    def __init__(self, api: CustomObjectsApi, namespace: str, name: str, on_change: Callable[[], None], *,
                 watch_timeout: Callable[[], int], backoff: tuple[float, float],
                 api_version: tuple[str, str] = (POOL_GROUP, POOL_VERSION),
                 absent_recheck: float = POOL_ABSENT_RECHECK_S) -> None:
        super().__init__(namespace, on_change, watch_timeout=watch_timeout, backoff=backoff)
        self.api = api
        self.name = name
        self.group, self.version = api_version
        self.absent_recheck = absent_recheck
        self.absent: int | None = None

    @property
    def pool(self) -> TrackedPool | None:
        return self.items.get(f"{self.namespace}/{self.name}")

    def translate(self, obj: Mapping[str, Any]) -> TrackedPool | None:
        pool = pool_from_object(obj)
        return pool if pool is not None and pool.name == self.name else None

    async def _call(self, **kwargs: Any) -> aiohttp.ClientResponse:
        return await self.api.list_namespaced_custom_object(
            self.group, self.version, self.namespace, POOL_PLURAL, field_selector=f"metadata.name={self.name}",
            _preload_content=False, **kwargs)

    async def relist(self) -> None:
        await super().relist()
        if self.absent is not None:
            log.info("InferencePools (%s) are readable now", self.scope)
            self.absent = None
        if self.pool is None:
            log.warning("InferencePool %s/%s does not exist (yet): no pods to route to", self.namespace, self.name)

    async def _failed(self, exc: ApiFailure, delay: float) -> None:
        if exc.status not in (_NOT_FOUND, _FORBIDDEN):
            log.warning("InferencePool watch (%s) failed: %s; retrying in %.1fs", self.scope, exc, delay)
            await super()._failed(exc, delay)
            return
        if self.absent != exc.status:
            why = (f"the InferencePool CRD ({self.group}/{self.version}) is not installed" if exc.status == _NOT_FOUND
                   else f"the router may not list {POOL_PLURAL}.{self.group} (RBAC)")
            log.warning("InferencePool %s/%s unavailable: %s; no pods to route to; checking again every %.0fs",
                        self.namespace, self.name, why, self.absent_recheck)
            self.absent = exc.status
        await self._wait_absent(self.absent_recheck)

    def _listed(self, added: set[str], removed: set[str], version: str | None) -> None:
        self._log_pool()

    def _transition(self, key: str, before: TrackedPool | None, after: TrackedPool | None) -> None:
        self._log_pool()

    def _log_pool(self) -> None:
        pool = self.pool
        if pool is None:
            log.info("InferencePool %s/%s: absent", self.namespace, self.name)
        else:
            log.info("InferencePool %s/%s: selector %s, target port %s", self.namespace, self.name,
                     ",".join(f"{k}={v}" for k, v in sorted(pool.selector.items())) or "(empty: selects nothing)",
                     pool.port if pool.port is not None else "(none valid)")


def _log_transition(key: str, before: TrackedPod | None, after: TrackedPod | None) -> None:
    if after is None:
        log.info("pod %s removed", key)
        return
    was = before.routable if before else False
    where = after.pod.address if after.pod else "-"
    if after.routable and not was:
        log.info("pod %s (%s, model %s) is routable", key, where, after.model)
    elif was and not after.routable:
        log.info("pod %s (%s) is no longer routable: %s", key, where, after.reason)


async def load_api_client(kubeconfig: str | None = None) -> ApiClient:
    """An API client from the in-cluster service account, else from the kubeconfig (`kubeconfig`,
    else $KUBECONFIG, else ~/.kube/config). Raises DiscoveryError when neither is usable."""
    from kubernetes_asyncio.client import ApiClient, Configuration
    from kubernetes_asyncio.config import ConfigException, load_incluster_config, load_kube_config

    conf = Configuration()
    if kubeconfig is None:
        with contextlib.suppress(ConfigException):
            load_incluster_config(client_configuration=conf)
            return ApiClient(configuration=conf)
    try:
        await load_kube_config(config_file=kubeconfig, client_configuration=conf)
    except (ConfigException, OSError) as exc:
        raise DiscoveryError(f"kubernetes discovery: not running in a pod and no usable kubeconfig "
                             f"({exc}); set KUBECONFIG") from None
    return ApiClient(configuration=conf)


def _default_watch_timeout() -> int:
    # As client-go's reflector: spread reconnects of many replicas over 5-10 minutes.
    return random.randint(300, 600)


class KubernetesDiscovery:
    """Publishes a PodSnapshot whenever the routable view of the watched pods changes.

    Same contract as FileDiscovery: `publish` gets every new snapshot, `ready` turns True once
    every namespace's pods have been listed, `start()` / `stop()`. With `model_adapters` the
    ModelAdapters of the same scopes are followed too; the pods their `status.instances` name serve
    them (the snapshot's `pod_adapters`). With `inference_pool` the pods are those the InferencePool
    of that name selects, in the one namespace (`namespaces`' only entry, else "default"), and the
    snapshot's `default` entry serves every model name it does not know (see the module docstring).
    """

    def __init__(self, publish: Callable[[PodSnapshot], None], *, namespaces: Iterable[str] = (),
                 kubeconfig: str | None = None, watch_timeout: Callable[[], int] = _default_watch_timeout,
                 backoff: tuple[float, float] = (0.5, 30.0), initial_sync_timeout: float = 10.0,
                 model_adapters: bool = True, adapter_absent_recheck: float = ADAPTER_ABSENT_RECHECK_S,
                 inference_pool: str | None = None, inference_pool_version: str = "v1",
                 pool_absent_recheck: float = POOL_ABSENT_RECHECK_S) -> None:
        self._publish = publish
        self.inference_pool = inference_pool
        if inference_pool_version not in POOL_API_VERSIONS:
            raise DiscoveryError(f"InferencePool API version {inference_pool_version!r}: expected one of "
                                 f"{', '.join(POOL_API_VERSIONS)}")
        self._pool_api = POOL_API_VERSIONS[inference_pool_version]
        self._pool_absent_recheck = pool_absent_recheck
        self._pool_watch: InferencePoolWatch | None = None
        self._pool_pods: PoolPodWatch | None = None
        self.model_adapters = model_adapters
        self._adapter_absent_recheck = adapter_absent_recheck
        self.namespaces: Sequence[str] = tuple(dict.fromkeys(namespaces))  # () = cluster-wide
        if inference_pool is not None:
            if len(self.namespaces) > 1:
                raise DiscoveryError("an InferencePool selects pods of its own namespace: give at most one namespace")
            self.namespaces = self.namespaces or ("default",)
        self.kubeconfig = kubeconfig
        self._watch_timeout = watch_timeout
        self._backoff = backoff
        self._initial_sync_timeout = initial_sync_timeout
        self._api_client: ApiClient | None = None
        self._watches: list[PodWatch] = []
        self._adapter_watches: list[ModelAdapterWatch] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._last_view: tuple[Any, ...] | None = None
        self._version = 0
        self.ready = False

    async def start(self) -> None:
        """Connect and wait (up to `initial_sync_timeout`) for the first list of every namespace.

        An unreachable API server does not stop the router: it stays not ready and keeps retrying.
        A missing configuration raises DiscoveryError.
        """
        from kubernetes_asyncio.client import CoreV1Api, CustomObjectsApi

        self._api_client = await load_api_client(self.kubeconfig)
        api = CoreV1Api(self._api_client)
        scopes: Sequence[str | None] = self.namespaces or (None,)
        pool_watches: list[ListWatch[Any]] = []
        if self.inference_pool is None:
            self._watches = [PodWatch(api, ns, self._changed, watch_timeout=self._watch_timeout,
                                      backoff=self._backoff) for ns in scopes]
        else:
            ns = self.namespaces[0]
            self._pool_pods = PoolPodWatch(api, ns, self._changed, watch_timeout=self._watch_timeout,
                                           backoff=self._backoff)
            self._pool_watch = InferencePoolWatch(
                CustomObjectsApi(self._api_client), ns, self.inference_pool, self._changed,
                watch_timeout=self._watch_timeout, backoff=self._backoff, api_version=self._pool_api,
                absent_recheck=self._pool_absent_recheck)
            pool_watches = [self._pool_watch, self._pool_pods]
        if self.model_adapters:
            custom = CustomObjectsApi(self._api_client)
            self._adapter_watches = [
                ModelAdapterWatch(custom, ns, self._changed, watch_timeout=self._watch_timeout, backoff=self._backoff,
                                  absent_recheck=self._adapter_absent_recheck) for ns in scopes]
        self._tasks = [asyncio.create_task(w.run(), name=f"pod-watch-{w.namespace or '*'}") for w in self._watches]
        self._tasks += [asyncio.create_task(w.run(), name=f"modeladapter-watch-{w.namespace or '*'}")
                        for w in self._adapter_watches]
        self._tasks += [asyncio.create_task(w.run(), name=f"{w.kind.lower()}-watch-{w.namespace}")
                        for w in pool_watches]
        try:
            # The adapters' first list too (an absent CRD counts as listed): requests for an adapter
            # must not get a 404 just because the router started a moment ago.
            await asyncio.wait_for(asyncio.gather(*(w.synced.wait() for w in [*self._watches, *self._adapter_watches,
                                                                              *pool_watches])),
                                   self._initial_sync_timeout)
        except TimeoutError:
            log.warning("kubernetes discovery: no pod list after %.0fs; not ready until the API server answers",
                        self._initial_sync_timeout)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._api_client is not None:
            await self._api_client.close()
            self._api_client = None

    def _changed(self) -> None:
        if self._pool_watch is not None and self._pool_pods is not None:
            pods, ready, models = self._pool_view(self._pool_watch, self._pool_pods)
            synced = self._pool_watch.synced.is_set() and self._pool_pods.synced.is_set()
        else:
            tracked = [t for w in self._watches for t in w.pods.values()]
            pods = sorted((t.pod for t in tracked if t.pod is not None), key=lambda p: p.key)
            ready = frozenset(t.pod.key for t in tracked if t.routable and t.pod is not None)
            models = frozenset(t.model for t in tracked)
            synced = all(w.synced.is_set() for w in self._watches)
        adapters: dict[str, set[str]] = {}
        for w in self._adapter_watches:
            for adapter in w.items.values():
                for key in adapter.pod_keys():
                    adapters.setdefault(key, set()).add(adapter.name)
        view = (tuple(pods), ready, models, {k: frozenset(v) for k, v in adapters.items()})
        if not self.ready and synced:
            self.ready = True
        if view == self._last_view:
            return  # e.g. a status update that changes nothing the router reads
        self._last_view = view
        self._version += 1
        # Every model with a tracked pod is listed, even with no IP yet: its requests get 503, not 404.
        self._publish(PodSnapshot.build(pods, set(ready), dict.fromkeys(models), self._version, adapters=view[3],
                                        default=self.inference_pool))

    def _pool_view(self, pool_watch: InferencePoolWatch, members: PoolPodWatch) -> tuple[
            list[Pod], frozenset[str], frozenset[str]]:
        """The pods, ready keys and models of the InferencePool: nothing while it is absent."""
        pool = pool_watch.pool
        if pool is None:
            return [], frozenset(), frozenset()
        pods: list[Pod] = []
        ready: set[str] = set()
        models: set[str] = set()
        for member in members.items.values():
            if not pool.selects(member.labels):
                continue
            model = member.labels.get(LABEL_MODEL) or pool.name
            models.add(model)
            pod = member.pod(model, pool.port) if pool.port is not None else None
            if pod is not None:
                pods.append(pod)
                if member.routable:
                    ready.add(pod.key)
        pods.sort(key=lambda p: p.key)
        return pods, frozenset(ready), frozenset(models)
