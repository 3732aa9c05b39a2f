"""LoRA adapters the pods report serving: their `GET /v1/models`, and the engine metrics' adapters in use.

vLLM lists every loaded adapter in `/v1/models` as an entry whose `parent` is the base model (the
base model's own entry has `parent: null`); adapters loaded at run time (`POST /v1/load_lora_adapter`)
appear there at once and unloaded ones disappear. Its `vllm:lora_requests_info` gauge names the
adapters with requests running or waiting (`routing.stats.EngineStats.lora_adapters`, from the
engine-metrics scrape): a faster but partial signal, since an idle adapter is not in it.

`AdapterTracker` merges the two per pod: the pod's last listing, plus any adapter its metrics showed
in use since that listing (so an adapter seen running is routable before the next listing, and one
unloaded disappears at the listing after its last use). A pod whose listing fails keeps its last
known adapters (the health checks decide whether it is routed to at all); a pod that leaves the
polled set is forgotten.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping

import orjson

from extproc_router.discovery.poller import PodPoller
from routing.pods import Pod

log = logging.getLogger("extproc_router.discovery.adapters")

MODELS_PATH = "/v1/models"
MAX_ADAPTERS_PER_POD = 4096  # a pod listing more is cut here: the snapshot is rebuilt from these sets
MAX_NAME_CHARS = 1024


class AdapterListError(ValueError):
    """A `/v1/models` answer that is not an OpenAI model list."""


def parse_model_list(body: bytes) -> frozenset[str]:
    """The LoRA adapters of a `/v1/models` answer: the ids of entries with a non-empty `parent`.

    Raises AdapterListError for a body that is not `{"data": [...]}`; entries that are not objects
    with a string `id` are skipped."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise AdapterListError(f"not JSON: {exc}") from None
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        raise AdapterListError("no `data` list")
    names: set[str] = set()
    for item in data:
        if not isinstance(item, dict):
            continue
        name, parent = item.get("id"), item.get("parent")
        if isinstance(name, str) and name and len(name) <= MAX_NAME_CHARS and isinstance(parent, str) and parent:
            names.add(name)
            if len(names) >= MAX_ADAPTERS_PER_POD:
                break
    return frozenset(names)


class AdapterTracker:
    """Per pod: the adapters of its last `/v1/models` listing plus those its metrics showed in use since."""

    def __init__(self) -> None:
        self._listed: dict[str, frozenset[str]] = {}
        self._in_use: dict[str, frozenset[str]] = {}
        self._keys: set[str] | None = None  # None: every pod reported is kept

    def view(self) -> dict[str, frozenset[str]]:
        """Pod key -> adapters it serves (pods serving none are left out)."""
        out: dict[str, frozenset[str]] = {}
        for key in self._listed.keys() | self._in_use.keys():
            names = self._listed.get(key, frozenset()) | self._in_use.get(key, frozenset())
            if names:
                out[key] = names
        return out

    def retain(self, keys: Iterable[str]) -> None:
        """Only these pods are followed from now on (the others left the ready set)."""
        self._keys = set(keys)
        self._listed = {k: v for k, v in self._listed.items() if k in self._keys}
        self._in_use = {k: v for k, v in self._in_use.items() if k in self._keys}

    def listed(self, key: str, names: frozenset[str]) -> None:
        """A successful listing: it replaces what the pod's metrics showed before it."""
        if self._keys is not None and key not in self._keys:
            return
        self._listed[key] = names
        self._in_use.pop(key, None)

    def in_use(self, metrics: Mapping[str, frozenset[str]]) -> None:
        """Adapters the engines reported running or waiting (pod key -> names; absent: no scrape)."""
        for key, names in metrics.items():
            if not names or (self._keys is not None and key not in self._keys):
                continue
            new = names - self._listed.get(key, frozenset())
            if new:
                self._in_use[key] = self._in_use.get(key, frozenset()) | new


class AdapterPoller(PodPoller):
    """Lists every ready pod's `/v1/models` each `interval` and publishes the merged view
    (`AdapterTracker.view`) whenever it changes; `observe_in_use` feeds the engine metrics' adapters."""

    def __init__(self, publish: Callable[[dict[str, frozenset[str]]], None], *, interval: float = 1.0,
                 timeout: float = 1.0) -> None:
        super().__init__(interval=interval, timeout=timeout, name="adapter-poller")
        self._publish = publish
        self.tracker = AdapterTracker()
        self._last: dict[str, frozenset[str]] = {}
        self._warned: set[str] = set()

    def set_pods(self, pods: Iterable[Pod]) -> bool:
        added = super().set_pods(pods)
        self.tracker.retain(self._pods)
        self._changed()
        return added

    def observe_in_use(self, metrics: Mapping[str, frozenset[str]]) -> None:
        self.tracker.in_use(metrics)
        self._changed()

    async def _list(self, pod: Pod) -> tuple[str, frozenset[str] | None]:
        answer = await self.get(pod, MODELS_PATH)
        if answer is None:
            return pod.key, None  # no answer in time: keep what is known, the health checks judge the pod
        status, body = answer
        if status >= 500:
            return pod.key, None  # a failing pod: as with no answer
        if status in (404, 405):
            return pod.key, frozenset()  # no model list served (not a vLLM-style engine): no adapters from it
        try:
            if status != 200:  # e.g. 401: an engine started with an API key of its own
                raise AdapterListError(f"HTTP {status}")
            names = parse_model_list(body)
        except AdapterListError as exc:
            if pod.key not in self._warned:
                self._warned.add(pod.key)
                log.warning("pod %s (%s): %s is unusable (%s); its LoRA adapters come from other sources only",
                            pod.key, pod.address, MODELS_PATH, exc)
            return pod.key, frozenset()
        self._warned.discard(pod.key)
        return pod.key, names

    async def poll_all(self) -> None:
        results = await asyncio.gather(*(self._list(p) for p in list(self._pods.values())))
        for key, names in results:
            if names is not None:
                self.tracker.listed(key, names)
        self._changed()

    def _changed(self) -> None:
        view = self.tracker.view()
        if view != self._last:
            for key in sorted(view.keys() | self._last.keys()):
                before, after = self._last.get(key, frozenset()), view.get(key, frozenset())
                if after - before:
                    log.info("pod %s serves LoRA adapter(s) %s", key, ", ".join(sorted(after - before)))
                if before - after:
                    log.info("pod %s no longer serves LoRA adapter(s) %s", key, ", ".join(sorted(before - after)))
            self._last = view
            self._publish(view)
