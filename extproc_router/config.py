"""The router's configuration: one typed object, loaded once (defaults, then the `router:` section
of the pod file, then environment variables, then command-line flags) and passed down.

Each default is stated once. The prefix-cache settings' defaults (and the measurements behind them)
are PrefixCacheSettings' in routing/strategies/prefix_cache.py, statesync's are StateSyncSettings';
RouterConfig's fields for them take their defaults from those objects, and `prefix_cache_settings`
and `statesync_settings` build those objects back from a RouterConfig, field by field.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from extproc_router.kv_events import KvEventSettings, parse_tokenizer_map
from routing.strategies.prefix_cache import PrefixCacheSettings
from statesync import StateSyncSettings


class ConfigError(ValueError):
    """A setting has a bad value; the message names the setting and where it came from."""


_PC = PrefixCacheSettings()  # read for its defaults
_SYNC = StateSyncSettings(redis_host="")  # read for its defaults
_KV = KvEventSettings()  # read for its defaults


PROTOCOLS = ("aibrix", "gie")


@dataclass
class RouterConfig:
    pods_file: str | None = None
    grpc_listen: str = "127.0.0.1:50052"   # ext_proc + gRPC health
    http_listen: str = "127.0.0.1:8080"    # /metrics, /v1/models, /health, /ready
    routing_algorithm: str | None = None   # None: the router's default strategy (routing.router)
    max_body_bytes: int = 4 * 1024 * 1024  # keep equal to Envoy's bufferLimit
    health_interval: float = 1.0
    health_timeout: float = 1.0
    unhealthy_threshold: int = 1
    reload_interval: float = 1.0
    shutdown_grace: float = 10.0
    log_level: str = "info"
    # How the picked pod is handed to Envoy: `aibrix` (the `target-pod` header the rendered bootstrap
    # routes on) or `gie` (also the Gateway API Inference Extension's endpoint-picker protocol:
    # `x-gateway-destination-endpoint` header and `envoy.lb` metadata, and its subset hint honoured).
    protocol: str = "aibrix"
    # Redis: rate-limit budgets shared by replicas, and state sync below. Unset: in-process only.
    redis_host: str | None = None
    redis_port: int = _SYNC.redis_port
    redis_password: str | None = _SYNC.redis_password
    redis_tls: bool = _SYNC.redis_tls
    # Cross-replica routing state through Redis (statesync/): prefix-index deltas and in-flight load.
    # Off unless AIBRIX_STATESYNC_ENABLED=true (the seed's switch), and only with redis_host.
    # What each setting does: StateSyncSettings (STATESYNC_FIELDS maps the names).
    statesync_enabled: bool = False
    statesync_flush_ms: float = _SYNC.flush_interval * 1000
    statesync_snapshot_interval: float = _SYNC.snapshot_interval
    statesync_stream_maxlen: int = _SYNC.stream_maxlen
    statesync_load_interval_ms: int = round(_SYNC.load_interval * 1000)
    statesync_namespace: str = _SYNC.namespace
    prefill_timeout: float = 30.0  # pd: the router's prefill call (AIBRIX_PREFILL_REQUEST_TIMEOUT, seconds)
    pod_metrics_interval_ms: int = 100  # pd: scrape prefill/decode pods' /metrics this often
    adapters_interval: float = 1.0  # list every ready pod's /v1/models (its LoRA adapters) this often, seconds
    # Prefix-cache routing (the reference's AIBRIX_PREFIX_CACHE_*): `prefix_cache_<name>` is
    # PrefixCacheSettings' `<name>`, whose defaults, rationale and ranges (`validate`, run by
    # build_config) live there.
    prefix_cache_tokenizer_type: str = _PC.tokenizer_type
    prefix_cache_block_size: int | None = _PC.block_size  # None: the tokenizer's DEFAULT_BLOCK_SIZE
    prefix_cache_hash_seed: int | None = None  # None: PrefixCacheSettings' fixed seed, shared by all replicas
    prefix_cache_max_prefix_blocks: int = _PC.max_prefix_blocks
    prefix_cache_block_number: int = _PC.block_number
    prefix_cache_eviction_duration_mins: float = _PC.eviction_duration_mins
    prefix_cache_min_match_pct: float = _PC.min_match_pct
    prefix_cache_load_guard: str = _PC.load_guard
    prefix_cache_imbalance_abs_count: int = _PC.imbalance_abs_count
    prefix_cache_stddev_factor: float = _PC.stddev_factor
    prefix_cache_cost_request_tokens: float = _PC.cost_request_tokens
    prefix_cache_prefill_tokens_per_s: float = _PC.prefill_tokens_per_s
    prefix_cache_kv_window_s: float = _PC.kv_window_s
    prefix_cache_pod_kv_tokens: int = _PC.pod_kv_tokens
    prefix_cache_kv_pressure_weight: float = _PC.kv_pressure_weight
    prefix_cache_cost_waiting_tokens: float = _PC.cost_waiting_tokens
    prefix_cache_kv_events_speculative_s: float = _PC.kv_events_speculative_s
    prefix_cache_kv_events_max_blocks_per_pod: int = _PC.kv_events_max_blocks_per_pod
    # Precise prefix-cache routing from the engines' KV-cache events (extproc_router/kv_events.py;
    # KvEventSettings states the defaults and what they mean).
    kv_events_enabled: bool = _KV.enabled
    kv_events_tokenizers: str | None = _KV.tokenizers
    kv_events_replay_timeout_ms: int = _KV.replay_timeout_ms


# Environment variables users of the reference gateway already know, plus ours for the rest.
ENV_VARS: dict[str, str] = {
    "ROUTING_ALGORITHM": "routing_algorithm",
    "AIBRIX_GRPC_MAX_MESSAGE_SIZE_BYTES": "max_body_bytes",
    "EXTPROC_ROUTER_GRPC_LISTEN": "grpc_listen",
    "EXTPROC_ROUTER_HTTP_LISTEN": "http_listen",
    "EXTPROC_ROUTER_HEALTH_INTERVAL": "health_interval",
    "EXTPROC_ROUTER_LOG_LEVEL": "log_level",
    "EXTPROC_ROUTER_PROTOCOL": "protocol",
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
    "EXTPROC_ROUTER_ADAPTERS_INTERVAL": "adapters_interval",
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
    "EXTPROC_ROUTER_KV_EVENTS_SPECULATIVE_SECONDS": "prefix_cache_kv_events_speculative_s",
    "EXTPROC_ROUTER_KV_EVENTS_MAX_BLOCKS_PER_POD": "prefix_cache_kv_events_max_blocks_per_pod",
    "EXTPROC_ROUTER_KV_EVENTS": "kv_events_enabled",
    "EXTPROC_ROUTER_KV_EVENTS_TOKENIZERS": "kv_events_tokenizers",
    "EXTPROC_ROUTER_KV_EVENTS_REPLAY_TIMEOUT_MS": "kv_events_replay_timeout_ms",
}

# RouterConfig's `prefix_cache_<name>` is PrefixCacheSettings' `<name>`.
PREFIX_CACHE = "prefix_cache_"

# StateSyncSettings field -> the RouterConfig field it is read from. A RouterConfig field ending in
# `_ms` is in milliseconds, StateSyncSettings' in seconds. Unlisted fields (start_timeout) keep
# StateSyncSettings' default.
STATESYNC_FIELDS: dict[str, str] = {
    "redis_host": "redis_host",
    "redis_port": "redis_port",
    "redis_password": "redis_password",
    "redis_tls": "redis_tls",
    "flush_interval": "statesync_flush_ms",
    "snapshot_interval": "statesync_snapshot_interval",
    "stream_maxlen": "statesync_stream_maxlen",
    "load_interval": "statesync_load_interval_ms",
    "namespace": "statesync_namespace",
}

_KINDS = {f.name: f.type for f in fields(RouterConfig)}


def _coerce(name: str, value: Any, source: str) -> Any:
    kind = _KINDS[name]
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
    # Numbers must be positive, except the prefix-cache ones: PrefixCacheSettings.validate() states
    # their ranges (0 is meaningful for several), and build_config runs it.
    positive = not name.startswith(PREFIX_CACHE)
    try:
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError
            v = int(value)
            if positive and v < 1:
                raise ValueError
            return v
        if kind == "float":
            v = float(value)
            if positive and not v > 0:  # also rejects NaN
                raise ValueError
            return v
    except (TypeError, ValueError):
        what = "a positive number" if positive else "an integer" if kind == "int" else "a number"
        raise ConfigError(f"{source}: {name} must be {what}, got {value!r}") from None
    if value is None or value == "":
        return None
    return str(value)


def split_hostport(value: str, what: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"{what}: expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def prefix_cache_settings(cfg: RouterConfig) -> PrefixCacheSettings:
    """The `prefix-cache` strategy's settings: every PrefixCacheSettings field from RouterConfig's
    `prefix_cache_<field>`; None there keeps PrefixCacheSettings' own default (the fixed hash seed,
    the tokenizer's block size)."""
    values = {f.name: getattr(cfg, PREFIX_CACHE + f.name) for f in fields(PrefixCacheSettings)}
    return PrefixCacheSettings(**{name: v for name, v in values.items() if v is not None})


