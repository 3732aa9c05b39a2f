"""Pods, models and the immutable snapshot the strategies read.

A snapshot is rebuilt whenever discovery or health state changes; a routing decision reads one
snapshot and never sees a half-applied update.
"""

from __future__ import annotations

from collections.abc import Mapping
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
    """A served model: every known pod, the routable subset, and its raw profile JSON."""

    name: str
    pods: tuple[Pod, ...]
    ready: tuple[Pod, ...]
    config_json: str | None = None


class PodSnapshot:
    """Immutable view of all models and their routable pods at one instant."""

    __slots__ = ("_by_address", "models", "version")

    def __init__(self, models: Mapping[str, ModelEntry], version: int = 0) -> None:
        self.models: dict[str, ModelEntry] = dict(models)
        self.version = version
        self._by_address = {p.address: p for m in self.models.values() for p in m.pods}

    def model(self, name: str) -> ModelEntry | None:
        return self.models.get(name)

    def pod_by_address(self, address: str) -> Pod | None:
        return self._by_address.get(address)

    def model_names(self) -> list[str]:
        return sorted(self.models)

    @classmethod
    def build(cls, pods: list[Pod], ready_keys: set[str], configs: Mapping[str, str | None],
              version: int = 0) -> PodSnapshot:
        """Group pods by model; `ready_keys` holds the keys of pods that passed their health check."""
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
        return cls(models, version)


def _first_pod_config(pods: list[Pod]) -> str | None:
    # The reference reads the profile annotation from the first pod that carries one.
    for pod in pods:
        value = pod.annotations.get(ANNOTATION_CONFIG)
        if value:
            return value
    return None
