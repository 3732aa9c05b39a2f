"""Render the Envoy bootstrap (static resources only) for the gateway from :class:`GatewayValues`.

One listener (``main``) with one HTTP connection manager:

* ``GET /v1/models`` is answered by the router through ext_proc (so API keys apply); should the
  ext_proc call fail, Envoy goes on to the router's HTTP server, which checks the key too;
* everything else passes the ext_proc filter (the router picks a pod and sets ``target-pod``) and is
  sent by an ORIGINAL_DST cluster to that ``ip:port``.

The result is a plain dict (what ``yaml.safe_dump`` and ``envoy -c`` need); :func:`to_yaml` prints it.
"""

from __future__ import annotations

import copy
import ipaddress
import json
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import yaml

from extproc_router.envoyconfig.values import GatewayValues, ValuesError, load_values

__all__ = [
    "EXTPROC_CLUSTER",
    "METADATA_NAMESPACE",
    "POD_CLUSTER",
    "RESPONSE_ECHO_HEADERS",
    "ROUTER_HTTP_CLUSTER",
    "TARGET_POD_HEADER",
    "GatewayValues",
    "ValuesError",
    "load_values",
    "render_bootstrap",
    "to_yaml",
]

#: Dynamic-metadata namespace the router writes its decisions to (and the only one Envoy accepts).
METADATA_NAMESPACE = "extproc-router"
#: Request header carrying the chosen pod's ``ip:port``; the ORIGINAL_DST cluster's key.
TARGET_POD_HEADER = "target-pod"
#: Router decisions echoed as response headers, each from ``extproc-router:<name>`` metadata.
RESPONSE_ECHO_HEADERS = [
    "target-pod",
    "target-pod-ip",
    "routing-strategy",
    "request-id",
    "x-aibrix-config-profile",
    "prefill-target-pod",
    "prefill-target-pod-ip",
    "x-prefix-cache-match",
    "x-session-id",  # session-affinity: the pod this session sticks to, re-issued on every response
]

LISTENER_NAME = "main"
EXTPROC_CLUSTER = "extproc"
ROUTER_HTTP_CLUSTER = "extproc_router_http"
POD_CLUSTER = "model_pods"

# The router may call a prefill pod inside the body phase (pd), so a message can take a while. It
# also bounds the client's upload: the router answers the headers message only after the last body
# chunk, so an upload slower than this ends without a routing decision: a 503 (routing_unavailable)
# with failure_mode_allow, the default, else Envoy's 504 (routing_timeout).
_EXTPROC_MESSAGE_TIMEOUT = "60s"
_STREAM_IDLE_TIMEOUT = "300s"
# Router replicas are local or in-cluster: a connect that takes longer than this is a dead replica.
_INTERNAL_CONNECT_TIMEOUT = "2s"
# Every in-flight HTTP request holds one gRPC stream (= one HTTP/2 request) to the ext_proc
# cluster for its whole life, so Envoy's default of 1024 would cap the gateway at 1024 requests.
_EXTPROC_CIRCUIT_LIMIT = 100_000

_TYPE = "@type"
_T = "type.googleapis.com/"
_HCM_TYPE = _T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_EXT_PROC_TYPE = _T + "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
_ROUTER_TYPE = _T + "envoy.extensions.filters.http.router.v3.Router"
_HTTP_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_HTTP_OPTIONS_TYPE = _T + _HTTP_OPTIONS_KEY
_EARLY_MUTATION_TYPE = _T + "envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation"
_CONNECTION_LIMIT_TYPE = _T + "envoy.extensions.filters.network.connection_limit.v3.ConnectionLimit"
_CEL_FILTER_TYPE = _T + "envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter"