def kv_event_settings(cfg: RouterConfig) -> KvEventSettings:
    """The KV-event subscribers' settings from the configuration object."""
    return KvEventSettings(enabled=cfg.kv_events_enabled, tokenizers=cfg.kv_events_tokenizers,
                           replay_timeout_ms=cfg.kv_events_replay_timeout_ms)


def statesync_settings(cfg: RouterConfig) -> StateSyncSettings:
    """Statesync's settings from the configuration object (requires `cfg.redis_host`)."""
    assert cfg.redis_host
    values: dict[str, Any] = {}
    for f in fields(StateSyncSettings):
        key = STATESYNC_FIELDS.get(f.name)
        if key is not None:
            value = getattr(cfg, key)
            values[f.name] = value / 1000 if key.endswith("_ms") else value
    return StateSyncSettings(**values)


def _check_prefix_cache(cfg: RouterConfig, origin: Mapping[str, str]) -> None:
    """Run PrefixCacheSettings.validate() now, so a bad value stops the router at start-up with a
    message naming the variable (and the pod-file key or flag, when it was set there)."""
    try:
        prefix_cache_settings(cfg).validate()
    except ValueError as exc:
        message = str(exc)
        var = message.partition(" ")[0]  # validate() names the env var first
        source = origin.get(ENV_VARS.get(var, ""), f"env {var}")
        raise ConfigError(message if source == f"env {var}" else f"{source}: {message}") from None


