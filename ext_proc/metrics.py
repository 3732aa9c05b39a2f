"""Prometheus metrics of the router process."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from routing.router import Router
from routing.strategies.prefix_cache import PrefixCacheStrategy

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
    """Gauges read at scrape time from the router's state, so the request path does no gauge work."""

    def __init__(self, router_getter: Callable[[], Router]) -> None:
        self._router = router_getter

    def collect(self) -> Iterator[GaugeMetricFamily]:
        router = self._router()
        inflight = GaugeMetricFamily("extproc_inflight_requests",
                                     "Requests this router has in flight per pod.", labels=["model", "pod"])
        ready = GaugeMetricFamily("extproc_pod_ready", "1 if the pod passes its health check.",
                                  labels=["model", "pod"])
        counts = router.load.snapshot()
        for entry in router.snapshot.models.values():
            ready_keys = {p.key for p in entry.ready}
            for pod in entry.pods:
                inflight.add_metric([entry.name, pod.name], counts.get(pod.key, 0))
                ready.add_metric([entry.name, pod.name], 1 if pod.key in ready_keys else 0)
        yield inflight
        yield ready


class PrefixCacheCollector(Collector):
    """The `prefix-cache` strategy's counters (kept as plain ints on the request path) and its index,
    read at scrape time. Names follow the reference's `aibrix_prefix_cache_*` with our prefix."""

    def __init__(self, router_getter: Callable[[], Router]) -> None:
        self._router = router_getter

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        router = self._router()
        strategy = router.strategies.get(PrefixCacheStrategy.name)
        if isinstance(strategy, PrefixCacheStrategy):
            yield from self._strategy_metrics(strategy)
        if isinstance(strategy, PrefixCacheStrategy):
            yield from self._kv_metrics(router, strategy)
        prefill = GaugeMetricFamily("extproc_inflight_prefill_tokens", "Uncached prompt tokens of the requests "
                                    "this router has in flight per pod (the cost guard's load signal).",
                                    labels=["model", "pod"])
        tokens = router.load.prefill_snapshot()
        for entry in router.snapshot.models.values():
            for pod in entry.pods:
                prefill.add_metric([entry.name, pod.name], tokens.get(pod.key, 0))
        yield prefill

    @staticmethod
    def _kv_metrics(router: Router, s: PrefixCacheStrategy) -> Iterator[GaugeMetricFamily]:
        capacity = GaugeMetricFamily("extproc_pod_kv_capacity_tokens", "KV-cache capacity per pod as its engine "
                                     "reports it (or AIBRIX_PREFIX_CACHE_POD_KV_TOKENS); absent: unknown.",
                                     labels=["model", "pod"])
        pressure = GaugeMetricFamily("extproc_prefix_cache_kv_pressure", "Share of the pod's KV capacity taken by "
                                     "blocks routed to it within AIBRIX_PREFIX_CACHE_KV_WINDOW_SECONDS (0..1).",
                                     labels=["model", "pod"])
        keys = [p.key for m in router.snapshot.models.values() for p in m.pods]
        shares = s.kv_pressure(keys, s.clock())
        for entry in router.snapshot.models.values():
            for pod in entry.pods:
                cap = s.kv_capacity.get(pod.key) or s.settings.pod_kv_tokens
                if cap:
                    capacity.add_metric([entry.name, pod.name], cap)
                if pod.key in shares:
                    pressure.add_metric([entry.name, pod.name], shares[pod.key])
        yield capacity
        yield pressure

    @staticmethod
    def _strategy_metrics(s: PrefixCacheStrategy) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        decisions = CounterMetricFamily("extproc_prefix_cache_routing_decisions", "prefix-cache decisions by "
                                        "the chosen pod's matched share of the prompt, in percent.",
                                        labels=["model", "match_percent_bucket"])
        for (model, bucket), n in list(s.decisions.items()):
            decisions.add_metric([model, bucket], n)
        yield decisions
        selections = CounterMetricFamily(
            "extproc_prefix_cache_routing_selection", "prefix-cache decisions by how the pod was selected: "
            "prefix_match, prefix_match_skipped (the load guard chose a pod without the prefix), "
            "least_request_fallback / least_cost_fallback (no usable match), weighted.",
            labels=["model", "selection"])
        for (model, selection), n in list(s.selections.items()):
            selections.add_metric([model, selection], n)
        yield selections
        imbalance = CounterMetricFamily("extproc_prefix_cache_load_imbalance", "stddev guard: decisions where "
                                        "the in-flight spread exceeded the absolute imbalance count.",
                                        labels=["model"])
        for model, n in list(s.imbalance.items()):
            imbalance.add_metric([model], n)
        yield imbalance
        ignored = CounterMetricFamily("extproc_prefix_cache_ignored_matches", "Decisions whose best match was "
                                      "below AIBRIX_PREFIX_CACHE_MIN_MATCH_PCT and so ignored.", labels=["model"])
        for model, n in list(s.ignored_matches.items()):
            ignored.add_metric([model], n)
        yield ignored
        errors = CounterMetricFamily("extproc_prefix_cache_routing_errors", "Prompts that could not be "
                                     "tokenized (routed as unmatched).", labels=["model", "reason"])
        for (model, reason), n in list(s.errors.items()):
            errors.add_metric([model, reason], n)
        yield errors
        index = s.index
        yield GaugeMetricFamily("extproc_prefix_cache_index_entries", "(block, pod) entries in the prefix index.",
                                value=len(index))
        yield GaugeMetricFamily("extproc_prefix_cache_index_capacity", "AIBRIX_PREFIX_CACHE_BLOCK_NUMBER.",
                                value=index.capacity)
        evictions = CounterMetricFamily("extproc_prefix_cache_index_evictions", "Entries removed from the "
                                        "prefix index, by reason.", labels=["reason"])
        st = index.stats
        for reason, n in (("capacity", st.evicted_capacity), ("ttl", st.evicted_ttl),
                          ("overflow", st.evicted_overflow), ("pod_removed", st.removed_pod)):
            evictions.add_metric([reason], n)
        yield evictions