def render_bootstrap(
    values: GatewayValues,
    *,
    listen_host: str = "127.0.0.1",
    listen_port: int = 8888,
    admin_port: int = 9901,
    extproc_endpoints: Sequence[tuple[str, int]] = (("127.0.0.1", 50052),),
    router_http: tuple[str, int] = ("127.0.0.1", 8080),
    failure_mode_allow: bool = True,
) -> dict[str, Any]:
    """Build the Envoy bootstrap for ``values`` as a dict, ready for :func:`to_yaml`.

    ``extproc_endpoints`` lists the router replicas (one endpoint each of the ext_proc cluster,
    balanced round robin); ``router_http`` is the router's HTTP server that answers ``/v1/models``.
    Hosts may be IP literals (STATIC cluster) or names (STRICT_DNS).

    ``failure_mode_allow`` (default true: fail open for data, closed for routing) lets a response
    outlive the router that routed it; a request the router never decided on still gets a 503,
    because the pod cluster has nowhere to send a request without ``target-pod``. False makes Envoy
    fail the whole HTTP stream whenever its ext_proc stream fails, mid-response included.
    """
    if not extproc_endpoints:
        raise ValueError("extproc_endpoints must list at least one router endpoint")
    return {
        "admin": {"address": _socket_address("127.0.0.1", admin_port)},
        "static_resources": {
            "listeners": [_listener(values, listen_host, listen_port, failure_mode_allow)],
            "clusters": [
                _pod_cluster(values),
                _extproc_cluster(list(extproc_endpoints)),
                _plain_cluster(ROUTER_HTTP_CLUSTER, [router_http]),
            ],
        },
    }


def to_yaml(bootstrap: dict[str, Any]) -> str:
    """Serialise a bootstrap dict as YAML, keys in the order they were built (readable diffs)."""
    return yaml.safe_dump(bootstrap, sort_keys=False, default_flow_style=False, allow_unicode=True, width=110)


# --------------------------------------------------------------------------------------------- listener


def _listener(values: GatewayValues, host: str, port: int, failure_mode_allow: bool) -> dict[str, Any]:
    network_filters: list[dict[str, Any]] = []
    if values.connection_limit is not None:
        # The connection_limit network filter rather than the overload manager's global downstream
        # limit: it is what Envoy Gateway renders for ClientTrafficPolicy.connectionLimit, it is
        # scoped to this listener (the admin listener stays reachable when clients hit the cap),
        # and it has its own stats (connection_limit.gateway.*). Over the limit, Envoy accepts
        # the TCP connection and closes it at once.
        network_filters.append(
            {
                "name": "envoy.filters.network.connection_limit",
                "typed_config": {
                    _TYPE: _CONNECTION_LIMIT_TYPE,
                    "stat_prefix": "gateway",
                    "max_connections": values.connection_limit,
                },
            }
        )
    network_filters.append(
        {
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": _http_connection_manager(values, failure_mode_allow),
        }
    )
    # No listener filters and no use_original_dst: the connection's local address is never
    # "restored", so the pod cluster cannot fall back to it when target-pod is absent (see _pod_cluster).
    return {
        "name": LISTENER_NAME,
        "address": _socket_address(host, port),
        "per_connection_buffer_limit_bytes": values.connection_buffer_limit_bytes,
        "filter_chains": [{"filters": network_filters}],
    }


def _http_connection_manager(values: GatewayValues, failure_mode_allow: bool) -> dict[str, Any]:
    return {
        _TYPE: _HCM_TYPE,
        "stat_prefix": "gateway",
        # AUTO: HTTP/1.1 and h2c with prior knowledge on the same plaintext port.
        "codec_type": "AUTO",
        "stream_idle_timeout": _STREAM_IDLE_TIMEOUT,
        "generate_request_id": True,
        "http2_protocol_options": {"max_concurrent_streams": values.downstream_max_concurrent_streams},
        # Security: a client must never choose the destination pod. The header is removed before any
        # filter or route sees it; the router also overwrites it whenever it routes. This is what
        # makes failure_mode_allow safe: a router that is down, fails, times out or ends its gRPC
        # stream without answering lets Envoy continue the request unmodified, and without this
        # strip a client's own target-pod would then pick the pod. Stripped, the request reaches
        # the pod cluster with no target-pod at all: 503 no_healthy_upstream (routing_unavailable).
        "early_header_mutation_extensions": [
            {
                "name": "envoy.http.early_header_mutation.header_mutation",
                "typed_config": {_TYPE: _EARLY_MUTATION_TYPE, "mutations": [{"remove": TARGET_POD_HEADER}]},
            }
        ],
        "route_config": _route_config(values),
        "http_filters": [
            _ext_proc_filter(failure_mode_allow),
            {"name": "envoy.filters.http.router", "typed_config": {_TYPE: _ROUTER_TYPE}},
        ],
        "local_reply_config": _local_reply_config(values),
    }


