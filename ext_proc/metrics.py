"""Prometheus metrics of the router process."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from routing.router import Router

_LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


class RouterMetrics:
    """Counters and histograms updated on the request path.

    Label children are cached in plain dicts: `labels()` re-validates its arguments on every call,
    which costs more than the routing decision itself.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "extproc_requests", "Requests seen by the router, by outcome. status is 'routed' or the HTTP "
            "status the router answered with; pod is empty when the router answered itself.",
            ["model", "strategy", "pod", "status"], registry=registry)
        self.decision_latency = Histogram(
            "extproc_decision_latency_seconds", "Time from the last body byte to the routing answer: "
            "JSON parse, validation and strategy pick.", ["strategy"], buckets=_LATENCY_BUCKETS,
            registry=registry)
        self.streams_reset = Counter(
            "extproc_streams_reset", "ext_proc streams that ended before the router answered "
            "(client abort or Envoy reset).", registry=registry)
        self.request_bytes = Counter("extproc_request_body_bytes", "Request body bytes received.",
                                     registry=registry)
        self.profile_errors = Counter("extproc_profile_errors", "Model config profiles (model.aibrix.ai/config) "
                                      "that could not be used; the model serves with default routing.",
                                      ["model"], registry=registry)
        self.auth_failures = Counter("extproc_auth_failures", "Requests refused for a missing or wrong API key.",
                                     registry=registry)
        self.rate_limited = Counter("extproc_rate_limited", "Requests answered 429, by the limit that tripped.",
                                    ["limit"], registry=registry)
        self.prefill_latency = Histogram("extproc_prefill_seconds", "pd: duration of the router's prefill call.",
                                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                                         registry=registry)
        self.prefill_failures = Counter("extproc_prefill_failures", "pd: prefill calls that failed or timed out "
                                        "(answered 503, nothing sent to the decode pod).", registry=registry)
        self.ratelimit_errors = Counter("extproc_ratelimit_redis_errors", "Redis errors in rate limiting; "
                                        "requests were let through (fail open).", ["operation"], registry=registry)
        self._req_children: dict[tuple[str, str, str, str], Counter] = {}
        self._lat_children: dict[str, Histogram] = {}

    def count_request(self, model: str, strategy: str, pod: str, status: str) -> None:
        key = (model, strategy, pod, status)
        child = self._req_children.get(key)
        if child is None:
            child = self._req_children[key] = self.requests.labels(*key)
        child.inc()

    def observe_decision(self, strategy: str, seconds: float) -> None:
        child = self._lat_children.get(strategy)
        if child is None:
            child = self._lat_children[strategy] = self.decision_latency.labels(strategy)
        child.observe(seconds)


class RouterStateCollector(Collector):
    """Gauges read at scrape time from the router's per-pod state, so the request path does no gauge
    work: in-flight requests and prefill tokens, readiness, KV capacity."""

    def __init__(self, router_getter: Callable[[], Router]) -> None:
        self._router = router_getter

    def collect(self) -> Iterator[GaugeMetricFamily]:
        router = self._router()
        inflight = GaugeMetricFamily("extproc_inflight_requests",
                                     "Requests this router has in flight per pod.", labels=["model", "pod"])
        ready = GaugeMetricFamily("extproc_pod_ready", "1 if the pod passes its health check.",
                                  labels=["model", "pod"])
        prefill = GaugeMetricFamily("extproc_inflight_prefill_tokens", "Uncached prompt tokens of the requests "
                                    "this router has in flight per pod (the cost guard's load signal).",
                                    labels=["model", "pod"])
        capacity = GaugeMetricFamily("extproc_pod_kv_capacity_tokens", "KV-cache capacity per pod as its engine "
                                     "reports it (or AIBRIX_PREFIX_CACHE_POD_KV_TOKENS); absent: unknown.",
                                     labels=["model", "pod"])
        stats = router.stats
        counts = router.load.snapshot()
        tokens = router.load.prefill_snapshot()
        for entry in router.snapshot.models.values():
            ready_keys = {p.key for p in entry.ready}
            for pod in entry.pods:
                labels = [entry.name, pod.name]
                inflight.add_metric(labels, counts.get(pod.key, 0))
                ready.add_metric(labels, 1 if pod.key in ready_keys else 0)
                prefill.add_metric(labels, tokens.get(pod.key, 0))
                cap = stats.capacity(pod.key)
                if cap:
                    capacity.add_metric(labels, cap)
        yield inflight
        yield ready
        yield prefill
        yield capacity


class StrategyCollector(Collector):
    """Whatever the registered strategies report of themselves (`routing.strategies.Reporter`),
    read at scrape time; the request path only bumps their plain counters."""

    def __init__(self, router_getter: Callable[[], Router]) -> None:
        self._router = router_getter

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        router = self._router()
        for reporter in router.reporters():
            for family in reporter.report(router.snapshot, router.stats):
                kind = CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily
                out = kind(family.name, family.help, labels=list(family.labels))
                for labels, value in family.samples:
                    out.add_metric(list(labels), value)
                yield out
