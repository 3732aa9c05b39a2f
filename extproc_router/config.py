"""The router's configuration: one typed object, loaded once (defaults, then the `router:` section
of the pod file, then environment variables, then command-line flags) and passed down."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


class ConfigError(ValueError):
    """A setting has a bad value; the message names the setting and where it came from."""


@dataclass
class RouterConfig:
    pods_file: str | None = None
    grpc_listen: str = "127.0.0.1:50052"   # ext_proc + gRPC health
    http_listen: str = "127.0.0.1:8080"    # /metrics, /v1/models, /health, /ready
    routing_algorithm: str | None = None   # default strategy when nothing else selects one
    max_body_bytes: int = 4 * 1024 * 1024  # keep equal to Envoy's bufferLimit
    health_interval: float = 1.0
    health_timeout: float = 1.0
    unhealthy_threshold: int = 1
    reload_interval: float = 1.0
    shutdown_grace: float = 10.0
    log_level: str = "info"
    # Redis: rate-limit budgets shared by replicas (and, later, state sync). Unset: in-process only.
    redis_host: str | None = None
    redis_port: int = 6379
    redis_password: str | None = None
    redis_tls: bool = False


# Environment variables users of the reference gateway already know, plus ours for the rest.
ENV_VARS: dict[str, str] = {
    "ROUTING_ALGORITHM": "routing_algorithm",
    "AIBRIX_GRPC_MAX_MESSAGE_SIZE_BYTES": "max_body_bytes",
    "EXTPROC_ROUTER_GRPC_LISTEN": "grpc_listen",
    "EXTPROC_ROUTER_HTTP_LISTEN": "http_listen",
    "EXTPROC_ROUTER_HEALTH_INTERVAL": "health_interval",
    "EXTPROC_ROUTER_LOG_LEVEL": "log_level",
    "REDIS_HOST": "redis_host",
    "REDIS_PORT": "redis_port",
    "REDIS_PASSWORD": "redis_password",
    "REDIS_TLS": "redis_tls",
}


def _coerce(name: str, value: Any, source: str) -> Any:
    kind = {f.name: f.type for f in fields(RouterConfig)}[name]
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{source}: {name} must be true or false, got {value!r}")
    try:
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError
            v = int(value)
            if v <= 0:
                raise ValueError
            return v
        if kind == "float":
            v = float(value)
            if v <= 0:
                raise ValueError
            return v
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {name} must be a positive number, got {value!r}") from None
    if value is None or value == "":
        return None
    return str(value)


def split_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"{what}: expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def build_config(file_section: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                 flags: Mapping[str, Any] | None = None) -> RouterConfig:
    """Merge the layers; later layers win. Unknown keys in the file section are errors."""
    cfg = RouterConfig()
    names = {f.name for f in fields(RouterConfig)}
    for key, value in (file_section or {}).items():
        if key not in names or key == "pods_file":
            raise ConfigError(f"pod file router.{key}: unknown setting; allowed: "
                              f"{', '.join(sorted(names - {'pods_file'}))}")
        setattr(cfg, key, _coerce(key, value, f"pod file router.{key}"))
    env = os.environ if env is None else env
    for var, key in ENV_VARS.items():
        if env.get(var):
            setattr(cfg, key, _coerce(key, env[var], f"env {var}"))
    for key, value in (flags or {}).items():
        if value is not None:
            setattr(cfg, key, _coerce(key, value, f"--{key.replace('_', '-')}") if key != "pods_file" else value)
    split_hostport(cfg.grpc_listen, "grpc_listen")
    split_hostport(cfg.http_listen, "http_listen")
    return cfg