def _route_config(values: GatewayValues) -> dict[str, Any]:
    models_route = {
        "name": "models",
        "match": {
            "path": "/v1/models",
            "headers": [{"name": ":method", "string_match": {"exact": "GET"}}],
        },
        # The router answers the model list in its headers reply, after the API-key check. The
        # cluster is only reached when the ext_proc call fails (failure_mode_allow): the router's
        # HTTP server then answers, checking the key itself. (This route used to skip ext_proc,
        # which let `GET /v1/models` through without a key.)
        "route": {"cluster": ROUTER_HTTP_CLUSTER},
    }
    pods_route = {
        "name": "pods",
        "match": {"prefix": "/"},
        "route": {"cluster": POD_CLUSTER, "timeout": _duration(values.route_timeout)},
        # The router records its decisions as dynamic metadata in the request-body phase; echoing
        # them here is what lets ext_proc skip the response-headers phase (no per-response round
        # trip). They are added to Envoy's own error replies for this route as well. A key the
        # router did not set (or set to "") formats as an empty value, which is not added
        # (keep_empty_value is false): absent decisions add no header. Numbers print as numbers.
        "response_headers_to_add": [
            {
                "header": {"key": name, "value": f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:{name})%"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
            for name in RESPONSE_ECHO_HEADERS
        ],
    }
    return {
        "name": "gateway",
        "virtual_hosts": [{"name": "gateway", "domains": ["*"], "routes": [models_route, pods_route]}],
    }


# A router replica that died (kill -9, OOM, node loss) stays in the ext_proc cluster until the next
# health check fails (up to 1 s + 1 s timeout); a stream Envoy opens to it in that window fails to
# connect. Retrying the stream's opening on another replica (previous_hosts) turns those into
# routed requests instead of 503 routing_unavailable. Only the opening is retried: nothing has
# been sent to the router yet, so no decision is made twice.
_EXTPROC_RETRY: dict[str, Any] = {
    "retry_on": "connect-failure,refused-stream,reset-before-request",
    "num_retries": 2,
    "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
        _TYPE: "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
    "host_selection_retry_max_attempts": 3,
}


def _ext_proc_filter(failure_mode_allow: bool) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            _TYPE: _EXT_PROC_TYPE,
            "grpc_service": {"envoy_grpc": {"cluster_name": EXTPROC_CLUSTER}, "retry_policy": _EXTPROC_RETRY},
            # Fail open for data, closed for routing. The ext_proc stream stays open until the
            # response ends (response trailers SEND, below), so with false a router that dies
            # (crash, OOM kill, node loss) fails every HTTP stream it routed, mid-generation. With
            # true Envoy ignores the broken ext_proc stream and the routed response runs to its
            # end; that router's in-flight count and token usage for it are lost with it. A request
            # that has no decision yet goes on without target-pod (the client's copy was stripped
            # before any filter) and the pod cluster answers 503 no_healthy_upstream, rewritten to
            # routing_unavailable in the local replies: nothing is ever routed without a decision.
            "failure_mode_allow": failure_mode_allow,
            "message_timeout": _EXTPROC_MESSAGE_TIMEOUT,
            "allow_mode_override": True,
            # Only the router's own namespace may be written; it feeds response_headers_to_add.
            "metadata_options": {"receiving_namespaces": {"untyped": [METADATA_NAMESPACE]}},
            # request headers SEND + body BUFFERED: the router answers the headers at once (it only
            # strips a spoofed target-pod there) and routes in its answer to the one buffered body
            # message. Measured against STREAMED + send_body_without_waiting_for_header_response
            # (one round trip, but three messages each way): the same latency at concurrency 1 and
            # about a third less Envoy CPU per request (~250 vs ~370 us), which is what limits
            # throughput on a small machine. The router handles both modes.
            # response headers SKIP / body NONE: the router's response headers come from dynamic
            # metadata via the route's response_headers_to_add, so responses cost no round trip and
            # SSE streams flow untouched.
            # response trailers SEND: keeps the ext_proc stream open until the HTTP stream ends, so
            # the router sees the end of every request (in-flight accounting) as the end of its
            # gRPC stream, without any per-response round trip: a response without trailers (every
            # OpenAI server) produces no message at all, and the stream half-closes when the last
            # response byte is sent or the client goes away. (With SKIP it closes right after the
            # request body.) A response that does carry trailers sends one message to answer.
            "processing_mode": {
                "request_header_mode": "SEND",
                "response_header_mode": "SKIP",
                "request_body_mode": "BUFFERED",
                "response_body_mode": "NONE",
                "request_trailer_mode": "SKIP",
                "response_trailer_mode": "SEND",
            },
        },
    }


# --------------------------------------------------------------------------------------------- local replies


