"""vLLM-named Prometheus metrics of one simulated pod.

Gauges and counters are read from plain Python state at scrape time by a custom collector, so
the per-token hot path only bumps an ``int``; only the TTFT histogram uses a prometheus_client
metric object. Every simulator owns its own CollectorRegistry because tests run several sims in
one process.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Histogram, exposition
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from extproc_router.simulator.engine import SimEngine

# vLLM serves the 0.0.4 text format; routers' parsers expect it.
CONTENT_TYPE: str = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", exposition.CONTENT_TYPE_LATEST)

LORA_SERIES_KEPT = 256
"""``vllm:lora_requests_info`` label sets kept (vLLM keeps every one it ever set; the oldest go here)."""

# vLLM's own bucket boundaries for time_to_first_token_seconds.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip


@dataclass(slots=True)
class ModelCounters:
    """Monotonic counters of one served model."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    success: dict[str, int] = field(default_factory=dict)
    """Finished requests by finish reason ("stop", "length")."""
    prefill_only: int = 0
    """Prefill-only requests served for a remote decode (vLLM ``do_remote_decode``, SGLang prefill half)."""
    kv_transfers_in: int = 0
    """Requests whose prompt KV came from a prefill pod."""
    kv_transfer_tokens_in: int = 0
    """Prompt tokens whose KV came from a prefill pod."""
    external_queries: int = 0
    """Prompt tokens of transferred requests not found in the local prefix cache (vLLM's connector queries)."""
    bootstrap_timeouts: int = 0
    """SGLang decode requests answered 503: their room never became ready, or its prefill failed."""


