"""The router's HTTP port: Prometheus `/metrics`, the gateway's `GET /v1/models`, liveness and
readiness probes, and `POST /flush_cache` (sglang-router's name) to empty the prefix index."""

from __future__ import annotations

import logging
from collections.abc import Callable

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger("extproc_router.http")


def build_http_app(registry: CollectorRegistry, models_body: Callable[[], dict],
                   is_ready: Callable[[], bool], *, flush: Callable[[], int] | None = None,
                   authorized: Callable[[str | None], bool] | None = None) -> web.Application:
    """Routes: GET /metrics, GET /v1/models (other methods 405), GET /health, GET /ready,
    POST /flush_cache (other methods 405).

    `flush` forgets the router's cached prefixes and returns how many index entries it dropped; a
    benchmark calls it with the pods' own flush so that an arm starts cold on both sides. Without
    it, the route answers 0 entries.

    `authorized` checks the Authorization header: with API keys configured, `/v1/models` and
    `/flush_cache` need one, as through Envoy (this port may be reachable inside the cluster).
    Metrics and probes stay open for Prometheus and the kubelet; the Kubernetes NetworkPolicy
    limits who reaches the port at all.
    """

    def refused(request: web.Request) -> web.Response | None:
        if authorized is None or authorized(request.headers.get("Authorization")):
            return None
        body = {"error": {"message": "Incorrect API key provided.", "type": "authentication_error",
                          "param": "api_key", "code": "invalid_api_key"}}
        return web.Response(status=401, body=orjson.dumps(body), content_type="application/json")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def models(request: web.Request) -> web.Response:
        if (denied := refused(request)) is not None:
            return denied
        return web.Response(body=orjson.dumps(models_body()), content_type="application/json")

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def ready(_: web.Request) -> web.Response:
        if is_ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    async def flush_cache(request: web.Request) -> web.Response:
        if (denied := refused(request)) is not None:
            log.warning("POST /flush_cache from %s refused: no valid API key", request.remote)
            return denied
        n = flush() if flush is not None else 0
        log.info("POST /flush_cache from %s: dropped %d prefix-index entries", request.remote, n)
        return web.Response(body=orjson.dumps({"flushed_entries": n}), content_type="application/json")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_post("/flush_cache", flush_cache)
    return app
