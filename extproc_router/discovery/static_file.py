"""Pod discovery from a YAML file, reloaded when it changes.

    models:
      demo-model:
        config: {"defaultProfile": "default", "profiles": {...}}   # model.aibrix.ai/config (object or JSON text)
        pods:
          - name: demo-model-0
            address: 127.0.0.1:8101          # or ip: + port (default: label model.aibrix.ai/port, else 8000)
            namespace: default               # optional
            labels: {role-name: prefill, roleset-name: rs0}
            annotations: {model.aibrix.ai/config: "..."}
            kv_events_port: 5557             # optional: the engine's KV-events PUB port on the pod's IP
            kv_events_replay_port: 5558      # optional: its replay (ROUTER) port
            adapters: [sql-lora, chat-lora]  # optional: LoRA adapters the pod serves (the pod's own
                                             # /v1/models adds those loaded at run time)

`kv_events_port` / `kv_events_replay_port` are short for the annotations
`model.aibrix.ai/kv-events-port` / `model.aibrix.ai/kv-events-replay-port` (the Kubernetes form).
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from routing.pods import LABEL_PORT, Pod

DEFAULT_POD_PORT = 8000
# Where a pod's engine publishes its KV-cache events (vLLM's --kv-events-config endpoint and
# replay_endpoint ports), read as annotations, else labels, on the pod (extproc_router.kv_events).
ANNOTATION_KV_EVENTS_PORT = "model.aibrix.ai/kv-events-port"
ANNOTATION_KV_EVENTS_REPLAY_PORT = "model.aibrix.ai/kv-events-replay-port"
_KV_EVENTS_KEYS = {"kv_events_port": ANNOTATION_KV_EVENTS_PORT,
                   "kv_events_replay_port": ANNOTATION_KV_EVENTS_REPLAY_PORT}


class DiscoveryError(ValueError):
    """The pod file is unusable; the message names the file and the offending entry."""


@dataclass
class PodFile:
    """What one read of the file yields."""

    pods: list[Pod] = field(default_factory=list)
    model_configs: dict[str, str | None] = field(default_factory=dict)
    router: dict[str, Any] = field(default_factory=dict)
    users: dict[str, Any] = field(default_factory=dict)  # user -> {rpm, tpm}: validated by the config layer
    auth: dict[str, Any] = field(default_factory=dict)  # {api_keys: [...]}
    adapters: dict[str, tuple[str, ...]] = field(default_factory=dict)  # pod key -> LoRA adapters it serves


def _address(where: str, item: dict[str, Any], labels: dict[str, str]) -> str:
    if "address" in item:
        raw = str(item["address"])
        host, sep, port_s = raw.rpartition(":")
        if not sep:
            raise DiscoveryError(f"{where}.address: expected 'ip:port', got {raw!r}")
    else:
        if "ip" not in item:
            raise DiscoveryError(f"{where}: needs 'address' (ip:port) or 'ip'")
        host = str(item["ip"])
        port_s = str(item.get("port", labels.get(LABEL_PORT, DEFAULT_POD_PORT)))
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        # Envoy's ORIGINAL_DST cluster takes only a literal IP: a hostname would give 503 later.
        raise DiscoveryError(f"{where}: {host!r} is not a literal IP address (Envoy routes only to IPs)") from None
    try:
        port = int(port_s)
    except ValueError:
        raise DiscoveryError(f"{where}: port {port_s!r} is not an integer") from None
    if not 0 < port < 65536:
        raise DiscoveryError(f"{where}: port {port} is out of range")
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _config_text(where: str, value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return json.dumps(value)
    raise DiscoveryError(f"{where}: expected a JSON object or JSON text")


def _str_map(where: str, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DiscoveryError(f"{where}: expected a mapping")
    return {str(k): (v if isinstance(v, str) else json.dumps(v)) for k, v in value.items()}


def parse_pod_file(data: Any, source: str = "<config>") -> PodFile:
    """Validate the parsed YAML document and build pods. Raises DiscoveryError."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DiscoveryError(f"{source}: top level must be a mapping with 'models'")
    unknown = set(data) - {"models", "router", "users", "auth"}
    if unknown:
        raise DiscoveryError(f"{source}: unknown top-level key(s) {sorted(unknown)}; "
                             "allowed: models, router, users, auth")
    for key in ("router", "users", "auth"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise DiscoveryError(f"{source}: '{key}' must be a mapping")
    out = PodFile(router=dict(data.get("router") or {}), users=dict(data.get("users") or {}),
                  auth=dict(data.get("auth") or {}))
    models = data.get("models") or {}
    if not isinstance(models, dict):
        raise DiscoveryError(f"{source}: 'models' must map model names to their pods")
    seen_addr: dict[str, str] = {}
    seen_key: set[str] = set()
    for model, spec in models.items():
        where = f"{source}: models.{model}"
        spec = spec or {}
        if not isinstance(spec, dict):
            raise DiscoveryError(f"{where}: expected a mapping with 'pods' (and optional 'config')")
        unknown = set(spec) - {"pods", "config"}
        if unknown:
            raise DiscoveryError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: pods, config")
        out.model_configs[str(model)] = _config_text(f"{where}.config", spec.get("config"))
        pods = spec.get("pods") or []
        if not isinstance(pods, list):
            raise DiscoveryError(f"{where}.pods: expected a list")
        for i, item in enumerate(pods):
            pw = f"{where}.pods[{i}]"
            if not isinstance(item, dict):
                raise DiscoveryError(f"{pw}: expected a mapping")
            unknown = set(item) - {"name", "address", "ip", "port", "namespace", "labels", "annotations",
                                   "adapters", *_KV_EVENTS_KEYS}
            if unknown:
                raise DiscoveryError(f"{pw}: unknown key(s) {sorted(unknown)}")
            labels = _str_map(f"{pw}.labels", item.get("labels"))
            annotations = _str_map(f"{pw}.annotations", item.get("annotations"))
            for key, annotation in _KV_EVENTS_KEYS.items():
                if key in item:
                    annotations[annotation] = str(item[key])
            for annotation in _KV_EVENTS_KEYS.values():
                value = annotations.get(annotation, labels.get(annotation))
                if value is not None and not (value.isdigit() and 0 < int(value) < 65536):
                    raise DiscoveryError(f"{pw}: {annotation} must be a port, got {value!r}")
            address = _address(pw, item, labels)
            name = str(item.get("name") or f"{model}-{i}")
            namespace = str(item.get("namespace") or "default")
            pod = Pod(name=name, address=address, model=str(model), namespace=namespace,
                      labels=labels, annotations=annotations)
            if pod.key in seen_key:
                raise DiscoveryError(f"{pw}: duplicate pod {pod.key}")
            if address in seen_addr:
                raise DiscoveryError(f"{pw}: address {address} is already used by pod {seen_addr[address]}")
            seen_key.add(pod.key)
            seen_addr[address] = pod.key
            out.pods.append(pod)
            adapters = _adapters(f"{pw}.adapters", item.get("adapters"), {str(m) for m in models})
            if adapters:
                out.adapters[pod.key] = adapters
    return out


def _adapters(where: str, value: Any, models: set[str]) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise DiscoveryError(f"{where}: expected a list of LoRA adapter names")
    names = tuple(dict.fromkeys(v.strip() for v in value))
    clash = sorted(n for n in names if n in models)
    if clash:
        raise DiscoveryError(f"{where}: {', '.join(clash)} is a model of this file, not an adapter")
    return names


def read_pod_file(path: str | os.PathLike[str]) -> PodFile:
    """Read and validate the file. Raises DiscoveryError (also for YAML syntax errors)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise DiscoveryError(f"{p}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DiscoveryError(f"{p}: invalid YAML: {exc}") from None
    return parse_pod_file(data, str(p))


def file_signature(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """Cheap change detector: (mtime_ns, size); None when the file is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)
