"""`extproc-router serve`: wire discovery, the routing core, the ext_proc gRPC service and the HTTP
port together, and shut them down in order."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from collections.abc import Callable
from typing import Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, disable_created_metrics

from ext_proc.h2grpc import GrpcServer
from ext_proc.health import HEALTH_CHECK_PATH, HealthHandler
from ext_proc.http_app import build_http_app
from ext_proc.metrics import RouterMetrics, RouterStateCollector, StrategyCollector
from ext_proc.prefill import PrefillClient
from ext_proc.service import PROCESS_PATH, ExtProcService, ServiceSettings, models_list
from extproc_router.config import (
    ConfigError,
    RouterConfig,
    kv_event_settings,
    prefix_cache_settings,
    split_hostport,
    statesync_settings,
)
from extproc_router.discovery.adapters import AdapterPoller
from extproc_router.discovery.manager import FileDiscovery
from extproc_router.discovery.pod_metrics import PodMetricsScraper
from extproc_router.discovery.static_file import DiscoveryError, PodFile, read_pod_file
from extproc_router.kv_events import KvEventSubscribers, load_engine_tokenizers, parse_tokenizer_map
from extproc_router.policy import parse_api_keys, parse_users
from routing.pods import PodSnapshot
from routing.router import Router, RoutingSettings
from routing.stats import EngineStats
from routing.tokenizers import count_tokens
from statesync import StateSync

log = logging.getLogger("extproc_router")

class PodSource(Protocol):
    """Pod discovery as the router needs it (FileDiscovery, KubernetesDiscovery): snapshots go to the
    `publish` callback it was made with; `ready` once the first pod set is known."""

    ready: bool

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


DiscoveryFactory = Callable[[Callable[[PodSnapshot], None]], PodSource]


class RouterProcess:
    """Everything one router process runs. `start()` then `stop()`; used by `serve` and tests.

    Pods come from `cfg.pods_file` unless `make_discovery` builds another source (it gets the
    router's publish callback); the gateway file, when given, still supplies users and API keys.
    On stop, readiness is false for `drain_delay` seconds before new streams are refused.
    """

    def __init__(self, cfg: RouterConfig, make_discovery: DiscoveryFactory | None = None, *,
                 drain_delay: float = 0.0) -> None:
        if make_discovery is None and not cfg.pods_file:
            raise ConfigError("no pod file: pass --config gateway.yaml")
        self.drain_delay = drain_delay
        self.cfg = cfg
        disable_created_metrics()  # *_created series only clutter the scrape
        self.registry = CollectorRegistry()
        self.metrics = RouterMetrics(self.registry)
        try:
            self.router = Router(RoutingSettings(default_strategy=cfg.routing_algorithm,
                                                 prefix_cache=prefix_cache_settings(cfg)))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.registry.register(RouterStateCollector(lambda: self.router))
        self.registry.register(StrategyCollector(lambda: self.router))
        # Precise prefix-cache state: every replica follows the engines' KV-cache events itself.
        kv_blocks = self.router.stats.kv_blocks
        try:
            kv_blocks.set_tokenizers(*load_engine_tokenizers(parse_tokenizer_map(cfg.kv_events_tokenizers)))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.kv_events = KvEventSubscribers(kv_blocks, kv_event_settings(cfg))
        self.registry.register(self.kv_events.collector())
        # Cross-replica state: exists before discovery, which publishes the first pod snapshot.
        self.statesync: StateSync | None = None
        if cfg.statesync_enabled and cfg.redis_host:
            self.statesync = StateSync(statesync_settings(cfg), registry=self.registry, load=self.router.load,
                                       index=self.router.prefix_index)
        # Every ready pod's engine /metrics, one scrape for all uses: pd ranks decode pods by running,
        # waiting and KV usage; prefix-cache prices engine queues and weighs cache pressure by the
        # KV capacity the engine reports.
        self.pod_metrics = PodMetricsScraper(self._publish_pod_metrics, interval=cfg.pod_metrics_interval_ms / 1000)
        # LoRA adapters the ready pods report (/v1/models, and the metrics' adapters in use), served on
        # top of the ones discovery knows (pod file, ModelAdapters): see `_publish_adapters`.
        self.adapters = AdapterPoller(self._publish_adapters, interval=cfg.adapters_interval)
        self._discovered = PodSnapshot({})
        self._reported_adapters: dict[str, frozenset[str]] = {}
        self.discovery: PodSource
        if make_discovery is None:
            file_discovery = FileDiscovery(cfg.pods_file, self._publish_snapshot,
                                           poll_interval=cfg.reload_interval, health_interval=cfg.health_interval,
                                           health_timeout=cfg.health_timeout,
                                           unhealthy_threshold=cfg.unhealthy_threshold)
            pod_file = file_discovery.load_initial()
            self.discovery = file_discovery
        else:
            pod_file = read_pod_file(cfg.pods_file) if cfg.pods_file else PodFile()
            if pod_file.pods:
                log.warning("%s lists pods; they are ignored: pods come from discovery", cfg.pods_file)
            self.discovery = make_discovery(self._publish_snapshot)
        users, default_limits = parse_users(pod_file.users)
        settings = ServiceSettings(max_body_bytes=cfg.max_body_bytes,
                                   api_keys=parse_api_keys(pod_file.auth, os.environ),
                                   users=users, default_user_limits=default_limits, gie=cfg.protocol == "gie")
        self.redis = None
        limiter = None
        if cfg.redis_host:
            from extproc_router.ratelimit.redis_limiter import RedisLimiter
            from extproc_router.resp import PipelinedRedis
            self.redis = PipelinedRedis(cfg.redis_host, cfg.redis_port, password=cfg.redis_password,
                                        tls=cfg.redis_tls, timeout=1.0)
            limiter = RedisLimiter(self.redis, on_error=lambda op: self.metrics.ratelimit_errors.labels(op).inc())
        self.service = ExtProcService(self.router, self.metrics, settings, limiter=limiter,
                                      prompt_tokens=count_tokens, prefill=PrefillClient(cfg.prefill_timeout))
        self.draining = False
        self.grpc = GrpcServer({
            PROCESS_PATH: self.service.handler,
            HEALTH_CHECK_PATH: lambda s: HealthHandler(s, self.is_ready),
        }, max_message_bytes=cfg.max_body_bytes + 1024 * 1024)
        self._http_runner: web.AppRunner | None = None
        self.grpc_port = 0
        self.http_port = 0

    def _publish_snapshot(self, snapshot: PodSnapshot) -> None:
        self._discovered = snapshot
        self.adapters.set_pods(p for m in snapshot.models.values() for p in m.ready)
        self.router.update_snapshot(snapshot.with_adapters(self._reported_adapters))
        if self.statesync is not None:
            self.statesync.on_pods(snapshot)
        self.pod_metrics.set_pods(p for m in snapshot.models.values() for p in m.ready)
        self.kv_events.set_pods(p for m in snapshot.models.values() for p in m.ready)

    def _publish_adapters(self, adapters: dict[str, frozenset[str]]) -> None:
        """The pods' own adapter reports changed: the last discovered pods, serving those too."""
        self._reported_adapters = adapters
        self.router.update_snapshot(self._discovered.with_adapters(adapters))

    def _publish_pod_metrics(self, metrics: dict[str, EngineStats]) -> None:
        in_use = {k: m.lora_adapters for k, m in metrics.items() if m.lora_adapters}
        if in_use:
            self.adapters.observe_in_use(in_use)
        stats = self.router.stats
        before = dict(stats.kv_capacity)
        stats.update_engine(metrics)
        if stats.kv_capacity != before:
            log.debug("KV capacity (tokens) by pod: %s", stats.kv_capacity)

    def flush_prefix_cache(self) -> int:
        """`POST /flush_cache`: forget every prefix the index holds (the pods' caches were flushed,
        e.g. between benchmark arms); the entries dropped."""
        return self.router.flush_prefix_index()

    def is_ready(self) -> bool:
        return self.discovery.ready and not self.draining

    async def start(self) -> None:
        if self.redis is not None:
            try:
                await self.redis.call("PING")
                log.info("Redis at %s:%d: rate limits are shared by every replica", self.cfg.redis_host,
                         self.cfg.redis_port)
            except Exception as exc:
                log.warning("Redis at %s:%d is unreachable (%s): rate limits fail open until it answers",
                            self.cfg.redis_host, self.cfg.redis_port, exc)
        elif self.service.control.settings.users:
            log.warning("no REDIS_HOST: per-user limits are counted in this process only; with N replicas "
                        "a user gets N times the configured budget")
        if self.cfg.statesync_enabled and not self.cfg.redis_host:
            log.warning("AIBRIX_STATESYNC_ENABLED=true but REDIS_HOST is not set: prefix-cache state and in-flight "
                        "counts stay in this process; with several replicas their routing will disagree")
        elif self.cfg.redis_host and not self.cfg.statesync_enabled:
            log.info("AIBRIX_STATESYNC_ENABLED is not true: Redis serves rate limits only; prefix-cache state and "
                     "in-flight counts are not shared between replicas")
        await self.kv_events.start()  # before discovery: its first snapshot names the pods to follow
        await self.discovery.start()
        if self.statesync is not None:
            # Catch up (snapshots + stream tail, bounded wait) before the first request is routed.
            await self.statesync.start()
        await self.pod_metrics.start()
        await self.adapters.start(first_round=True)  # the pods' adapters are routable from the first request
        host, port = split_hostport(self.cfg.grpc_listen, "grpc_listen")
        self.grpc_port = await self.grpc.start(host, port)
        app = build_http_app(self.registry, lambda: models_list(self.router), self.is_ready,
                             flush=self.flush_prefix_cache, authorized=self.service.control.api_key_ok)
        self._http_runner = web.AppRunner(app, access_log=None)
        await self._http_runner.setup()
        hhost, hport = split_hostport(self.cfg.http_listen, "http_listen")
        site = web.TCPSite(self._http_runner, hhost, hport)
        await site.start()
        self.http_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        snap = self.router.snapshot
        log.info("router ready: ext_proc gRPC on %s:%d, HTTP on %s:%d, %d models, %d/%d pods ready, "
                 "default strategy %s", host, self.grpc_port, hhost, self.http_port, len(snap.models),
                 sum(len(m.ready) for m in snap.models.values()), sum(len(m.pods) for m in snap.models.values()),
                 self.cfg.routing_algorithm or "random")

    async def stop(self) -> None:
        """Readiness goes false first, then in-flight streams get `shutdown_grace` to finish."""
        self.draining = True
        if self.drain_delay > 0 and self.grpc_port:
            # Still serving new streams: Envoy health checks and Kubernetes endpoints need this long to
            # see readiness false and move new requests elsewhere; refusing them now would fail them.
            log.info("readiness is false; refusing new streams in %.1fs", self.drain_delay)
            await asyncio.sleep(self.drain_delay)
        await self.grpc.stop(self.cfg.shutdown_grace)
        if self.statesync is not None:
            await self.statesync.stop()  # after the last stream: its decisions are published too
        if self._http_runner is not None:
            await self._http_runner.cleanup()
        await self.discovery.stop()
        await self.kv_events.stop()
        await self.pod_metrics.stop()
        await self.adapters.stop()
        await self.service.control.prefill.close()
        if self.redis is not None:
            await self.redis.close()


async def serve(cfg: RouterConfig, make_discovery: DiscoveryFactory | None = None, *,
                drain_delay: float = 0.0) -> int:
    try:
        proc = RouterProcess(cfg, make_discovery, drain_delay=drain_delay)
    except (ConfigError, DiscoveryError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await proc.start()
    except (OSError, DiscoveryError) as exc:
        log.error("cannot start: %s", exc)
        await proc.stop()
        return 1
    # Everything loaded so far (protobuf descriptors, modules) lives for the whole process. Freezing
    # it keeps full collections from rescanning it: measured 29 ms gen-2 pauses without this, which
    # were the router's p99 at 1,000 req/s.
    gc.collect()
    gc.freeze()
    await stop.wait()
    log.info("shutting down: draining %d open streams (grace %.0fs)", proc.grpc.open_streams,
             cfg.shutdown_grace)
    await proc.stop()
    log.info("stopped")
    return 0