def _local_reply_config(values: GatewayValues) -> dict[str, Any]:
    """Turn Envoy's *own* local replies (empty or text/plain) into OpenAI-shaped JSON errors.

    There is no top-level ``body_format``, and every mapper matches something only Envoy produces
    (a response flag, or an Envoy response-code detail): the router's ImmediateResponses are local
    replies too, and their JSON bodies and statuses must reach the client untouched. First match wins.
    """
    route_timeout = _duration(values.route_timeout)
    idle = _STREAM_IDLE_TIMEOUT

    def unavailable() -> dict[str, Any]:  # a fresh dict per use: shared ones become YAML anchors
        return _openai_error(
            503, "The routing service is unavailable; retry shortly.", "overloaded_error", "routing_unavailable"
        )

    mappers = [
        # failure_mode_allow: a request the router did not decide on (router down, failed, timed
        # out) reaches the pod cluster without target-pod, and the ORIGINAL_DST cluster finds no
        # host (UH). Say what happened: no routing decision, not an unavailable model server.
        {"filter": {"and_filter": {"filters": [_flags("UH"), _header_absent(TARGET_POD_HEADER)]}}, **unavailable()},
        # With failure_mode_allow false, ext_proc failures end the request in Envoy's own 500,
        # which carries no response flag, only the detail "ext_proc_error_<what>".
        # Envoy answers 500 whatever went wrong; a status should tell the client whether to retry:
        # * gRPC UNAVAILABLE (14: the router is down, restarting or refusing connections) -> 503,
        #   a transient gateway outage a client should retry, not a "bug" 500;
        # * the per-message timeout -> Envoy's 504 is already honest (a slow router, or an upload
        #   that took longer than the message timeout: the router answers the headers only after
        #   the whole body);
        # * any other gRPC error (the router raised or aborted) is a gateway bug: an honest 500.
        {"filter": _cel("response.code_details.startsWith('ext_proc_error_gRPC_error_14')"), **unavailable()},
        {
            "filter": _cel("response.code_details.startsWith('ext_proc_error_per-message_timeout')"),
            **_openai_error(504, "The routing service did not answer in time.", "api_error", "routing_timeout"),
        },
        {
            "filter": _cel("response.code_details.startsWith('ext_proc_error')"),
            **_openai_error(500, "The routing service failed on this request.", "api_error", "routing_error"),
        },
        # Only when the router switched a request to BUFFERED (mode_override): Envoy then enforces
        # its per-connection buffer itself. Same shape as the router's own 413.
        {
            "filter": _cel("response.code_details == 'request_payload_too_large'"),
            **_openai_error(
                413,
                f"request body exceeds the gateway limit of {values.max_body_bytes} bytes",
                "invalid_request_error",
                "request_too_large",
            ),
        },
        {
            "filter": _flags("UT"),
            **_openai_error(
                504, f"The model server did not answer within {route_timeout}.", "api_error", "upstream_timeout"
            ),
        },
        # The stream idle timeout: Envoy answers 408 while the client has not finished its request
        # (a stalled upload: the client's doing) and 504 once it waits for the pod; keep both.
        {
            "filter": {"and_filter": {"filters": [_flags("SI"), _status_is(408)]}},
            **_openai_error(408, f"The client sent no data for {idle}.", "invalid_request_error", "request_timeout"),
        },
        {
            "filter": _flags("SI"),
            **_openai_error(504, f"The model server sent no data for {idle}.", "api_error", "stream_idle_timeout"),
        },
        # Envoy's HTTP codec refusing the request itself (before any filter ran): headers over
        # max_request_headers_kb (431), HTTP/1.0 (426), a malformed request line or headers (400).
        # The router never answers these codes, and codec details start with the codec's name.
        {
            "filter": _status_is(431),
            **_openai_error(431, "Request headers are too large.", "invalid_request_error", "headers_too_large"),
        },
        {
            "filter": _status_is(426),
            **_openai_error(426, "Use HTTP/1.1 or HTTP/2.", "invalid_request_error", "upgrade_required"),
        },
        {
            "filter": _cel("response.code_details.startsWith('http1.') || "
                           "response.code_details.startsWith('http2.') || "
                           "response.code_details.startsWith('codec_error')"),
            **_openai_error(400, "The request is not valid HTTP.", "invalid_request_error", "bad_http_request"),
        },
        {
            # Circuit breakers (backendTrafficPolicy/envoyPatchPolicy limits) are full.
            "filter": _flags("UO"),
            **_openai_error(
                503,
                "Too many requests in flight to the model servers; retry shortly.",
                "overloaded_error",
                "upstream_overflow",
            ),
        },
        {
            # UH: no usable pod address; UF: connect failed; UC/UR: the pod closed or reset the
            # connection before answering (it died or restarted).
            "filter": _flags("UH", "UF", "UC", "UR"),
            **_openai_error(
                503,
                "The selected model server is unavailable; retry shortly.",
                "overloaded_error",
                "upstream_unavailable",
            ),
        },
    ]
    # Anthropic's Messages API clients parse Anthropic's error shape: the same replies, first, for
    # /v1/messages (the router answers that path in that shape too).
    return {"mappers": [_anthropic_reply(m) for m in mappers] + mappers}


