"""Request control: what the gateway does with one request, whatever the Envoy message flow.

auth -> path and method -> body parse -> config profile -> rate limits -> routing decision ->
(pd) the prefill call. `ext_proc/service.py` drives these steps from Envoy's messages; every
answer that is not a route is a `RoutingError`, built here once.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from ext_proc.metrics import RouterMetrics
from ext_proc.prefill import FORWARDED_HEADERS, PrefillClient, PrefillError, run_prefill
from extproc_router.ratelimit.limits import LOOKUP, Limiter, LocalLimiter, Lookup, UserLimits, Verdict
from routing.errors import RoutingError
from routing.pods import ModelEntry
from routing.profiles import ProfileCache
from routing.request import PATHS, ROUTED_PATHS, RoutingRequest
from routing.router import Decision, ProfileChoice, Router
from routing.strategies.pd import PREFILL_LOAD_PREFIX

log = logging.getLogger("extproc_router.requests")

MODELS_PATH = "/v1/models"


@dataclass(slots=True)
class ServiceSettings:
    max_body_bytes: int = 4 * 1024 * 1024
    api_keys: frozenset[str] = frozenset()  # empty: no API key required
    users: dict[str, UserLimits] = field(default_factory=dict)  # per-user RPM/TPM from the config file
    default_user_limits: UserLimits | None = None  # for a `user` not configured anywhere
    gie: bool = False  # also speak the Inference Extension's endpoint-picker protocol (RouterConfig.protocol)


@dataclass(frozen=True, slots=True)
class Admission:
    """What the config profile and rate limits say about a parsed request, before the decision."""

    choice: ProfileChoice | None
    model_rps: float | None


# Listed once in the 404's message: what this gateway serves (routing/request.py's table).
_SERVED = f"POST {', '.join(ROUTED_PATHS)} and GET {MODELS_PATH}"


def path_error(method: str, path: str, has_body: bool) -> RoutingError | None:
    """The error for a request the gateway does not route (404 path, 405 method, 400 no body)."""
    spec = PATHS.get(path)
    if spec is None:
        return RoutingError(404, f"unsupported path {path!r}; this gateway serves {_SERVED}", code="unknown_url",
                            cause="request-path")
    if method != "POST":
        return RoutingError(405, f"{method} {path} is not allowed; use POST", code="method_not_allowed",
                            cause="request-method")
    if not has_body:
        return RoutingError(400, "request body is empty; expected a multipart form" if spec.multipart
                            else "request body is empty; expected a JSON object", code="invalid_request",
                            cause="request-body-processing")
    return None


def check_plan(request: RoutingRequest, decision: Decision) -> RoutingError | None:
    """A planned prefill call (pd) on a path whose engines do not split into prefill and decode is
    a 400: the router never sends a prefill call the pod would not understand."""
    if decision.prefill is None or PATHS[request.path].prefill_split:
        return None
    split = ", ".join(p for p, spec in PATHS.items() if spec.prefill_split)
    return RoutingError(400, f"routing strategy {decision.strategy!r} splits requests into prefill and decode, "
                        f"which only {split} support; choose another strategy for {request.path}",
                        code="invalid_routing_strategy", param="routing-strategy", cause="routing")


def too_large(limit: int) -> RoutingError:
    return RoutingError(413, f"request body exceeds the gateway limit of {limit} bytes", code="request_too_large",
                        cause="request-body-too-large")


def rate_limited(verdict: Verdict) -> RoutingError:
    return RoutingError(429, f"rate limit exceeded: {verdict.detail}; retry after {verdict.retry_after}s",
                        code="rate_limit_exceeded", cause=f"{verdict.limit}-exceeded")


def models_list(router: Router) -> dict:
    """The OpenAI `GET /v1/models` answer, from the models the gateway knows: the base models, then
    the LoRA adapters a ready pod serves, each with its base model as `parent` (as vLLM lists them)."""
    snapshot = router.snapshot
    return {"object": "list", "data": [
        *({"id": name, "object": "model", "created": 0, "owned_by": "extproc-router"}
          for name in snapshot.model_names()),
        *({"id": name, "object": "model", "created": 0, "owned_by": "extproc-router",
           "parent": snapshot.adapters[name].parent} for name in snapshot.adapter_names())]}


def _estimate_tokens(text: str) -> int:
    # ~4 bytes per token for English BPE; only used by `config-profile: auto` hints.
    return max(1, len(text.encode("utf-8", "replace")) // 4)


class RequestControl:
    """Shared by every request: the router, settings, metrics, profiles, rate limiter, prefill client."""

    def __init__(self, router: Router, metrics: RouterMetrics, settings: ServiceSettings | None = None,
                 limiter: Limiter | None = None, prompt_tokens: Callable[[str], int] | None = None,
                 prefill: PrefillClient | None = None) -> None:
        self.router = router
        self.metrics = metrics
        self.settings = settings or ServiceSettings()
        self.limiter: Limiter = limiter or LocalLimiter()
        self.profiles = ProfileCache(self._profile_error)
        self.prompt_tokens = prompt_tokens or _estimate_tokens
        self.prefill = prefill or PrefillClient()
        self.tasks: set[asyncio.Task] = set()

    def _profile_error(self, model: str, error: str) -> None:
        log.error("model %s: %s; serving it with default routing", model, error)
        self.metrics.profile_errors.labels(model).inc()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- auth and limits ---------------------------------------------------------------------------
    def api_key_ok(self, authorization: str | None, api_key: str | None = None) -> bool:
        """The key as `Authorization: Bearer <key>` (OpenAI clients) or `x-api-key: <key>` (Anthropic's)."""
        keys = self.settings.api_keys
        if not keys:
            return True
        if authorization and authorization[:7].lower() == "bearer ":
            given = authorization[7:].strip().encode()
        elif api_key and not authorization:
            given = api_key.strip().encode()
        else:
            return False
        # Compare against every key in constant time: timing must not reveal a prefix.
        return any(hmac.compare_digest(given, k.encode()) for k in keys)

    def configured_limits(self, user: str) -> UserLimits | None:
        """`user`'s limits from the configuration (or the default for everyone)."""
        limits = self.settings.users.get(user)
        return limits if limits is not None else self.settings.default_user_limits

    def limits_now(self, user: str) -> UserLimits | Lookup | None:
        """`user`'s limits when known without waiting; LOOKUP: await `user_limits` (shared store)."""
        limits = self.settings.users.get(user)
        if limits is not None:
            return limits
        if self.limiter.user_limits_now(user) is LOOKUP:
            return LOOKUP
        return self.settings.default_user_limits

    async def user_limits(self, user: str) -> UserLimits | None:
        limits = self.settings.users.get(user)
        if limits is None:
            limits = await self.limiter.user_limits(user)
        return limits if limits is not None else self.settings.default_user_limits

    # -- profile and admission ---------------------------------------------------------------------
    def admit(self, request: RoutingRequest, entry: ModelEntry, profile_header: str | None, user: str,
              limits: UserLimits | None) -> Admission:
        """The config profile that applies, and the checks that need no counter. Raises RoutingError."""
        profiles = self.profiles.get(entry.name, entry.config_json)
        profile = None
        if profiles.profiles or profiles.locked_strategy:
            profile = profiles.select(profile_header, lambda: self.prompt_tokens(request.prompt), request.max_tokens)
        choice = None
        if profile is not None or profiles.locked_strategy:
            choice = ProfileChoice(name=profile.name if profile else None,
                                   routing_strategy=profile.routing_strategy if profile else None,
                                   locked_strategy=profiles.locked_strategy)
        if limits is not None and limits.tpm and request.stream and not request.include_usage:
            raise RoutingError(400, f"user {user!r} has a tokens-per-minute limit: streaming requests must set "
                               "stream_options.include_usage=true (audio forms: stream_include_usage=true) "
                               "so usage can be counted",
                               code="stream_options_include_usage_required", param="stream_options",
                               cause="no-stream-options-include-usage")
        return Admission(choice, profile.requests_per_second if profile is not None else None)

    @staticmethod
    def needs_limit_check(limits: UserLimits | None, admission: Admission) -> bool:
        return (limits is not None and bool(limits.rpm or limits.tpm)) or bool(admission.model_rps)

    def count_rate_limited(self, verdict: Verdict) -> RoutingError:
        self.metrics.rate_limited.labels(verdict.limit).inc()
        return rate_limited(verdict)

    # -- pd's prefill call ---------------------------------------------------------------------------
    async def prefill_call(self, decision: Decision, request: RoutingRequest, path: str,
                           client_headers: dict[str, str], request_id: str) -> dict[str, Any]:
        """Send the prefill call of a planned decision; the decode pod's body. On failure the decision
        is released (nothing was sent to the decode pod) and a 503 RoutingError raised."""
        prefill = decision.prefill
        assert prefill is not None and request.body is not None
        headers = {k: client_headers[k] for k in FORWARDED_HEADERS if k in client_headers}
        headers["x-request-id"] = request_id
        load_key = PREFILL_LOAD_PREFIX + prefill.key
        load = self.router.load
        load.acquire(load_key)
        started = time.perf_counter()
        try:
            body = await run_prefill(decision.engine, self.prefill, prefill, path, request.body, headers)
        except PrefillError as exc:
            self.metrics.prefill_failures.inc()
            self.router.release(decision)
            raise RoutingError(503, str(exc), code="prefill_failed", cause="prefill") from None
        except BaseException:
            self.router.release(decision)  # nothing was sent to the decode pod, whatever went wrong
            raise
        finally:
            load.release(load_key)
        self.metrics.prefill_latency.observe(time.perf_counter() - started)
        return body

    # -- outcomes ------------------------------------------------------------------------------------
    def count_routed(self, decision: Decision, body_bytes: int) -> None:
        self.metrics.count_request(decision.model, decision.strategy, decision.pod.name, "routed")
        self.metrics.request_bytes.inc(body_bytes)

    def count_failure(self, err: RoutingError, model: str, strategy_header: str) -> None:
        # Only known model names become label values: clients must not explode cardinality.
        router = self.router
        label = model if model and router.snapshot.model(model) is not None else ""
        strategy = strategy_header if strategy_header in router.strategies else ("" if not strategy_header
                                                                                 else "invalid")
        self.metrics.count_request(label, strategy, "", str(err.status))

