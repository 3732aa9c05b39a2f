"""The router's configuration layers (extproc_router/config.py)."""

from __future__ import annotations

from dataclasses import fields

import pytest

from extproc_router.config import (
    ENV_VARS,
    PREFIX_CACHE,
    STATESYNC_FIELDS,
    ConfigError,
    RouterConfig,
    build_config,
    prefix_cache_settings,
    statesync_settings,
)
from routing.strategies.prefix_cache import PrefixCacheSettings
from statesync import StateSyncSettings


def test_config_layers_file_env_flags() -> None:
    cfg = build_config({"routing_algorithm": "random", "health_interval": 2},
                       env={"ROUTING_ALGORITHM": "least-request", "AIBRIX_GRPC_MAX_MESSAGE_SIZE_BYTES": "1000"},
                       flags={"health_interval": 0.5})
    assert cfg.routing_algorithm == "least-request" and cfg.max_body_bytes == 1000 and cfg.health_interval == 0.5


@pytest.mark.parametrize(("section", "env"), [
    ({"bogus": 1}, {}), ({}, {"AIBRIX_GRPC_MAX_MESSAGE_SIZE_BYTES": "lots"}), ({"health_interval": -1}, {}),
    ({"grpc_listen": "nohostport"}, {}),
])
def test_config_errors(section: dict, env: dict) -> None:
    with pytest.raises(ConfigError):
        build_config(section, env=env)


def test_config_switches() -> None:
    off = build_config(env={"REDIS_HOST": "r"})
    assert off.redis_host == "r" and not off.statesync_enabled
    on = build_config(env={"AIBRIX_STATESYNC_ENABLED": "true", "EXTPROC_ROUTER_STATESYNC_FLUSH_MS": "2",
                           "EXTPROC_ROUTER_STATESYNC_STREAM_MAXLEN": "5000"})
    assert on.statesync_enabled and on.statesync_flush_ms == 2.0 and on.statesync_stream_maxlen == 5000
    assert not build_config(env={"AIBRIX_STATESYNC_ENABLED": "false"}).statesync_enabled


def test_defaults_are_the_settings_objects() -> None:
    """RouterConfig's prefix-cache and statesync defaults are PrefixCacheSettings' and
    StateSyncSettings': an unconfigured router builds exactly their defaults."""
    assert prefix_cache_settings(RouterConfig()) == PrefixCacheSettings()
    assert statesync_settings(RouterConfig(redis_host="r")) == StateSyncSettings(redis_host="r")
    names = {f.name for f in fields(RouterConfig)}
    for f in fields(PrefixCacheSettings):
        assert PREFIX_CACHE + f.name in names and PREFIX_CACHE + f.name in ENV_VARS.values(), f.name
    assert set(STATESYNC_FIELDS.values()) <= names
    assert set(STATESYNC_FIELDS) == {f.name for f in fields(StateSyncSettings)} - {"start_timeout"}


def test_settings_objects_carry_every_configured_value() -> None:
    cfg = build_config({"prefix_cache_hash_seed": 7, "prefix_cache_kv_window_s": 0, "redis_host": "r"},
                       env={"AIBRIX_PREFIX_CACHE_COST_WAITING_TOKENS": "400", "AIBRIX_PREFIX_CACHE_BLOCK_SIZE": "64",
                            "EXTPROC_ROUTER_STATESYNC_FLUSH_MS": "2", "REDIS_PORT": "6380",
                            "EXTPROC_ROUTER_STATESYNC_LOAD_INTERVAL_MS": "250",
                            "EXTPROC_ROUTER_STATESYNC_NAMESPACE": "fleet-b"})
    ps = prefix_cache_settings(cfg)
    assert (ps.hash_seed, ps.kv_window_s, ps.cost_waiting_tokens, ps.block_size) == (7, 0.0, 400.0, 64)
    ss = statesync_settings(cfg)
    assert (ss.redis_host, ss.redis_port, ss.flush_interval, ss.load_interval, ss.namespace) == \
        ("r", 6380, 0.002, 0.25, "fleet-b")


@pytest.mark.parametrize(("section", "env", "message"), [
    ({}, {"AIBRIX_PREFIX_CACHE_MIN_MATCH_PCT": "101"}, "^AIBRIX_PREFIX_CACHE_MIN_MATCH_PCT must be from 0 to 100"),
    ({"prefix_cache_kv_pressure_weight": -1}, {},
     "^pod file router.prefix_cache_kv_pressure_weight: AIBRIX_PREFIX_CACHE_KV_PRESSURE_WEIGHT must be 0 or more"),
    ({}, {"AIBRIX_PREFIX_CACHE_EVICTION_DURATION_MINS": "0"},
     "AIBRIX_PREFIX_CACHE_EVICTION_DURATION_MINS must be positive"),
    ({}, {"AIBRIX_PREFIX_CACHE_COST_WAITING_TOKENS": "nan"},
     "AIBRIX_PREFIX_CACHE_COST_WAITING_TOKENS must be 0 or more"),
    ({}, {"AIBRIX_PREFIX_CACHE_LOAD_GUARD": "median"}, "AIBRIX_PREFIX_CACHE_LOAD_GUARD must be one of"),
    ({}, {"AIBRIX_PREFIX_CACHE_BLOCK_NUMBER": "many"}, "env AIBRIX_PREFIX_CACHE_BLOCK_NUMBER: .* an integer"),
    ({}, {"EXTPROC_ROUTER_STATESYNC_FLUSH_MS": "0"}, "env EXTPROC_ROUTER_STATESYNC_FLUSH_MS: .* a positive number"),
    ({"health_interval": float("nan")}, {}, "router.health_interval: .* a positive number"),
])
def test_bad_values_fail_at_config_time_naming_the_setting(section: dict, env: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(section, env=env)


def test_zero_is_a_value_where_the_prefix_cache_allows_it() -> None:
    zeros = {var: "0" for var, key in ENV_VARS.items() if key in {
        "prefix_cache_hash_seed", "prefix_cache_min_match_pct", "prefix_cache_imbalance_abs_count",
        "prefix_cache_stddev_factor", "prefix_cache_cost_request_tokens", "prefix_cache_prefill_tokens_per_s",
        "prefix_cache_kv_window_s", "prefix_cache_pod_kv_tokens", "prefix_cache_kv_pressure_weight",
        "prefix_cache_cost_waiting_tokens"}}
    cfg = build_config(env=zeros)
    assert all(getattr(cfg, ENV_VARS[var]) == 0 for var in zeros)