ANTHROPIC_PATHS_REGEX = r"^/v1/messages(\?.*)?$"
_ANTHROPIC_TYPES = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large",
                    429: "rate_limit_error", 503: "overloaded_error"}


def _anthropic_reply(mapper: dict[str, Any]) -> dict[str, Any]:
    """`mapper` restricted to the Anthropic paths, its body in Anthropic's error shape."""
    status = mapper["status_code"]
    text = mapper["body_format_override"]["text_format_source"]["inline_string"].replace("%%", "%")
    kind = _ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    body = {"type": "error", "error": {"type": kind, "message": json.loads(text)["error"]["message"]}}
    path = {"header_filter": {"header": {"name": ":path",
                                         "string_match": {"safe_regex": {"regex": ANTHROPIC_PATHS_REGEX}}}}}
    return {
        "filter": {"and_filter": {"filters": [path, copy.deepcopy(mapper["filter"])]}},  # no shared YAML anchors
        "status_code": status,
        "body_format_override": {
            "text_format_source": {"inline_string": json.dumps(body, separators=(",", ":")).replace("%", "%%")},
            "content_type": "application/json",
        },
    }


def _openai_error(status: int, message: str, error_type: str, code: str) -> dict[str, Any]:
    """The status and body_format_override that make a local reply an OpenAI-shaped JSON error."""
    body = {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    # json.dumps escapes the text; '%' is doubled because Envoy's formatter treats it as a command.
    text = json.dumps(body, separators=(",", ":")).replace("%", "%%")
    return {
        "status_code": status,
        "body_format_override": {"text_format_source": {"inline_string": text}, "content_type": "application/json"},
    }


def _flags(*flags: str) -> dict[str, Any]:
    return {"response_flag_filter": {"flags": list(flags)}}


def _header_absent(name: str) -> dict[str, Any]:
    """Matches when the request has no header ``name`` (at reply time, after every mutation)."""
    return {"header_filter": {"header": {"name": name, "present_match": True, "invert_match": True}}}


def _status_is(code: int) -> dict[str, Any]:
    # runtime_key is mandatory; nothing sets it, so default_value applies.
    value = {"default_value": code, "runtime_key": f"gateway.local_reply.status_{code}"}
    return {"status_code_filter": {"comparison": {"op": "EQ", "value": value}}}


def _cel(expression: str) -> dict[str, Any]:
    """A CEL access-log filter: the only filter that can read the response-code details."""
    return {
        "extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": {_TYPE: _CEL_FILTER_TYPE, "expression": expression},
        }
    }


# --------------------------------------------------------------------------------------------- clusters


def _pod_cluster(values: GatewayValues) -> dict[str, Any]:
    return {
        "name": POD_CLUSTER,
        # The router picks the pod; Envoy connects to the ip:port in the target-pod header. Without
        # the header there is no destination: besides it, the ORIGINAL_DST load balancer only takes
        # one from filter state, metadata_key or a restored local address, and this config has none
        # of them (no filter sets that state, no metadata_key, no listener filters or
        # use_original_dst), so it returns no host: 503 no_healthy_upstream, never a default pod.
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "original_dst_lb_config": {"use_http_header": True, "http_header_name": TARGET_POD_HEADER},
        "connect_timeout": _duration(values.connect_timeout),
        "per_connection_buffer_limit_bytes": values.connection_buffer_limit_bytes,
        # One cluster holds every pod, so these are gateway-wide limits across all pods.
        "circuit_breakers": {
            "thresholds": [
                {
                    "priority": "DEFAULT",
                    "max_connections": values.pod_max_connections,
                    "max_pending_requests": values.pod_max_pending_requests,
                    "max_requests": values.pod_max_requests,
                    "max_retries": values.pod_max_retries,
                }
            ]
        },
        "typed_extension_protocol_options": {
            _HTTP_OPTIONS_KEY: {
                _TYPE: _HTTP_OPTIONS_TYPE,
                "common_http_protocol_options": {"max_requests_per_connection": values.pod_max_requests_per_connection},
                # Model pods (vLLM, SGLang, the simulator) serve plaintext HTTP/1.1. auto_config would
                # let ALPN choose h2, but Envoy rejects it on a plaintext cluster ("ALPN configured
                # for cluster model_pods which has a non-ALPN transport socket"), and
                # use_downstream_protocol_config would send h2c clients' requests as h2c to pods that
                # cannot speak it. So backendTrafficPolicy.http2.maxConcurrentStreams is validated
                # but has no HTTP/1.1 counterpart, as in Envoy Gateway for non-h2 backends.
                "explicit_http_config": {"http_protocol_options": {}},
            }
        },
    }