def build_config(file_section: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                 flags: Mapping[str, Any] | None = None) -> RouterConfig:
    """Merge the layers; later layers win. Unknown keys in the file section are errors."""
    cfg = RouterConfig()
    origin: dict[str, str] = {}  # setting -> where its value came from, for error messages

    def set_value(key: str, value: Any, source: str) -> None:
        setattr(cfg, key, _coerce(key, value, source))
        origin[key] = source

    for key, value in (file_section or {}).items():
        if key not in _KINDS or key == "pods_file":
            raise ConfigError(f"pod file router.{key}: unknown setting; allowed: "
                              f"{', '.join(sorted(_KINDS.keys() - {'pods_file'}))}")
        set_value(key, value, f"pod file router.{key}")
    env = os.environ if env is None else env
    for var, key in ENV_VARS.items():
        if env.get(var):
            set_value(key, env[var], f"env {var}")
    for key, value in (flags or {}).items():
        if value is None:
            continue
        if key == "pods_file":
            cfg.pods_file = value
        else:
            set_value(key, value, f"--{key.replace('_', '-')}")
    split_hostport(cfg.grpc_listen, "grpc_listen")
    split_hostport(cfg.http_listen, "http_listen")
    if cfg.protocol not in PROTOCOLS:
        raise ConfigError(f"{origin.get('protocol', 'protocol')}: protocol must be one of {', '.join(PROTOCOLS)}, "
                          f"got {cfg.protocol!r}")
    _check_prefix_cache(cfg, origin)
    try:
        parse_tokenizer_map(cfg.kv_events_tokenizers)
    except ValueError as exc:
        source = origin.get("kv_events_tokenizers", "kv_events_tokenizers")
        raise ConfigError(f"{source}: {exc}") from None
    return cfg
