"""The ExternalProcessor service: one handler per ext_proc stream, i.e. per HTTP request.

Message flow with the bootstrap `extproc-router envoy-config` renders (request body STREAMED and
`send_body_without_waiting_for_header_response`): Envoy sends the request headers and every body
chunk without waiting; the router answers the headers message with the routing decision once the
body is complete, then one empty BodyResponse per chunk. One round trip, however many chunks.
With a BUFFERED body (another bootstrap), it answers the headers at once and routes in the body
answer. The stream stays open until the HTTP stream ends (response trailers are subscribed to),
so `on_close` is where the request's accounting is released, for any ending.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from ext_proc import messages as msgs
from ext_proc.metrics import RouterMetrics
from routing.errors import RoutingError
from routing.request import ROUTED_PATHS, parse_body
from routing.router import Decision, Router

if TYPE_CHECKING:
    from ext_proc.h2grpc import ServerStream

log = logging.getLogger("extproc_router.requests")

PROCESS_PATH = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
_STREAMED = processing_mode_pb2.ProcessingMode.STREAMED
_FromString = ep.ProcessingRequest.FromString

# Headers the router reads; everything else in the request is left alone.
_WANTED = frozenset({":path", ":method", "routing-strategy", "config-profile", "user", "x-request-id",
                     "target-pod"})


@dataclass(slots=True)
class ServiceSettings:
    max_body_bytes: int = 4 * 1024 * 1024


class ExtProcService:
    """Shared state of all streams: the router, settings, metrics."""

    def __init__(self, router: Router, metrics: RouterMetrics, settings: ServiceSettings | None = None,
                 models_body: Callable[[], dict] | None = None) -> None:
        self.router = router
        self.metrics = metrics
        self.settings = settings or ServiceSettings()
        self.models_body = models_body or self._default_models_body
        self.active = 0

    def _default_models_body(self) -> dict:
        return models_list(self.router)

    def handler(self, stream: ServerStream) -> ExtProcStream:
        return ExtProcStream(self, stream)


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
        "decision",
        "done",
        "headers",
        "method",
        "path",
        "request_id",
        "status",
    )

    def __init__(self, service: ExtProcService, stream: ServerStream) -> None:
        self._svc = service
        self._stream = stream
        self._body: bytes | bytearray = b""
        self._chunks = 0
        self._nbytes = 0
        self._pipelined = True
        self.headers: dict[str, str] = {}
        self.path = ""
        self.method = ""
        self.request_id = ""
        self.decision: Decision | None = None
        self.done = False  # True once the request has been routed or answered
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
        elif kind == "response_trailers":
            self._stream.send_message(msgs.EMPTY_TRAILERS_RESPONSE)
        elif kind == "response_headers":
            self._stream.send_message(msgs.response_headers_echo(self._echo())
                                      if self.decision else msgs.EMPTY_RESPONSE_HEADERS_RESPONSE)
        elif kind == "response_body":
            self._stream.send_message(msgs.EMPTY_RESPONSE_BODY_RESPONSE)
        elif kind == "request_trailers":
            self._stream.send_message(msgs.EMPTY_REQUEST_TRAILERS_RESPONSE)

    def on_half_close(self) -> None:
        self._stream.finish()

    def on_close(self, reset: bool) -> None:
        svc = self._svc
        svc.active -= 1
        if self.decision is not None:
            svc.router.release(self.decision)
        elif not self.done:
            svc.metrics.streams_reset.inc()

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
        pc = req.protocol_config
        self._pipelined = pc.request_body_mode == _STREAMED and pc.send_body_without_waiting_for_header_response
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
        if not self._pipelined:
            # Envoy waits for this answer before it sends the body; route in the body answer.
            self._stream.send_message(msgs.STRIP_TARGET_POD_RESPONSE if "target-pod" in hdrs
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

    def _route(self, raw: bytes | bytearray) -> None:
        svc = self._svc
        t0 = time.perf_counter()
        try:
            request = parse_body(self.path, raw)
        except RoutingError as err:
            self._fail(err)
            return
        try:
            decision = svc.router.decide(request, self.headers.get("routing-strategy") or None)
        except RoutingError as err:
            # Only known model names become label values: clients must not explode cardinality.
            known = svc.router.snapshot.model(request.model) is not None
            self._fail(err, model=request.model if known else "")
            return
        self.decision = decision
        self.done = True
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

    def _echo(self) -> dict[str, str]:
        d = self.decision
        if d is None:
            return {"request-id": self.request_id}
        echo = {"target-pod": d.pod.name, "target-pod-ip": d.pod.address, "routing-strategy": d.strategy,
                "request-id": self.request_id}
        if d.profile:
            echo["x-aibrix-config-profile"] = d.profile
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

    def _fail(self, err: RoutingError, model: str = "") -> None:
        self.done = True
        self.status = str(err.status)
        self._svc.metrics.count_request(model, _strategy_label(self._svc.router, self.headers), "",
                                        self.status)
        log.info("request %s %s %s -> %d %s", self.request_id, self.method, self.path, err.status, err.message)
        self._stream.send_message(msgs.error_response(err, self.request_id))


def _strategy_label(router: Router, headers: dict[str, str]) -> str:
    name = headers.get("routing-strategy") or ""
    return name if name in router.strategies else ("" if not name else "invalid")
