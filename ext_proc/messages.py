"""Builders for the Envoy ext_proc messages the router sends, kept cheap for the hot path."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from routing.errors import OPENAI, RoutingError

METADATA_NAMESPACE = "extproc-router"  # must match envoyconfig's response_headers_to_add
TARGET_POD_HEADER = "target-pod"
# Gateway API Inference Extension, endpoint-picker protocol (docs/proposals/004-endpoint-picker-protocol).
GIE_DESTINATION_HEADER = "x-gateway-destination-endpoint"
GIE_METADATA_NAMESPACE = "envoy.lb"
GIE_SUBSET_NAMESPACE = "envoy.lb.subset_hint"
GIE_SUBSET_KEY = "x-gateway-destination-endpoint-subset"

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

# Responses without content are identical for every request: serialize them once.
EMPTY_BODY_RESPONSE = ep.ProcessingResponse(request_body=ep.BodyResponse()).SerializeToString()
EMPTY_HEADERS_RESPONSE = ep.ProcessingResponse(request_headers=ep.HeadersResponse()).SerializeToString()
EMPTY_RESPONSE_HEADERS_RESPONSE = ep.ProcessingResponse(
    response_headers=ep.HeadersResponse()).SerializeToString()
EMPTY_RESPONSE_BODY_RESPONSE = ep.ProcessingResponse(response_body=ep.BodyResponse()).SerializeToString()
EMPTY_TRAILERS_RESPONSE = ep.ProcessingResponse(
    response_trailers=ep.TrailersResponse()).SerializeToString()
EMPTY_REQUEST_TRAILERS_RESPONSE = ep.ProcessingResponse(
    request_trailers=ep.TrailersResponse()).SerializeToString()
STRIP_TARGET_POD_RESPONSE = ep.ProcessingResponse(request_headers=ep.HeadersResponse(
    response=ep.CommonResponse(header_mutation=ep.HeaderMutation(remove_headers=[TARGET_POD_HEADER]))
)).SerializeToString()


def _header_mutation(set_headers: Mapping[str, str]) -> ep.HeaderMutation:
    return ep.HeaderMutation(set_headers=[
        base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, raw_value=v.encode()),
                                   append_action=_OVERWRITE)
        for k, v in set_headers.items()])


def _metadata(echo: Mapping[str, str], lb_endpoint: str | None = None) -> struct_pb2.Struct:
    md = struct_pb2.Struct()
    md.fields[METADATA_NAMESPACE].struct_value.update(echo)
    if lb_endpoint is not None:
        # The Inference Extension's endpoint-picker protocol: the picked endpoint in `envoy.lb`.
        md.fields[GIE_METADATA_NAMESPACE].struct_value.fields[GIE_DESTINATION_HEADER].string_value = lb_endpoint
    return md


def routed_response(phase: str, request_headers: Mapping[str, str], echo: Mapping[str, str],
                    lb_endpoint: str | None = None) -> bytes:
    """The answer that routes: set `request_headers` on the request (in the `phase` message,
    `request_headers` or `request_body`) and publish `echo` as dynamic metadata, which Envoy's
    route turns into response headers without another round trip. `lb_endpoint`: also the picked
    endpoint in `envoy.lb` metadata (the endpoint-picker protocol)."""
    common = ep.CommonResponse(header_mutation=_header_mutation(request_headers))
    if phase == "request_headers":
        msg = ep.ProcessingResponse(request_headers=ep.HeadersResponse(response=common),
                                    dynamic_metadata=_metadata(echo, lb_endpoint))
    else:
        msg = ep.ProcessingResponse(request_body=ep.BodyResponse(response=common),
                                    dynamic_metadata=_metadata(echo, lb_endpoint))
    return msg.SerializeToString()


def routed_with_body(phase: str, request_headers: Mapping[str, str], echo: Mapping[str, str],
                     body: bytes, lb_endpoint: str | None = None) -> bytes:
    """Route and replace the request body (pd: the decode pod's body); content-length follows it."""
    headers = {**request_headers, "content-length": str(len(body))}
    common = ep.CommonResponse(header_mutation=_header_mutation(headers), body_mutation=ep.BodyMutation(body=body))
    if phase == "request_headers":
        # STREAMED: the headers answer routes; the body arrives with the first chunk's answer.
        common = ep.CommonResponse(header_mutation=_header_mutation(headers))
        return ep.ProcessingResponse(request_headers=ep.HeadersResponse(response=common),
                                     dynamic_metadata=_metadata(echo, lb_endpoint)).SerializeToString()
    return ep.ProcessingResponse(request_body=ep.BodyResponse(response=common),
                                 dynamic_metadata=_metadata(echo, lb_endpoint)).SerializeToString()


def body_chunk_replacement(body: bytes | None) -> bytes:
    """STREAMED mode: the first chunk's answer carries the whole new body, later chunks are cleared."""
    mutation = ep.BodyMutation(body=body) if body is not None else ep.BodyMutation(clear_body=True)
    return ep.ProcessingResponse(request_body=ep.BodyResponse(
        response=ep.CommonResponse(body_mutation=mutation))).SerializeToString()


def response_headers_echo(echo: Mapping[str, str]) -> bytes:
    """Answer to a response_headers message (only sent when Envoy is configured to): echo headers."""
    return ep.ProcessingResponse(response_headers=ep.HeadersResponse(
        response=ep.CommonResponse(header_mutation=_header_mutation(echo)))).SerializeToString()


def json_immediate_response(status: int, body: object, headers: Iterable[tuple[str, str]] = (),
                            details: str = "") -> bytes:
    """Answer the client directly with a JSON body (errors, and the gateway's own /v1/models)."""
    hdrs = [("content-type", "application/json"), *headers]
    return ep.ProcessingResponse(immediate_response=ep.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=status),
        headers=ep.HeaderMutation(set_headers=[
            base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, raw_value=v.encode()),
                                       append_action=_OVERWRITE) for k, v in hdrs]),
        body=orjson.dumps(body),
        details=details,
    )).SerializeToString()


