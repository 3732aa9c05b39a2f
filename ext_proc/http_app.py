"""The router's HTTP port: Prometheus `/metrics`, the gateway's `GET /v1/models`, liveness and
readiness probes."""

from __future__ import annotations

from collections.abc import Callable

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


def build_http_app(registry: CollectorRegistry, models_body: Callable[[], dict],
                   is_ready: Callable[[], bool]) -> web.Application:
    """Routes: GET /metrics, GET /v1/models (other methods 405), GET /health, GET /ready."""

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def models(_: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(models_body()), content_type="application/json")

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def ready(_: web.Request) -> web.Response:
        if is_ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    return app
