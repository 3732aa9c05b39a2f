"""Prometheus collectors (ext_proc/metrics.py)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from ext_proc.metrics import RouterStateCollector, StrategyCollector
from tests.unit.routing.prefix_cache_helpers import SYSTEM, chat, make_router, route


def test_metrics_collector_exposes_the_counters() -> None:
    router = make_router(n=2)
    route(router, chat(SYSTEM, "q"))
    route(router, chat(SYSTEM, "q2"))
    registry = CollectorRegistry()
    registry.register(RouterStateCollector(lambda: router))
    registry.register(StrategyCollector(lambda: router))
    text = generate_latest(registry).decode()
    assert 'extproc_prefix_cache_routing_decisions_total{match_percent_bucket="76-100",model="m"} 1.0' in text
    assert 'extproc_prefix_cache_routing_selection_total{model="m",selection="prefix_match"} 1.0' in text
    assert "extproc_prefix_cache_index_entries " in text and 'extproc_inflight_prefill_tokens{' in text
    assert "extproc_pod_kv_capacity_tokens{" not in text  # capacity unknown: no series, no pressure
    router.stats.kv_capacity = {"default/m-0": 1000.0, "default/m-1": 1000.0}
    text = generate_latest(registry).decode()
    assert 'extproc_pod_kv_capacity_tokens{model="m",pod="m-0"} 1000.0' in text
    pressures = [line for line in text.splitlines() if line.startswith("extproc_prefix_cache_kv_pressure{")]
    assert sorted(line.rpartition(" ")[2] for line in pressures) == ["0.0", "0.768"], pressures  # 24 blocks x 32