def error_response(err: RoutingError, request_id: str, extra: Iterable[tuple[str, str]] = (),
                   style: str = OPENAI) -> bytes:
    """An error in the path's `style` (OpenAI's, or Anthropic's on /v1/messages) with an
    `x-error-<cause>` header naming why."""
    headers = [(f"x-error-{err.cause}", err.cause_value), ("request-id", request_id), *extra]
    return json_immediate_response(err.status, err.to_body(style), headers,
                                   details=f"extproc_router_{err.cause}".replace("-", "_"))


def subset_hint(request: ep.ProcessingRequest) -> frozenset[str] | None:
    """The endpoints the data plane allows (`envoy.lb.subset_hint` filter metadata), or None when it
    sets no hint. An empty set means none is allowed."""
    hint = request.metadata_context.filter_metadata.get(GIE_SUBSET_NAMESPACE)
    if hint is None or GIE_SUBSET_KEY not in hint.fields:
        return None
    value = hint.fields[GIE_SUBSET_KEY]
    kind = value.WhichOneof("kind")
    if kind == "list_value":
        return frozenset(v.string_value for v in value.list_value.values if v.WhichOneof("kind") == "string_value")
    if kind == "string_value":  # tolerated: one endpoint, or a comma-separated list
        return frozenset(e.strip() for e in value.string_value.split(",") if e.strip())
    return frozenset()


def strip_headers_response(names: Iterable[str]) -> bytes:
    """A headers answer that removes the named client headers (destinations a client must not set)."""
    return ep.ProcessingResponse(request_headers=ep.HeadersResponse(
        response=ep.CommonResponse(header_mutation=ep.HeaderMutation(remove_headers=list(names))))
    ).SerializeToString()