def _extproc_cluster(endpoints: list[tuple[str, int]]) -> dict[str, Any]:
    cluster = _plain_cluster(EXTPROC_CLUSTER, endpoints)
    cluster["circuit_breakers"] = {
        "thresholds": [
            {
                "priority": "DEFAULT",
                "max_connections": _EXTPROC_CIRCUIT_LIMIT,
                "max_pending_requests": _EXTPROC_CIRCUIT_LIMIT,
                "max_requests": _EXTPROC_CIRCUIT_LIMIT,
            }
        ]
    }
    # gRPC needs HTTP/2; without it every request fails with upstream_cx_protocol_error (a 500).
    cluster["typed_extension_protocol_options"] = {
        _HTTP_OPTIONS_KEY: {_TYPE: _HTTP_OPTIONS_TYPE, "explicit_http_config": {"http2_protocol_options": {}}}
    }
    # A draining router answers NOT_SERVING before it refuses streams (--drain-delay): with several
    # replicas Envoy stops sending it new requests within a second instead of failing them.
    # A connect failure (a replica that died) takes that replica out at once, not at the next health
    # check; the health check brings it back when it answers SERVING again. With every replica out
    # Envoy's panic mode still tries them all, so this never leaves the cluster empty.
    cluster["outlier_detection"] = {
        "split_external_local_origin_errors": True,
        "consecutive_local_origin_failure": 1,
        "enforcing_consecutive_local_origin_failure": 100,
        "consecutive_5xx": 1000000, "enforcing_consecutive_5xx": 0,
        "consecutive_gateway_failure": 1000000, "enforcing_consecutive_gateway_failure": 0,
        "enforcing_success_rate": 0, "enforcing_local_origin_success_rate": 0,
        "interval": "1s", "base_ejection_time": "1s", "max_ejection_percent": 100,
    }
    cluster["health_checks"] = [{
        # no_traffic_interval: without it Envoy checks an idle cluster only every 60 s.
        "timeout": "1s", "interval": "1s", "no_traffic_interval": "1s", "unhealthy_threshold": 1,
        "healthy_threshold": 1,
        "grpc_health_check": {"service_name": "extproc-router"},
    }]
    return cluster


def _plain_cluster(name: str, endpoints: Sequence[tuple[str, int]]) -> dict[str, Any]:
    """A round-robin cluster of fixed endpoints: STATIC for IP literals, STRICT_DNS for names."""
    all_ips = all(_is_ip(host) for host, _ in endpoints)
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC" if all_ips else "STRICT_DNS",
        "connect_timeout": _INTERNAL_CONNECT_TIMEOUT,
        "lb_policy": "ROUND_ROBIN",
    }
    if not all_ips:
        # Container hostnames usually resolve to IPv4 only; AUTO would try IPv6 first.
        cluster["dns_lookup_family"] = "V4_PREFERRED"
    cluster["load_assignment"] = {
        "cluster_name": name,
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket_address(h, p)}} for h, p in endpoints]}],
    }
    return cluster


# --------------------------------------------------------------------------------------------- helpers


def _socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _duration(value: timedelta) -> str:
    """An Envoy (protobuf JSON) duration: seconds with up to six decimals, e.g. "120s", "1.5s"."""
    whole, micros = divmod(value // timedelta(microseconds=1), 1_000_000)
    if not micros:
        return f"{whole}s"
    return f"{whole}.{micros:06d}".rstrip("0") + "s"
