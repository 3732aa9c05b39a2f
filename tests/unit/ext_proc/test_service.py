"""The ext_proc stream state machine, driven message by message without a network."""

from __future__ import annotations

import asyncio
import random

import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from prometheus_client import CollectorRegistry

from ext_proc.metrics import RouterMetrics
from ext_proc.service import ExtProcService, ServiceSettings
from routing.pods import Pod, PodSnapshot
from routing.router import Router


class FakeStream:
    def __init__(self) -> None:
        self.sent: list[ep.ProcessingResponse] = []
        self.finished = False

    def send_message(self, data: bytes) -> None:
        self.sent.append(ep.ProcessingResponse.FromString(data))

    def finish(self, status: int = 0, message: str = "") -> None:
        self.finished = True


def make_service(max_body: int = 1 << 20) -> ExtProcService:
    router = Router(rng=random.Random(1))
    pods = [Pod(f"p{i}", f"10.0.0.{i + 1}:8000", "m") for i in range(2)]
    router.update_snapshot(PodSnapshot.build(pods, {p.key for p in pods}, {"m": None}))
    return ExtProcService(router, RouterMetrics(CollectorRegistry()), ServiceSettings(max_body_bytes=max_body))


def headers_msg(path: str = "/v1/chat/completions", method: str = "POST", eos: bool = False,
                pipelined: bool = True, **extra: str) -> bytes:
    hdrs = {":path": path, ":method": method, "x-request-id": "rid-1", **{k.replace("_", "-"): v
                                                                        for k, v in extra.items()}}
    msg = ep.ProcessingRequest(request_headers=ep.HttpHeaders(
        headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode())
                                            for k, v in hdrs.items()]), end_of_stream=eos))
    msg.protocol_config.request_body_mode = pm.ProcessingMode.STREAMED if pipelined else pm.ProcessingMode.BUFFERED
    msg.protocol_config.send_body_without_waiting_for_header_response = pipelined
    return msg.SerializeToString()


def body_msg(data: bytes, eos: bool) -> bytes:
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=data, end_of_stream=eos)).SerializeToString()


CHAT = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}]})


def set_headers(common: ep.CommonResponse) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}


def test_pipelined_route_answers_headers_then_each_chunk() -> None:
    svc = make_service()
    stream = FakeStream()
    h = svc.handler(stream)
    h.on_message(headers_msg(routing_strategy="least-request", target_pod="6.6.6.6:1"))
    h.on_message(body_msg(CHAT[:10], False))
    h.on_message(body_msg(CHAT[10:], False))
    assert stream.sent == []  # nothing before the body is complete
    h.on_message(body_msg(b"", True))
    kinds = [m.WhichOneof("response") for m in stream.sent]
    assert kinds == ["request_headers", "request_body", "request_body", "request_body"]
    routed = set_headers(stream.sent[0].request_headers.response)
    assert routed["target-pod"] in {"10.0.0.1:8000", "10.0.0.2:8000"}
    echo = stream.sent[0].dynamic_metadata.fields["extproc-router"].struct_value.fields
    assert echo["routing-strategy"].string_value == "least-request"
    assert echo["target-pod"].string_value in {"p0", "p1"}
    assert echo["request-id"].string_value == "rid-1"
    assert svc.router.load.total == 1
    h.on_message(ep.ProcessingRequest(response_trailers=ep.HttpTrailers()).SerializeToString())
    assert stream.sent[-1].WhichOneof("response") == "response_trailers"
    h.on_half_close()
    h.on_close(reset=False)
    assert stream.finished and svc.router.load.total == 0 and svc.active == 0


def test_buffered_mode_routes_in_body_answer_and_strips_spoofed_header() -> None:
    svc = make_service()
    stream = FakeStream()
    h = svc.handler(stream)
    h.on_message(headers_msg(pipelined=False, target_pod="6.6.6.6:1"))
    assert stream.sent[0].request_headers.response.header_mutation.remove_headers == ["target-pod"]
    h.on_message(body_msg(CHAT, True))
    assert set_headers(stream.sent[1].request_body.response)["target-pod"].startswith("10.0.0.")
    h.on_close(reset=True)
    assert svc.router.load.total == 0


