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
    # Redis: rate-limit budgets shared by replicas, and state sync below. Unset: in-process only.
    redis_host: str | None = None
    redis_port: int = 6379
    redis_password: str | None = None
    redis_tls: bool = False
    # Cross-replica routing state through Redis (statesync/): prefix-index deltas and in-flight load.
    # Off unless AIBRIX_STATESYNC_ENABLED=true (the seed's switch), and only with redis_host.
    statesync_enabled: bool = False
    statesync_flush_ms: float = 5.0  # new deltas are published this long after the first of them (one entry)
    statesync_snapshot_interval: float = 10.0  # seconds between this replica's compacted snapshots
    statesync_stream_maxlen: int = 10_000  # stream entries Redis keeps (XADD MAXLEN ~): bounds its memory
    statesync_load_interval_ms: int = 100  # share in-flight counts this often (the reference's period)
    statesync_namespace: str = "extproc:sync"  # key prefix: fleets sharing one Redis need different ones
    # Prefix-cache routing (the reference's AIBRIX_PREFIX_CACHE_*); values are checked by the strategy,
    # whose error names the variable. Defaults and their rationale: routing/strategies/prefix_cache.py.
    prefill_timeout: float = 30.0  # pd: the router's prefill call (AIBRIX_PREFILL_REQUEST_TIMEOUT, seconds)
    pod_metrics_interval_ms: int = 100  # pd: scrape prefill/decode pods' /metrics this often
    prefix_cache_tokenizer_type: str = "character"
    prefix_cache_block_size: int | None = None  # None: 128 for characters, 16 for tiktoken tokens
    prefix_cache_hash_seed: int | None = None  # None: the fixed built-in seed, shared by all replicas
    prefix_cache_max_prefix_blocks: int = 1024
    prefix_cache_block_number: int = 200_000
    prefix_cache_eviction_duration_mins: float = 20.0
    prefix_cache_min_match_pct: float = 10.0
    prefix_cache_load_guard: str = "cost"
    prefix_cache_imbalance_abs_count: int = 16
    prefix_cache_stddev_factor: float = 1.0
    prefix_cache_cost_request_tokens: float = 64.0
    prefix_cache_prefill_tokens_per_s: float = 16000.0
    prefix_cache_kv_window_s: float = 300.0
    prefix_cache_pod_kv_tokens: int = 0
    prefix_cache_kv_pressure_weight: float = 2.0
    prefix_cache_cost_waiting_tokens: float = 800.0


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
    "AIBRIX_STATESYNC_ENABLED": "statesync_enabled",
    "EXTPROC_ROUTER_STATESYNC_FLUSH_MS": "statesync_flush_ms",
    "EXTPROC_ROUTER_STATESYNC_SNAPSHOT_INTERVAL": "statesync_snapshot_interval",
    "EXTPROC_ROUTER_STATESYNC_STREAM_MAXLEN": "statesync_stream_maxlen",
    "EXTPROC_ROUTER_STATESYNC_LOAD_INTERVAL_MS": "statesync_load_interval_ms",
    "EXTPROC_ROUTER_STATESYNC_NAMESPACE": "statesync_namespace",
    "AIBRIX_PREFILL_REQUEST_TIMEOUT": "prefill_timeout",
    "AIBRIX_POD_METRIC_REFRESH_INTERVAL_MS": "pod_metrics_interval_ms",
    "AIBRIX_PREFIX_CACHE_TOKENIZER_TYPE": "prefix_cache_tokenizer_type",
    "AIBRIX_PREFIX_CACHE_BLOCK_SIZE": "prefix_cache_block_size",
    "AIBRIX_PREFIX_CACHE_HASH_SEED": "prefix_cache_hash_seed",
    "AIBRIX_PREFIX_CACHE_MAX_PREFIX_BLOCKS": "prefix_cache_max_prefix_blocks",
    "AIBRIX_PREFIX_CACHE_BLOCK_NUMBER": "prefix_cache_block_number",
    "AIBRIX_PREFIX_CACHE_EVICTION_DURATION_MINS": "prefix_cache_eviction_duration_mins",
    "AIBRIX_PREFIX_CACHE_MIN_MATCH_PCT": "prefix_cache_min_match_pct",
    "AIBRIX_PREFIX_CACHE_LOAD_GUARD": "prefix_cache_load_guard",
    "AIBRIX_PREFIX_CACHE_POD_RUNNING_REQUEST_IMBALANCE_ABS_COUNT": "prefix_cache_imbalance_abs_count",
    "AIBRIX_PREFIX_CACHE_STANDARD_DEVIATION_FACTOR": "prefix_cache_stddev_factor",
    "AIBRIX_PREFIX_CACHE_COST_REQUEST_TOKENS": "prefix_cache_cost_request_tokens",
    "AIBRIX_PREFIX_CACHE_PREFILL_TOKENS_PER_SEC": "prefix_cache_prefill_tokens_per_s",
    "AIBRIX_PREFIX_CACHE_KV_WINDOW_SECONDS": "prefix_cache_kv_window_s",
    "AIBRIX_PREFIX_CACHE_POD_KV_TOKENS": "prefix_cache_pod_kv_tokens",
    "AIBRIX_PREFIX_CACHE_KV_PRESSURE_WEIGHT": "prefix_cache_kv_pressure_weight",
    "AIBRIX_PREFIX_CACHE_COST_WAITING_TOKENS": "prefix_cache_cost_waiting_tokens",
}

# Settings where 0 is a meaningful value (a seed, a percentage, a threshold, a weight).
_ZERO_OK = frozenset({"prefix_cache_hash_seed", "prefix_cache_min_match_pct", "prefix_cache_imbalance_abs_count",
                      "prefix_cache_stddev_factor", "prefix_cache_cost_request_tokens",
                      "prefix_cache_prefill_tokens_per_s", "prefix_cache_kv_window_s",
                      "prefix_cache_pod_kv_tokens", "prefix_cache_kv_pressure_weight",
                      "prefix_cache_cost_waiting_tokens"})


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
    kind = kind.removesuffix(" | None")
    lowest = 0 if name in _ZERO_OK else 1  # ints; floats must be > 0 unless zero is allowed
    try:
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError
            v = int(value)
            if v < lowest:
                raise ValueError
            return v
        if kind == "float":
            v = float(value)
            if v < 0 or (v == 0 and lowest) or v != v:
                raise ValueError
            return v
    except (TypeError, ValueError):
        what = "a non-negative" if lowest == 0 else "a positive"
        raise ConfigError(f"{source}: {name} must be {what} number, got {value!r}") from None
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
