"""Pods, models and the immutable snapshot the strategies read.

A snapshot is rebuilt whenever discovery or health state changes; a routing decision reads one
snapshot and never sees a half-applied update.

LoRA adapters are models too: a request whose `model` names an adapter goes only to the pods that
serve it. The snapshot keeps them apart from the base models (`adapters`), each as a `ModelEntry`
whose pods are the base model's pods serving the adapter and whose profile is the base model's, so
every strategy, limit and index works on it unchanged; its name is what prefix hashing salts with,
so an adapter's KV blocks never match the base model's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

LABEL_MODEL = "model.aibrix.ai/name"
LABEL_PORT = "model.aibrix.ai/port"
LABEL_ROLE = "role-name"
LABEL_ROLESET = "roleset-name"
ANNOTATION_CONFIG = "model.aibrix.ai/config"


@dataclass(frozen=True, slots=True)
class Pod:
    """One model server endpoint the gateway may route to."""

    name: str
    address: str  # "ip:port", the only form Envoy's ORIGINAL_DST cluster accepts
    model: str
    namespace: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Namespace-qualified name: two namespaces may reuse a pod name."""
        return f"{self.namespace}/{self.name}"

    @property
    def role(self) -> str:
        return self.labels.get(LABEL_ROLE, "")

    @property
    def roleset(self) -> str:
        return self.labels.get(LABEL_ROLESET, "")


@dataclass(frozen=True, slots=True)
class ModelEntry:
    """A served model: every known pod, the routable subset, and its raw profile JSON. For a LoRA
    adapter, `parent` is the base model whose pods serve it (None for a base model)."""

    name: str
    pods: tuple[Pod, ...]
    ready: tuple[Pod, ...]
    config_json: str | None = None
    parent: str | None = None


class PodSnapshot:
    """Immutable view of all models (and LoRA adapters) and their routable pods at one instant.

    `models` holds the base models, each pod listed under exactly one; `adapters` the adapters that
    at least one ready pod serves, by name (their pods are the base models' own Pod objects).
    `pod_adapters` is what the adapters were built from: pod key -> adapter names it serves.
    `default` is the entry for requests naming a model nothing here serves; only the InferencePool
    discovery sets it (a gateway sends its picker only its pool's requests, whatever model they
    name), otherwise None and such requests get a 404.
    """

    __slots__ = ("_by_address", "adapters", "default", "models", "pod_adapters", "version")

    def __init__(self, models: Mapping[str, ModelEntry], version: int = 0, *,
                 pod_adapters: Mapping[str, Iterable[str]] | None = None, default: ModelEntry | None = None) -> None:
        self.models: dict[str, ModelEntry] = dict(models)
        self.version = version
        self.default = default
        self._by_address = {p.address: p for m in self.models.values() for p in m.pods}
        self.pod_adapters: dict[str, frozenset[str]] = {
            k: frozenset(v) for k, v in (pod_adapters or {}).items() if v}
        self.adapters: dict[str, ModelEntry] = _adapter_entries(self.models, self.pod_adapters)

    def model(self, name: str) -> ModelEntry | None:
        """The base model or adapter called `name`; None when nothing serves it."""
        entry = self.models.get(name)
        return entry if entry is not None else self.adapters.get(name)

    def pod_by_address(self, address: str) -> Pod | None:
        return self._by_address.get(address)

    def model_names(self) -> list[str]:
        """The base models, sorted (adapters: `adapter_names`)."""
        return sorted(self.models)

    def adapter_names(self) -> list[str]:
        return sorted(self.adapters)

    def with_adapters(self, extra: Mapping[str, Iterable[str]]) -> PodSnapshot:
        """The same pods, also serving `extra` (pod key -> adapter names, e.g. what the pods report
        themselves) on top of this snapshot's own adapters."""
        if not extra:
            return self
        merged = dict(self.pod_adapters)
        for key, names in extra.items():
            merged[key] = merged.get(key, frozenset()) | frozenset(names)
        return PodSnapshot(self.models, self.version, pod_adapters=merged, default=self.default)

    @classmethod
    def build(cls, pods: list[Pod], ready_keys: set[str], configs: Mapping[str, str | None],
              version: int = 0, adapters: Mapping[str, Iterable[str]] | None = None,
              default: str | None = None) -> PodSnapshot:
        """Group pods by model; `ready_keys` holds the keys of pods that passed their health check;
        `adapters` maps a pod key to the LoRA adapters the pod serves. With `default`, every pod also
        serves an entry of that name, the snapshot's `default` (used for models it does not know)."""
        by_model: dict[str, list[Pod]] = {name: [] for name in configs}
        for pod in pods:
            by_model.setdefault(pod.model, []).append(pod)
        models = {
            name: ModelEntry(
                name=name,
                pods=tuple(plist),
                ready=tuple(p for p in plist if p.key in ready_keys),
                config_json=configs.get(name) or _first_pod_config(plist),
            )
            for name, plist in by_model.items()
        }
        fallback = None
        if default is not None:
            fallback = ModelEntry(name=default, pods=tuple(pods), ready=tuple(p for p in pods if p.key in ready_keys),
                                  config_json=configs.get(default) or _first_pod_config(pods))
        return cls(models, version, pod_adapters=adapters, default=fallback)


def _adapter_entries(models: Mapping[str, ModelEntry],
                     pod_adapters: Mapping[str, frozenset[str]]) -> dict[str, ModelEntry]:
    """One entry per adapter that a ready pod serves: the base model's pods serving it, in the base
    model's order, with the base model's profile. A base model's own name is never an adapter; an
    adapter name served under two base models goes with the one that has more ready pods serving it
    (then the one with more pods, then the first name)."""
    if not pod_adapters:
        return {}
    found: dict[str, dict[str, list[Pod]]] = {}  # adapter -> base model -> pods serving it
    for entry in models.values():
        for pod in entry.pods:
            for name in pod_adapters.get(pod.key, ()):
                if name not in models:
                    found.setdefault(name, {}).setdefault(entry.name, []).append(pod)
    out: dict[str, ModelEntry] = {}
    for name in sorted(found):
        ready: dict[str, tuple[Pod, ...]] = {}
        for base, plist in found[name].items():
            ready_keys = {p.key for p in models[base].ready}
            ready[base] = tuple(p for p in plist if p.key in ready_keys)
        base = min(found[name], key=lambda b: (-len(ready[b]), -len(found[name][b]), b))
        if ready[base]:
            out[name] = ModelEntry(name=name, pods=tuple(found[name][base]), ready=ready[base],
                                   config_json=models[base].config_json, parent=base)
    return out


def _first_pod_config(pods: list[Pod]) -> str | None:
    # The reference reads the profile annotation from the first pod that carries one.
    for pod in pods:
        value = pod.annotations.get(ANNOTATION_CONFIG)
        if value:
            return value
    return None