class SimMetrics:
    """The metrics of one simulated pod, rendered in Prometheus text format."""

    def __init__(self, engine: SimEngine, models: Iterable[str], max_loras: int | None = None) -> None:
        self.models = tuple(models)
        self.max_loras = max_loras
        """vLLM's ``max_loras`` with LoRA enabled (``vllm:lora_requests_info`` is exported); None: disabled."""
        self.lora_series: dict[tuple[str, str], float] = {}
        """(waiting, running) adapter lists, comma-joined -> when that label set was last current."""
        self.counters = {m: ModelCounters() for m in self.models}
        self.registry = CollectorRegistry(auto_describe=False)
        self._ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            ["model_name"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self._ttft_by_model = {m: self._ttft.labels(model_name=m) for m in self.models}
        self.registry.register(_StateCollector(engine, self))

    def observe_ttft(self, model: str, seconds: float) -> None:
        """Record one time-to-first-token sample (arrival to first token, queueing included)."""
        self._ttft_by_model[model].observe(seconds)

    def reset(self) -> None:
        """Zero every counter and the TTFT histogram (``POST /sim/reset``)."""
        self.counters = {m: ModelCounters() for m in self.models}
        self.lora_series.clear()
        self._ttft.clear()
        self._ttft_by_model = {m: self._ttft.labels(model_name=m) for m in self.models}

    def render(self) -> bytes:
        """The exposition text of every metric."""
        return exposition.generate_latest(self.registry)


class _StateCollector(Collector):
    """Turns engine state and counters into metric families at scrape time."""

    def __init__(self, engine: SimEngine, metrics: SimMetrics) -> None:
        self._engine = engine
        self._metrics = metrics
        # The cache's shape is fixed for the pod's lifetime: its info labels are built once. Label
        # values are strings of the config values as vLLM's CacheConfig.metrics_info() renders them;
        # blocks are whole ones, as the model engine allocates them (capacity // block size).
        config = engine.config
        self._cache_info = [
            str(config.block_size),
            "auto",
            str(config.timing == "model" and config.prefix_caching),  # fixed timing has no prefix cache
            str(config.kv_capacity_tokens // config.block_size),
        ]

    def collect(self) -> Iterator[Metric]:
        engine, models = self._engine, self._metrics.models
        running = engine.running_by_model()
        waiting = engine.waiting_by_model()
        labels = ["model_name"]

        gauge = GaugeMetricFamily(
            "vllm:num_requests_running", "Number of requests in model execution batches.", labels=labels
        )
        for m in models:
            gauge.add_metric([m], running.get(m, 0))
        yield gauge

        gauge = GaugeMetricFamily(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed.", labels=labels
        )
        for m in models:
            gauge.add_metric([m], waiting.get(m, 0))
        yield gauge

        # The cache is shared by every served model, so each label carries the same value. Both
        # the classic name and the one vLLM >= 0.10 uses are exported.
        usage = engine.kv_usage
        for name in ("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc"):
            gauge = GaugeMetricFamily(name, "KV-cache usage. 1 means 100 percent usage.", labels=labels)
            for m in models:
                gauge.add_metric([m], usage)
            yield gauge

        counters = self._metrics.counters
        prompt = CounterMetricFamily("vllm:prompt_tokens", "Number of prefill tokens processed.", labels=labels)
        generation = CounterMetricFamily(
            "vllm:generation_tokens", "Number of generation tokens processed.", labels=labels
        )
        success = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=["model_name", "finished_reason"],
        )
        for m in models:
            c = counters[m]
            prompt.add_metric([m], c.prompt_tokens)
            generation.add_metric([m], c.generation_tokens)
            for reason in ("stop", "length"):
                success.add_metric([m, reason], c.success.get(reason, 0))
        yield prompt
        yield generation
        yield success

        # vLLM >= 0.7 names; queries and hits count prompt tokens, so hits / queries is the hit rate.
        by_model = engine.prefix_cache_by_model()
        queries = CounterMetricFamily(
            "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.", labels=labels
        )
        hits = CounterMetricFamily(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", labels=labels
        )
        for m in models:
            queried, hit = by_model.get(m, (0, 0))
            queries.add_metric([m], queried)
            hits.add_metric([m], hit)
        yield queries
        yield hits

        # Disaggregation. vLLM >= 0.11 names for what a KV connector supplied; sim-named for the rest.
        per_model = (
            ("vllm:external_prefix_cache_queries", "External prefix cache queries, in terms of number of "
             "queried tokens (tokens not in the local cache of requests with remote KV).",
             lambda c: c.external_queries),
            ("vllm:external_prefix_cache_hits", "External prefix cache hits, in terms of number of cached "
             "tokens (prompt tokens whose KV was transferred in).", lambda c: c.kv_transfer_tokens_in),
            ("sim:prefill_only_requests", "Prefill-only requests served for a remote decode pod.",
             lambda c: c.prefill_only),
            ("sim:kv_transfers_in", "Requests whose prompt KV was transferred in from a prefill pod.",
             lambda c: c.kv_transfers_in),
            ("sim:kv_transfer_tokens_in", "Prompt tokens whose KV was transferred in from a prefill pod.",
             lambda c: c.kv_transfer_tokens_in),
            ("sim:bootstrap_timeouts", "SGLang decode requests refused (503): bootstrap room not ready in "
             "time or its prefill failed.", lambda c: c.bootstrap_timeouts),
        )  # fmt: skip
        for name, doc, read in per_model:
            counter = CounterMetricFamily(name, doc, labels=labels)
            for m in models:
                counter.add_metric([m], read(counters[m]))
            yield counter

        # vLLM's info metric: a gauge fixed at 1 whose labels carry the engine's CacheConfig; routers
        # read the pod's KV capacity from it (num_gpu_blocks x block_size tokens). Like vLLM's, it has no
        # model_name: the one cache serves every model.
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=["block_size", "cache_dtype", "enable_prefix_caching", "num_gpu_blocks"],
        )
        info.add_metric(self._cache_info, 1.0)
        yield info

        if self._metrics.max_loras is not None:
            yield self._lora_info()

        # KV holds belong to the pod's one cache, not to a model (model timing only; zero in fixed).
        holds = engine.hold_stats()
        yield GaugeMetricFamily(
            "sim:kv_holds", "Finished prefills whose KV waits for a decode pod.", value=holds["holds"]
        )
        yield GaugeMetricFamily(
            "sim:kv_held_blocks", "KV blocks pinned for decode pods to fetch.", value=holds["held_blocks"]
        )
        yield CounterMetricFamily(
            "sim:kv_transfers_out", "KV holds released after a decode pod fetched them.", value=holds["holds_released"]
        )
        yield CounterMetricFamily(
            "sim:kv_holds_expired", "KV holds dropped unfetched after --kv-hold-seconds.", value=holds["holds_expired"]
        )

    def _lora_info(self) -> Metric:
        """vLLM's ``vllm:lora_requests_info``: the adapters of the running and waiting requests (comma-
        separated) and ``max_lora`` as labels, the value the time that label set was last current.
        Like vLLM's gauge, a label set once seen stays exported with its last time; readers take
        the newest. The current one is set to now at every scrape (vLLM sets it at every step)."""
        engine, metrics = self._engine, self._metrics
        series = metrics.lora_series
        current = (",".join(engine.waiting_loras()), ",".join(engine.running_loras()))
        series.pop(current, None)  # re-inserted last: the dict stays oldest-first
        series[current] = time.time()
        while len(series) > LORA_SERIES_KEPT:
            del series[next(iter(series))]
        gauge = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
        )
        for (waiting, running), when in series.items():
            gauge.add_metric([str(metrics.max_loras), waiting, running], when)
        return gauge