@pytest.mark.parametrize(("path", "method", "body", "status", "cause"), [
    ("/v1/chat/completions", "POST", b"{bad", 400, "x-error-request-body-processing"),
    ("/v1/chat/completions", "POST", b'{"messages": []}', 400, "x-error-request-body-processing"),
    ("/v1/chat/completions", "POST", orjson.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
     404, "x-error-no-model-backends"),
    ("/v1/moderations", "POST", CHAT, 404, "x-error-request-path"),
    ("/v1/chat/completions", "PUT", CHAT, 405, "x-error-request-method"),
])
def test_errors_are_openai_shaped_immediate_responses(path: str, method: str, body: bytes, status: int,
                                                      cause: str) -> None:
    svc = make_service()
    stream = FakeStream()
    h = svc.handler(stream)
    h.on_message(headers_msg(path=path, method=method))
    h.on_message(body_msg(body, True))
    assert len(stream.sent) == 1
    imm = stream.sent[0].immediate_response
    assert imm.status.code == status
    err = orjson.loads(imm.body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    names = {h.header.key for h in imm.headers.set_headers}
    assert cause in names and "content-type" in names
    h.on_close(reset=False)
    assert svc.router.load.total == 0


def test_unknown_strategy_lists_valid_ones() -> None:
    svc = make_service()
    stream = FakeStream()
    h = svc.handler(stream)
    h.on_message(headers_msg(routing_strategy="fastest"))
    h.on_message(body_msg(CHAT, True))
    imm = stream.sent[0].immediate_response
    assert imm.status.code == 400
    assert "least-request" in orjson.loads(imm.body)["error"]["message"]


def test_body_over_limit_is_413_before_the_end() -> None:
    svc = make_service(max_body=100)
    stream = FakeStream()
    h = svc.handler(stream)
    h.on_message(headers_msg())
    h.on_message(body_msg(b"x" * 60, False))
    h.on_message(body_msg(b"x" * 60, False))
    assert stream.sent[0].immediate_response.status.code == 413
    h.on_message(body_msg(b"x" * 60, True))  # Envoy may still send what it had: ignored
    assert len(stream.sent) == 1


def test_models_list_without_body_and_bodyless_post() -> None:
    svc = make_service()
    stream = FakeStream()
    svc.handler(stream).on_message(headers_msg(path="/v1/models", method="GET", eos=True))
    imm = stream.sent[0].immediate_response
    assert imm.status.code == 200 and [m["id"] for m in orjson.loads(imm.body)["data"]] == ["m"]
    stream = FakeStream()
    svc.handler(stream).on_message(headers_msg(eos=True))
    assert stream.sent[0].immediate_response.status.code == 400


def test_reset_before_answer_counts_and_releases_nothing() -> None:
    svc = make_service()
    stream = FakeStream()
    h = svc.handler(stream)
    h.on_message(headers_msg())
    h.on_close(reset=True)
    assert svc.router.load.total == 0 and svc.active == 0


def make_policy_service(**settings: object) -> ExtProcService:
    router = Router(rng=random.Random(1))
    pods = [Pod(f"p{i}", f"10.0.0.{i + 1}:8000", "m") for i in range(2)]
    profiles = orjson.dumps({"defaultProfile": "default", "profiles": {
        "default": {"routingStrategy": "random"},
        "low-latency": {"routingStrategy": "least-request", "requestsPerSecond": 2}}}).decode()
    router.update_snapshot(PodSnapshot.build(pods, {p.key for p in pods}, {"m": profiles}))
    return ExtProcService(router, RouterMetrics(CollectorRegistry()), ServiceSettings(**settings))


def run_request(svc: ExtProcService, body: bytes = CHAT, **headers: str) -> FakeStream:
    stream = FakeStream()
    h = svc.handler(stream)
    h.on_message(headers_msg(pipelined=False, **headers))
    if not stream.sent or stream.sent[-1].WhichOneof("response") != "immediate_response":
        h.on_message(body_msg(body, True))
    h.on_close(reset=False)
    return stream


def test_profile_header_picks_strategy_and_is_echoed() -> None:
    svc = make_policy_service()
    md = run_request(svc, config_profile="low-latency").sent[-1].dynamic_metadata.fields["extproc-router"]
    assert md.struct_value.fields["routing-strategy"].string_value == "least-request"
    assert md.struct_value.fields["x-aibrix-config-profile"].string_value == "low-latency"
    md = run_request(svc, config_profile="unknown").sent[-1].dynamic_metadata.fields["extproc-router"]
    assert md.struct_value.fields["x-aibrix-config-profile"].string_value == "default"
    assert md.struct_value.fields["routing-strategy"].string_value == "random"
    # the header still beats the profile's strategy
    md = run_request(svc, config_profile="low-latency", routing_strategy="random").sent[-1].dynamic_metadata
    assert md.fields["extproc-router"].struct_value.fields["routing-strategy"].string_value == "random"


def test_api_key_required_when_configured() -> None:
    svc = make_policy_service(api_keys=frozenset({"s3cret"}))
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
        imm = run_request(svc, **headers).sent[-1].immediate_response
        assert imm.status.code == 401
        err = orjson.loads(imm.body)["error"]
        assert err["code"] == "invalid_api_key" and "s3cret" not in imm.body.decode()
    assert run_request(svc, authorization="Bearer s3cret").sent[-1].WhichOneof("response") == "request_body"
    assert run_request(svc, authorization="bearer s3cret").sent[-1].WhichOneof("response") == "request_body"


def test_profile_rps_limit_gives_429_with_retry_after() -> None:
    svc = make_policy_service()
    kinds = [run_request(svc, config_profile="low-latency").sent[-1] for _ in range(3)]
    assert [k.WhichOneof("response") for k in kinds[:2]] == ["request_body", "request_body"]
    imm = kinds[2].immediate_response
    assert imm.status.code == 429
    hdrs = {h.header.key: h.header.raw_value.decode() for h in imm.headers.set_headers}
    assert int(hdrs["retry-after"]) >= 1 and "x-error-model-rps-exceeded" in hdrs
    assert svc.router.load.total == 0


def test_tpm_user_streams_need_include_usage_and_response_is_subscribed() -> None:
    from extproc_router.ratelimit.limits import UserLimits
    svc = make_policy_service(users={"alice": UserLimits(rpm=0, tpm=10)})
    stream_body = orjson.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    imm = run_request(svc, stream_body, user="alice").sent[-1].immediate_response
    assert imm.status.code == 400 and b"include_usage" in imm.body
    # A non-streaming request: the headers answer subscribes to the response body to count usage.
    stream = FakeStream()
    h = svc.handler(stream)
    h.on_message(headers_msg(pipelined=False, user="alice"))
    assert stream.sent[0].mode_override.response_body_mode == pm.ProcessingMode.STREAMED
    h.on_message(body_msg(CHAT, True))
    h.on_message(ep.ProcessingRequest(response_body=ep.HttpBody(
        body=b'{"usage": {"total_tokens": 12}}', end_of_stream=True)).SerializeToString())
    assert stream.sent[-1].WhichOneof("response") == "response_body"


async def test_tpm_limit_trips_after_counted_usage() -> None:
    from extproc_router.ratelimit.limits import UserLimits
    svc = make_policy_service(users={"alice": UserLimits(rpm=0, tpm=10)})
    stream = FakeStream()
    h = svc.handler(stream)
    h.on_message(headers_msg(pipelined=False, user="alice"))
    h.on_message(body_msg(CHAT, True))
    h.on_message(ep.ProcessingRequest(response_body=ep.HttpBody(
        body=b'{"usage": {"total_tokens": 12}}', end_of_stream=True)).SerializeToString())
    h.on_close(reset=False)
    await asyncio.sleep(0)  # token accounting runs as a task
    imm = run_request(svc, user="alice").sent[-1].immediate_response
    assert imm.status.code == 429 and "x-error-tpm-exceeded" in {h.header.key for h in imm.headers.set_headers}
