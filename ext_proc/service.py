"""The ExternalProcessor service: one handler per ext_proc stream, i.e. per HTTP request.

Message flow with the bootstrap `extproc-router envoy-config` renders (request body BUFFERED): the
router answers the request headers at once (API key check, spoofed `target-pod` stripped) and
routes in its answer to the buffered body. With request body STREAMED and
`send_body_without_waiting_for_header_response` (another bootstrap) Envoy sends headers and body
chunks without waiting and the router routes in its headers answer, then acknowledges each chunk.
The stream stays open until the HTTP stream ends (response trailers are subscribed to), so
`on_close` is where the request's accounting is released, for any ending.

Everything is synchronous except rate limits backed by Redis: a request that needs one continues
in a task once Redis answered; requests without limits never touch the event loop's scheduler.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import orjson
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from ext_proc import messages as msgs
from ext_proc.metrics import RouterMetrics
from ext_proc.prefill import FORWARDED_HEADERS, PrefillClient, PrefillError
from extproc_router.ratelimit.limits import LocalLimiter, UserLimits, Verdict
from extproc_router.ratelimit.redis_limiter import RedisLimiter
from extproc_router.ratelimit.usage import UsageScanner
from routing.errors import RoutingError
from routing.profiles import ProfileCache
from routing.request import ROUTED_PATHS, RoutingRequest, parse_body
from routing.router import Decision, ProfileChoice, Router
from routing.strategies.pd import PREFILL_LOAD_PREFIX, sglang_bootstrap_port

if TYPE_CHECKING:
    from ext_proc.h2grpc import ServerStream

log = logging.getLogger("extproc_router.requests")

PROCESS_PATH = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
_STREAMED = processing_mode_pb2.ProcessingMode.STREAMED
_FromString = ep.ProcessingRequest.FromString

# Headers the router reads; everything else in the request is left alone.
_WANTED = frozenset({":path", ":method", "routing-strategy", "config-profile", "user", "x-request-id",
                     "target-pod", "authorization", "content-type", "x-session-id", "traceparent"})

# Response body is only subscribed to for requests whose tokens count against a TPM limit; every
# field must be set because a mode override replaces the whole mode.
_USAGE_MODE = processing_mode_pb2.ProcessingMode(
    request_header_mode=processing_mode_pb2.ProcessingMode.SEND,
    response_header_mode=processing_mode_pb2.ProcessingMode.SKIP,
    request_body_mode=processing_mode_pb2.ProcessingMode.BUFFERED,
    response_body_mode=processing_mode_pb2.ProcessingMode.STREAMED,
    request_trailer_mode=processing_mode_pb2.ProcessingMode.SKIP,
    response_trailer_mode=processing_mode_pb2.ProcessingMode.SEND)

Limiter = LocalLimiter | RedisLimiter


@dataclass(slots=True)
class ServiceSettings:
    max_body_bytes: int = 4 * 1024 * 1024
    api_keys: frozenset[str] = frozenset()  # empty: no API key required
    users: dict[str, UserLimits] = field(default_factory=dict)  # per-user RPM/TPM from the config file
    default_user_limits: UserLimits | None = None  # for a `user` not configured anywhere


class ExtProcService:
    """Shared state of all streams: the router, settings, metrics, profiles, rate limiter."""

    def __init__(self, router: Router, metrics: RouterMetrics, settings: ServiceSettings | None = None,
                 models_body: Callable[[], dict] | None = None, limiter: Limiter | None = None,
                 prompt_tokens: Callable[[str], int] | None = None, prefill: PrefillClient | None = None) -> None:
        self.router = router
        self.metrics = metrics
        self.settings = settings or ServiceSettings()
        self.models_body = models_body or self._default_models_body
        self.limiter: Limiter = limiter or LocalLimiter()
        self.profiles = ProfileCache(self._profile_error)
        self.prompt_tokens = prompt_tokens or _estimate_tokens
        self.prefill = prefill or PrefillClient()
        self.active = 0
        self.tasks: set[asyncio.Task] = set()

    def _profile_error(self, model: str, error: str) -> None:
        log.error("model %s: %s; serving it with default routing", model, error)
        self.metrics.profile_errors.labels(model).inc()

    def api_key_ok(self, authorization: str | None) -> bool:
        keys = self.settings.api_keys
        if not keys:
            return True
        if not authorization or authorization[:7].lower() != "bearer ":
            return False
        given = authorization[7:].strip().encode()
        # Compare against every key in constant time: timing must not reveal a prefix.
        return any(hmac.compare_digest(given, k.encode()) for k in keys)

    async def user_limits(self, user: str) -> UserLimits | None:
        limits = self.settings.users.get(user)
        if limits is None and isinstance(self.limiter, RedisLimiter):
            limits = await self.limiter.user_limits(user)
        return limits if limits is not None else self.settings.default_user_limits

    def user_limits_now(self, user: str) -> UserLimits | None:
        limits = self.settings.users.get(user)
        return limits if limits is not None else self.settings.default_user_limits

    def spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _default_models_body(self) -> dict:
        return models_list(self.router)

    def handler(self, stream: ServerStream) -> ExtProcStream:
        return ExtProcStream(self, stream)


def _estimate_tokens(text: str) -> int:
    # ~4 bytes per token for English BPE; only used by `config-profile: auto` hints.
    return max(1, len(text.encode("utf-8", "replace")) // 4)


def models_list(router: Router) -> dict:
    """The OpenAI `GET /v1/models` answer, from the models the gateway knows."""
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": 0, "owned_by": "extproc-router"}
        for name in router.snapshot.model_names()]}


class ExtProcStream:
    """State machine of one HTTP request's ext_proc stream."""

    __slots__ = (
        "_body",
        "_chunks",
        "_nbytes",
        "_pipelined",
        "_stream",
        "_svc",
        "_usage",
        "closed",
        "decision",
        "done",
        "headers",
        "limits",
        "method",
        "path",
        "request_id",
        "status",
        "user",
    )

    def __init__(self, service: ExtProcService, stream: ServerStream) -> None:
        self._svc = service
        self._stream = stream
        self._body: bytes | bytearray = b""
        self._chunks = 0
        self._nbytes = 0
        self._pipelined = True
        self._usage: UsageScanner | None = None
        self.headers: dict[str, str] = {}
        self.path = ""
        self.method = ""
        self.request_id = ""
        self.user = ""
        self.limits: UserLimits | None = None
        self.decision: Decision | None = None
        self.done = False  # True once the request has been routed or answered
        self.closed = False
        self.status = ""
        service.active += 1

    # -- StreamHandler -------------------------------------------------------------------------
    def on_message(self, data: bytes) -> None:
        req = _FromString(data)
        kind = req.WhichOneof("request")
        if kind == "request_body":
            self._on_body(req.request_body)
        elif kind == "request_headers":
            self._on_headers(req)
        elif kind == "response_body":
            self._on_response_body(req.response_body)
        elif kind == "response_trailers":
            self._stream.send_message(msgs.EMPTY_TRAILERS_RESPONSE)
        elif kind == "response_headers":
            self._stream.send_message(msgs.response_headers_echo(self._echo())
                                      if self.decision else msgs.EMPTY_RESPONSE_HEADERS_RESPONSE)
        elif kind == "request_trailers":
            self._stream.send_message(msgs.EMPTY_REQUEST_TRAILERS_RESPONSE)

    def on_half_close(self) -> None:
        self._stream.finish()

    def on_close(self, reset: bool) -> None:
        svc = self._svc
        self.closed = True
        svc.active -= 1
        if self.decision is not None:
            svc.router.release(self.decision)
        elif not self.done:
            svc.metrics.streams_reset.inc()
        if self._usage is not None and self._usage.total_tokens and self.user:
            svc.spawn(svc.limiter.add_tokens(self.user, self._usage.total_tokens))

    # -- phases ----------------------------------------------------------------------------------
    def _on_headers(self, req: ep.ProcessingRequest) -> None:
        hdrs = self.headers
        for h in req.request_headers.headers.headers:
            if h.key in _WANTED:
                hdrs[h.key] = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        path = hdrs.get(":path", "")
        q = path.find("?")
        self.path = path if q < 0 else path[:q]
        self.method = hdrs.get(":method", "")
        self.request_id = hdrs.get("x-request-id") or uuid.uuid4().hex
        self.user = hdrs.get("user", "").strip()
        pc = req.protocol_config
        self._pipelined = pc.request_body_mode == _STREAMED and pc.send_body_without_waiting_for_header_response
        if not self._svc.api_key_ok(hdrs.get("authorization")):
            self._svc.metrics.auth_failures.inc()
            self._fail(RoutingError(401, "Incorrect API key provided.", code="invalid_api_key", param="api_key",
                                    cause="authentication"))
            return
        if req.request_headers.end_of_stream:
            self._answer_bodyless()
            return
        if self.path not in ROUTED_PATHS:
            self._fail(RoutingError(404, f"unsupported path {self.path!r}; this gateway serves "
                                    f"{', '.join(ROUTED_PATHS)} and GET /v1/models",
                                    code="unknown_url", cause="request-path"))
            return
        if self.method != "POST":
            self._fail(RoutingError(405, f"{self.method} {self.path} is not allowed; use POST",
                                    code="method_not_allowed", cause="request-method"))
            return
        if self._pipelined:
            return  # answered together with the body
        if self.user and isinstance(self._svc.limiter, RedisLimiter) and self.user not in self._svc.settings.users:
            self._svc.spawn(self._answer_headers_after_lookup())
            return
        if self.user:
            self.limits = self._svc.user_limits_now(self.user)
        self._answer_headers()

    async def _answer_headers_after_lookup(self) -> None:
        self.limits = await self._svc.user_limits(self.user)
        if not self.closed:
            self._answer_headers()

    def _answer_headers(self) -> None:
        if self.limits is not None and self.limits.tpm:
            # Count this user's tokens: subscribe to the response body of this request only.
            self._usage = UsageScanner()
            msg = ep.ProcessingResponse(request_headers=ep.HeadersResponse(
                response=ep.CommonResponse(header_mutation=ep.HeaderMutation(
                    remove_headers=[msgs.TARGET_POD_HEADER] if "target-pod" in self.headers else []))),
                mode_override=_USAGE_MODE)
            self._stream.send_message(msg.SerializeToString())
            return
        self._stream.send_message(msgs.STRIP_TARGET_POD_RESPONSE if "target-pod" in self.headers
                                  else msgs.EMPTY_HEADERS_RESPONSE)

    def _on_body(self, body: ep.HttpBody) -> None:
        if self.done:
            # Answered already (an error at headers time): Envoy may still stream the body it had.
            return
        chunk = body.body
        self._chunks += 1
        if chunk:
            self._nbytes += len(chunk)
            if not self._body:
                self._body = chunk  # the common case, one chunk: no copy
            else:
                if isinstance(self._body, bytes):
                    self._body = bytearray(self._body)
                self._body += chunk
            limit = self._svc.settings.max_body_bytes
            if self._nbytes > limit:
                self._fail(RoutingError(413, f"request body exceeds the gateway limit of {limit} bytes",
                                        code="request_too_large", cause="request-body-too-large"))
                return
        if body.end_of_stream:
            raw, self._body = self._body, b""
            self._route(raw)

    def _on_response_body(self, body: ep.HttpBody) -> None:
        if self._usage is not None:
            self._usage.feed(body.body, body.end_of_stream)
        self._stream.send_message(msgs.EMPTY_RESPONSE_BODY_RESPONSE)

    def _route(self, raw: bytes | bytearray) -> None:
        svc = self._svc
        t0 = time.perf_counter()
        try:
            request = parse_body(self.path, raw)
            entry = svc.router.model_entry(request.model)
        except RoutingError as err:
            self._fail(err)
            return
        profiles = svc.profiles.get(entry.name, entry.config_json)
        profile = profiles.select(self.headers.get("config-profile"), lambda: svc.prompt_tokens(request.prompt),
                                  request.max_tokens) if profiles.profiles or profiles.locked_strategy else None
        choice = None
        if profile is not None or profiles.locked_strategy:
            choice = ProfileChoice(name=profile.name if profile else None,
                                   routing_strategy=profile.routing_strategy if profile else None,
                                   locked_strategy=profiles.locked_strategy)
        model_rps = profile.requests_per_second if profile is not None else None
        limits = self.limits
        if self._pipelined and self.user:
            limits = self.limits = svc.user_limits_now(self.user)
        if limits is not None and limits.tpm and request.stream and not _include_usage(request):
            self._fail(RoutingError(400, f"user {self.user!r} has a tokens-per-minute limit: streaming requests "
                                    "must set stream_options.include_usage=true so usage can be counted",
                                    code="stream_options_include_usage_required", param="stream_options",
                                    cause="no-stream-options-include-usage"), model=request.model)
            return
        if (limits is not None and (limits.rpm or limits.tpm)) or model_rps:
            if isinstance(svc.limiter, LocalLimiter):
                verdict = svc.limiter.check_request_now(self.user, limits, request.model, model_rps)
                self._decide(request, choice, verdict, t0)
            else:
                svc.spawn(self._check_then_decide(request, choice, limits, model_rps, t0))
            return
        self._decide(request, choice, None, t0)

    async def _check_then_decide(self, request: RoutingRequest, choice: ProfileChoice | None,
                                 limits: UserLimits | None, model_rps: float | None, t0: float) -> None:
        verdict = await self._svc.limiter.check_request(self.user, limits, request.model, model_rps)
        if not self.closed:  # the client may have gone while Redis answered
            self._decide(request, choice, verdict, t0)

    def _decide(self, request: RoutingRequest, choice: ProfileChoice | None, verdict: Verdict | None,
                t0: float) -> None:
        svc = self._svc
        if verdict is not None and not verdict.allowed:
            svc.metrics.rate_limited.labels(verdict.limit).inc()
            self._fail(RoutingError(429, f"rate limit exceeded: {verdict.detail}; retry after {verdict.retry_after}s",
                                    code="rate_limit_exceeded", cause=f"{verdict.limit}-exceeded"),
                       model=request.model, extra=[("retry-after", str(verdict.retry_after))])
            return
        try:
            decision = svc.router.decide(request, self.headers.get("routing-strategy") or None, choice)
        except RoutingError as err:
            self._fail(err, model=request.model)
            return
        self.decision = decision
        self.done = True
        if decision.prefill is not None:
            svc.spawn(self._prefill_then_route(request, decision, t0))
            return
        pod = decision.pod
        svc.metrics.observe_decision(decision.strategy, time.perf_counter() - t0)
        svc.metrics.count_request(decision.model, decision.strategy, pod.name, "routed")
        svc.metrics.request_bytes.inc(self._nbytes)
        answer = msgs.routed_response("request_headers" if self._pipelined else "request_body",
                                      {msgs.TARGET_POD_HEADER: pod.address}, self._echo())
        send = self._stream.send_message
        send(answer)
        if self._pipelined:
            body_ack = msgs.EMPTY_BODY_RESPONSE
            for _ in range(self._chunks):
                send(body_ack)

    async def _prefill_then_route(self, request: RoutingRequest, decision: Decision, t0: float) -> None:
        """pd: send the prefill call, then route to the decode pod with the body it needs."""
        svc = self._svc
        prefill = decision.prefill
        assert prefill is not None and request.body is not None
        svc.metrics.observe_decision(decision.strategy, time.perf_counter() - t0)
        headers = {k: self.headers[k] for k in FORWARDED_HEADERS if k in self.headers}
        headers["x-request-id"] = self.request_id
        load_key = PREFILL_LOAD_PREFIX + prefill.key
        svc.router.load.acquire(load_key)
        t_prefill = time.perf_counter()
        try:
            if decision.engine == "sglang":
                body = svc.prefill.sglang(prefill, sglang_bootstrap_port(prefill), self.path, request.body, headers)
            else:
                body = await svc.prefill.vllm(prefill, self.path, request.body, headers)
        except PrefillError as exc:
            svc.metrics.prefill_failures.inc()
            svc.router.release(decision)
            self.decision = None
            if not self.closed:  # nothing was sent to the decode pod
                self._fail(RoutingError(503, str(exc), code="prefill_failed", cause="prefill"), model=request.model)
            return
        finally:
            svc.router.load.release(load_key)
        svc.metrics.prefill_latency.observe(time.perf_counter() - t_prefill)
        if self.closed:
            return
        raw = orjson.dumps(body)
        svc.metrics.count_request(decision.model, decision.strategy, decision.pod.name, "routed")
        svc.metrics.request_bytes.inc(self._nbytes)
        send = self._stream.send_message
        send(msgs.routed_with_body("request_headers" if self._pipelined else "request_body",
                                   {msgs.TARGET_POD_HEADER: decision.pod.address}, self._echo(), raw))
        if self._pipelined:
            for i in range(self._chunks):
                send(msgs.body_chunk_replacement(raw if i == 0 else None))

    def _echo(self) -> dict[str, str]:
        d = self.decision
        if d is None:
            return {"request-id": self.request_id}
        echo = {"target-pod": d.pod.name, "target-pod-ip": d.pod.address, "routing-strategy": d.strategy,
                "request-id": self.request_id}
        if d.profile:
            echo["x-aibrix-config-profile"] = d.profile
        if d.prefill is not None:
            echo["prefill-target-pod"] = d.prefill.name
            echo["prefill-target-pod-ip"] = d.prefill.address
        if d.echo:
            echo.update(d.echo)
        return echo

    def _answer_bodyless(self) -> None:
        if self.path == "/v1/models" and self.method == "GET":
            self.done = True
            self._stream.send_message(msgs.json_immediate_response(
                200, self._svc.models_body(), [("request-id", self.request_id)]))
            return
        if self.path in ROUTED_PATHS:
            if self.method != "POST":
                err = RoutingError(405, f"{self.method} {self.path} is not allowed; use POST",
                                   code="method_not_allowed", cause="request-method")
            else:
                err = RoutingError(400, "request body is empty; expected a JSON object",
                                   code="invalid_request", cause="request-body-processing")
        else:
            err = RoutingError(404, f"unsupported path {self.path!r}; this gateway serves "
                               f"{', '.join(ROUTED_PATHS)} and GET /v1/models",
                               code="unknown_url", cause="request-path")
        self._fail(err)

    def _fail(self, err: RoutingError, model: str = "", extra: list[tuple[str, str]] | None = None) -> None:
        self.done = True
        self.status = str(err.status)
        svc = self._svc
        # Only known model names become label values: clients must not explode cardinality.
        label = model if model and svc.router.snapshot.model(model) is not None else ""
        svc.metrics.count_request(label, _strategy_label(svc.router, self.headers), "", self.status)
        log.info("request %s %s %s -> %d %s", self.request_id, self.method, self.path, err.status, err.message)
        self._stream.send_message(msgs.error_response(err, self.request_id, extra or ()))


def _include_usage(request: RoutingRequest) -> bool:
    opts = (request.body or {}).get("stream_options")
    return isinstance(opts, dict) and opts.get("include_usage") is True


def _strategy_label(router: Router, headers: dict[str, str]) -> str:
    name = headers.get("routing-strategy") or ""
    return name if name in router.strategies else ("" if not name else "invalid")
