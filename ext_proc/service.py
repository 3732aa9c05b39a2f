"""The ExternalProcessor service: one handler per ext_proc stream, i.e. per HTTP request.

Message flow with the bootstrap `extproc-router envoy-config` renders (request body BUFFERED): the
router answers the request headers at once (API key check, spoofed `target-pod` stripped) and
routes in its answer to the buffered body. With request body STREAMED and
`send_body_without_waiting_for_header_response` (another bootstrap) Envoy sends headers and body
chunks without waiting and the router routes in its headers answer, then acknowledges each chunk.
The stream stays open until the HTTP stream ends (response trailers are subscribed to), so
`on_close` is where the request's accounting is released, for any ending.

What to do with the request (auth, limits, profile, decision, pd's prefill call) is
`ext_proc/control.py`; this module only maps it onto Envoy's messages. Everything is synchronous
except rate limits backed by Redis and pd's prefill call: such a request continues in a task;
requests without them never touch the event loop's scheduler.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from ext_proc import messages as msgs
from ext_proc.control import (
    LOOKUP,
    MODELS_PATH,
    RequestControl,
    ServiceSettings,
    check_plan,
    models_list,
    path_error,
    too_large,
)
from ext_proc.metrics import RouterMetrics
from ext_proc.prefill import PrefillClient
from extproc_router.ratelimit.limits import Limiter, UserLimits, Verdict
from extproc_router.ratelimit.usage import UsageScanner
from routing.errors import OPENAI, RoutingError
from routing.request import RoutingRequest, dump_body, error_style, parse_body
from routing.router import Decision, ProfileChoice, Router

if TYPE_CHECKING:
    from ext_proc.h2grpc import ServerStream

log = logging.getLogger("extproc_router.requests")

PROCESS_PATH = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
_STREAMED = processing_mode_pb2.ProcessingMode.STREAMED
_FromString = ep.ProcessingRequest.FromString

# Headers the router reads; everything else in the request is left alone.
_WANTED = frozenset({":path", ":method", "routing-strategy", "config-profile", "user", "x-request-id",
                     "target-pod", "authorization", "x-api-key", "content-type", "x-session-id",
                     "x-aibrix-session-key", "traceparent", msgs.GIE_DESTINATION_HEADER})
# Destinations only the router sets: a client's copy is removed (Envoy strips `target-pod` before any
# filter too; the Inference Extension's header is the gateway's business, so the router removes it).
_DESTINATION_HEADERS = (msgs.TARGET_POD_HEADER, msgs.GIE_DESTINATION_HEADER)

# Response body is only subscribed to for requests whose tokens count against a TPM limit; every
# field must be set because a mode override replaces the whole mode.
_USAGE_MODE = processing_mode_pb2.ProcessingMode(
    request_header_mode=processing_mode_pb2.ProcessingMode.SEND,
    response_header_mode=processing_mode_pb2.ProcessingMode.SKIP,
    request_body_mode=processing_mode_pb2.ProcessingMode.BUFFERED,
    response_body_mode=processing_mode_pb2.ProcessingMode.STREAMED,
    request_trailer_mode=processing_mode_pb2.ProcessingMode.SKIP,
    response_trailer_mode=processing_mode_pb2.ProcessingMode.SEND)

__all__ = ["PROCESS_PATH", "ExtProcService", "ExtProcStream", "ServiceSettings", "models_list"]


class ExtProcService:
    """The ext_proc handler factory: request control plus the count of open streams."""

    def __init__(self, router: Router, metrics: RouterMetrics, settings: ServiceSettings | None = None,
                 models_body: Callable[[], dict] | None = None, limiter: Limiter | None = None,
                 prompt_tokens: Callable[[str], int] | None = None, prefill: PrefillClient | None = None) -> None:
        self.control = RequestControl(router, metrics, settings, limiter, prompt_tokens, prefill)
        self.models_body = models_body or (lambda: models_list(router))
        self.active = 0

    @property
    def router(self) -> Router:
        return self.control.router

    def handler(self, stream: ServerStream) -> ExtProcStream:
        return ExtProcStream(self, stream)


class ExtProcStream:
    """State machine of one HTTP request's ext_proc stream."""

    __slots__ = (
        "_body",
        "_chunks",
        "_ctl",
        "_nbytes",
        "_pipelined",
        "_stream",
        "_style",
        "_subset",
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
        self._ctl = service.control
        self._stream = stream
        self._body: bytes | bytearray = b""
        self._chunks = 0
        self._nbytes = 0
        self._pipelined = True
        self._subset: frozenset[str] | None = None  # GIE: the endpoints the data plane allows
        self._usage: UsageScanner | None = None
        self._style = OPENAI  # the error shape of the request's path
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
        ctl = self._ctl
        self.closed = True
        self._svc.active -= 1
        if self.decision is not None:
            ctl.router.release(self.decision)
        elif not self.done:
            ctl.metrics.streams_reset.inc()
        if self._usage is not None and self._usage.total_tokens and self.user:
            ctl.spawn(ctl.limiter.add_tokens(self.user, self._usage.total_tokens))

    # -- phases ----------------------------------------------------------------------------------
    def _on_headers(self, req: ep.ProcessingRequest) -> None:
        hdrs = self.headers
        for h in req.request_headers.headers.headers:
            if h.key in _WANTED:
                hdrs[h.key] = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        path = hdrs.get(":path", "")
        q = path.find("?")
        self.path = path if q < 0 else path[:q]
        self._style = error_style(self.path)
        self.method = hdrs.get(":method", "")
        self.request_id = hdrs.get("x-request-id") or uuid.uuid4().hex
        self.user = hdrs.get("user", "").strip()
        pc = req.protocol_config
        self._pipelined = pc.request_body_mode == _STREAMED and pc.send_body_without_waiting_for_header_response
        if self._ctl.settings.gie:
            self._subset = msgs.subset_hint(req)
        ctl = self._ctl
        if not ctl.api_key_ok(hdrs.get("authorization"), hdrs.get("x-api-key")):
            ctl.metrics.auth_failures.inc()
            self._fail(RoutingError(401, "Incorrect API key provided.", code="invalid_api_key", param="api_key",
                                    cause="authentication"))
            return
        bodyless = req.request_headers.end_of_stream
        if bodyless and self.path == MODELS_PATH and self.method == "GET":
            self.done = True
            self._stream.send_message(msgs.json_immediate_response(
                200, self._svc.models_body(), [("request-id", self.request_id)]))
            return
        err = path_error(self.method, self.path, not bodyless)
        if err is not None:
            self._fail(err)
            return
        if self._pipelined:
            return  # answered together with the body
        if self.user:
            limits = ctl.limits_now(self.user)
            if limits is LOOKUP:
                ctl.spawn(self._guarded(self._answer_headers_after_lookup()))
                return
            self.limits = limits
        self._answer_headers()

    async def _answer_headers_after_lookup(self) -> None:
        self.limits = await self._ctl.user_limits(self.user)
        if not self.closed:
            self._answer_headers()

    def _answer_headers(self) -> None:
        if self.limits is not None and self.limits.tpm:
            # Count this user's tokens: subscribe to the response body of this request only.
            self._usage = UsageScanner()
            msg = ep.ProcessingResponse(request_headers=ep.HeadersResponse(
                response=ep.CommonResponse(header_mutation=ep.HeaderMutation(
                    remove_headers=[h for h in _DESTINATION_HEADERS if h in self.headers]))),
                mode_override=_USAGE_MODE)
            self._stream.send_message(msg.SerializeToString())
            return
        if msgs.GIE_DESTINATION_HEADER in self.headers:
            self._stream.send_message(msgs.strip_headers_response(h for h in _DESTINATION_HEADERS if h in self.headers))
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
            limit = self._ctl.settings.max_body_bytes
            if self._nbytes > limit:
                self._fail(too_large(limit))
                return
        if body.end_of_stream:
            raw, self._body = self._body, b""
            self._route(raw)

    def _on_response_body(self, body: ep.HttpBody) -> None:
        if self._usage is not None:
            self._usage.feed(body.body, body.end_of_stream)
        self._stream.send_message(msgs.EMPTY_RESPONSE_BODY_RESPONSE)

    def _route(self, raw: bytes | bytearray) -> None:
        ctl = self._ctl
        t0 = time.perf_counter()
        model = ""
        try:
            request = parse_body(self.path, raw, self.headers.get("content-type"))
            model = request.model
            entry = ctl.router.model_entry(model)
            if self._pipelined and self.user:
                self.limits = ctl.configured_limits(self.user)
            admission = ctl.admit(request, entry, self.headers.get("config-profile"), self.user, self.limits)
        except RoutingError as err:
            self._fail(err, model=model)
            return
        if ctl.needs_limit_check(self.limits, admission):
            verdict = ctl.limiter.check_request_now(self.user, self.limits, model, admission.model_rps)
            if verdict is None:
                ctl.spawn(self._guarded(self._check_then_decide(request, admission.choice, admission.model_rps, t0)))
                return
            self._decide(request, admission.choice, verdict, t0)
            return
        self._decide(request, admission.choice, None, t0)

    async def _check_then_decide(self, request: RoutingRequest, choice: ProfileChoice | None,
                                 model_rps: float | None, t0: float) -> None:
        verdict = await self._ctl.limiter.check_request(self.user, self.limits, request.model, model_rps)
        if not self.closed:  # the client may have gone while Redis answered
            self._decide(request, choice, verdict, t0)

    def _decide(self, request: RoutingRequest, choice: ProfileChoice | None, verdict: Verdict | None,
                t0: float) -> None:
        ctl = self._ctl
        if verdict is not None and not verdict.allowed:
            self._fail(ctl.count_rate_limited(verdict), model=request.model,
                       extra=[("retry-after", str(verdict.retry_after))])
            return
        try:
            decision = ctl.router.decide(request, self.headers.get("routing-strategy") or None, choice,
                                         self.headers, allowed=self._subset)
        except RoutingError as err:
            self._fail(err, model=request.model)
            return
        refused = check_plan(request, decision)
        if refused is not None:
            ctl.router.release(decision)
            self._fail(refused, model=request.model)
            return
        self.decision = decision
        self.done = True
        ctl.metrics.observe_decision(decision.strategy, time.perf_counter() - t0)
        if decision.prefill is not None:
            ctl.spawn(self._guarded(self._prefill_then_route(request, decision)))
            return
        ctl.count_routed(decision, self._nbytes)
        send = self._stream.send_message
        send(msgs.routed_response("request_headers" if self._pipelined else "request_body",
                                  *self._destination(decision)))
        if self._pipelined:
            body_ack = msgs.EMPTY_BODY_RESPONSE
            for _ in range(self._chunks):
                send(body_ack)

    async def _prefill_then_route(self, request: RoutingRequest, decision: Decision) -> None:
        """pd: send the prefill call, then route to the decode pod with the body it needs."""
        ctl = self._ctl
        try:
            body = await ctl.prefill_call(decision, request, self.path, self.headers, self.request_id)
        except RoutingError as err:
            self.decision = None  # released by request control: nothing was sent to the decode pod
            if not self.closed:
                self._fail(err, model=request.model)
            return
        if self.closed:
            return
        try:
            raw = dump_body(body)
        except RoutingError as err:
            ctl.router.release(decision)
            self.decision = None
            self._fail(err, model=request.model)
            return
        ctl.count_routed(decision, self._nbytes)
        send = self._stream.send_message
        headers, echo, lb_endpoint = self._destination(decision)
        send(msgs.routed_with_body("request_headers" if self._pipelined else "request_body", headers, echo, raw,
                                   lb_endpoint))
        if self._pipelined:
            for i in range(self._chunks):
                send(msgs.body_chunk_replacement(raw if i == 0 else None))

    async def _guarded(self, step: Coroutine[Any, Any, None]) -> None:
        """A step that continues in a task must end in an answer whatever goes wrong: a task that
        died unobserved would leave Envoy waiting (a 504 a minute later) and the pod's load booked."""
        try:
            await step
        except Exception:
            log.exception("request %s: internal error", self.request_id)
            if self.decision is not None:
                self._ctl.router.release(self.decision)
                self.decision = None
            if not self.closed:
                self._fail(RoutingError(500, "internal error in the gateway; the request was not routed",
                                        code="internal_error", cause="internal"))

    def _destination(self, decision: Decision) -> tuple[dict[str, str], dict[str, str], str | None]:
        """Request headers to set, echo metadata, and the `envoy.lb` endpoint (GIE) of a routed answer."""
        address = decision.pod.address
        if self._ctl.settings.gie:
            return {msgs.TARGET_POD_HEADER: address, msgs.GIE_DESTINATION_HEADER: address}, self._echo(), address
        return {msgs.TARGET_POD_HEADER: address}, self._echo(), None

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

    def _fail(self, err: RoutingError, model: str = "", extra: list[tuple[str, str]] | None = None) -> None:
        self.done = True
        self.status = str(err.status)
        self._ctl.count_failure(err, model, self.headers.get("routing-strategy") or "")
        log.info("request %s %s %s -> %d %s", self.request_id, self.method, self.path, err.status, err.message)
        self._stream.send_message(msgs.error_response(err, self.request_id, extra or (), self._style))
