"""The seed's ``gateway.*`` values (values.yaml) as one typed, validated object.

Only the three policy blocks the seed documents are read: ``gateway.clientTrafficPolicy``,
``gateway.backendTrafficPolicy`` and ``gateway.envoyPatchPolicy``. Everything else in a Helm values
file (``gatewayPlugin``, ``metadata``, other ``gateway.*`` keys) belongs to other consumers and is
ignored, but an unknown key *inside* a policy block is an error: a misspelt knob that silently keeps
its default is worse than a refusal to start.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

__all__ = [
    "BODY_LIMIT_HEADROOM_BYTES",
    "DEFAULT_LIMIT",
    "GatewayValues",
    "ValuesError",
    "load_values",
    "parse_duration",
]

MIB = 1024 * 1024
DEFAULT_LIMIT = 1024
DEFAULT_BUFFER_LIMIT = 4 * MIB
# Envoy buffers this much more than bufferLimit per connection, so that the router, which enforces
# bufferLimit itself on the streamed body (and answers an OpenAI-shaped 413), sees the excess bytes
# before Envoy's flow control pauses the client and the request just stalls.
BODY_LIMIT_HEADROOM_BYTES = MIB

_UINT32_MAX = 2**32 - 1
# HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS as Envoy validates it (1 .. 2^31 - 1).
_H2_STREAMS_MAX = 2**31 - 1
# google.protobuf.Duration's largest value (10000 years); Envoy rejects anything above it.
_DURATION_MAX = timedelta(seconds=315_576_000_000)


class ValuesError(ValueError):
    """A values.yaml entry is invalid; the message starts with the offending key path."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}" if path else problem)
        self.path = path
        self.problem = problem


@dataclass(frozen=True)
class GatewayValues:
    """The Envoy knobs of the seed's values.yaml, resolved (patch-policy precedence applied).

    Field names follow the Envoy fields they end up in; each docstring line names the values key.
    """

    #: ``gateway.clientTrafficPolicy.connection.bufferLimit``: largest request body, in bytes.
    buffer_limit: int = DEFAULT_BUFFER_LIMIT
    #: ``gateway.clientTrafficPolicy.connection.connectionLimit.value``; ``None`` = unlimited.
    connection_limit: int | None = None
    #: ``gateway.clientTrafficPolicy.http2.maxConcurrentStreams``: per client connection.
    downstream_max_concurrent_streams: int = DEFAULT_LIMIT
    # The next three: ``gateway.envoyPatchPolicy.circuitBreakers.<key>`` if set, else
    # ``gateway.backendTrafficPolicy.circuitBreaker.<key>`` (maxParallelRequests for max_requests).
    #: ``maxConnections``.
    pod_max_connections: int = DEFAULT_LIMIT
    #: ``maxRequests`` / ``maxParallelRequests``.
    pod_max_requests: int = DEFAULT_LIMIT
    #: ``maxPendingRequests``.
    pod_max_pending_requests: int = DEFAULT_LIMIT
    #: ``gateway.backendTrafficPolicy.circuitBreaker.maxParallelRetries``.
    pod_max_retries: int = DEFAULT_LIMIT
    #: ``gateway.backendTrafficPolicy.circuitBreaker.maxRequestsPerConnection``.
    pod_max_requests_per_connection: int = DEFAULT_LIMIT
    #: ``gateway.backendTrafficPolicy.http2.maxConcurrentStreams``: per pod connection (h2 only).
    pod_max_concurrent_streams: int = DEFAULT_LIMIT
    #: ``gateway.envoyPatchPolicy.route.timeout``; zero disables the timeout (long streams).
    route_timeout: timedelta = timedelta(seconds=120)
    #: ``gateway.envoyPatchPolicy.route.connectTimeout``.
    connect_timeout: timedelta = timedelta(seconds=6)

    @property
    def max_body_bytes(self) -> int:
        """The request-body limit the router enforces (answering 413); equals ``bufferLimit``."""
        return self.buffer_limit

    @property
    def connection_buffer_limit_bytes(self) -> int:
        """Envoy's per-connection buffer: ``bufferLimit`` plus headroom for the router's 413."""
        return self.buffer_limit + BODY_LIMIT_HEADROOM_BYTES


# ---------------------------------------------------------------------------------------------
# Leaf validators. Each takes (path, raw value) and returns the parsed value or raises ValuesError.

Leaf = Callable[[str, Any], Any]


def _positive_int(maximum: int) -> Leaf:
    def check(path: str, raw: Any) -> int:
        # bool is an int subclass: `true` in YAML must not silently become 1.
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ValuesError(path, f"expected a positive integer, got {raw!r}")
        if raw <= 0:
            raise ValuesError(path, f"expected a positive integer, got {raw}")
        if raw > maximum:
            raise ValuesError(path, f"must be at most {maximum}, got {raw}")
        return raw

    return check


_DURATION_UNITS = {
    "ns": Decimal("1e-9"),
    "us": Decimal("1e-6"),
    "\u00b5s": Decimal("1e-6"),  # micro sign, as Go accepts
    "\u03bcs": Decimal("1e-6"),  # Greek mu, as Go accepts
    "ms": Decimal("1e-3"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
}
_DURATION_TERM = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


def parse_duration(raw: Any) -> timedelta:
    """Parse a Go/Envoy duration ("120s", "2m", "1h30m", "1.5s", "500ms") or an integer of seconds.

    Raises ``ValueError`` (not ValuesError: no key path is known here) on anything else, including
    negative values and floats (write "1.5s" instead, so the unit is explicit).
    """
    if isinstance(raw, bool):
        raise ValueError(f"expected a duration such as '120s', '2m' or '500ms', got {raw!r}")
    if isinstance(raw, int):
        if raw < 0:
            raise ValueError(f"must not be negative, got {raw}")
        return _bounded(Decimal(raw), raw)
    if not isinstance(raw, str):
        raise ValueError(f"expected a duration such as '120s', '2m' or '500ms', got {raw!r}")
    text = raw.strip()
    if not text:
        raise ValueError("expected a duration such as '120s', '2m' or '500ms', got ''")
    if text == "0":  # Go's ParseDuration accepts a bare zero, and only zero, without a unit.
        return timedelta(0)
    pos, seconds = 0, Decimal(0)
    while pos < len(text):
        term = _DURATION_TERM.match(text, pos)
        if term is None:
            raise ValueError(f"expected a duration such as '120s', '2m' or '500ms', got {raw!r}")
        seconds += Decimal(term.group(1)) * _DURATION_UNITS[term.group(2)]
        pos = term.end()
    return _bounded(seconds, raw)


def _bounded(seconds: Decimal, raw: Any) -> timedelta:
    # timedelta keeps microseconds; a sub-microsecond remainder cannot matter for these timeouts.
    micros = int(seconds * 1_000_000)
    if micros > _DURATION_MAX // timedelta(microseconds=1):
        raise ValueError(f"duration {raw!r} is too large")
    return timedelta(microseconds=micros)


def _duration(*, allow_zero: bool) -> Leaf:
    def check(path: str, raw: Any) -> timedelta:
        try:
            value = parse_duration(raw)
        except ValueError as exc:
            raise ValuesError(path, str(exc)) from None
        if not allow_zero and value <= timedelta(0):
            raise ValuesError(path, f"must be a positive duration, got {raw!r}")
        return value

    return check


# ---------------------------------------------------------------------------------------------
# The schema of the three policy blocks: nested dicts, leaves are validators. Mirrors the seed's
# deploying-gateway.rst "Configuring Buffer Limits, Connections, and QPS".

_SCHEMA: dict[str, Any] = {
    "clientTrafficPolicy": {
        "connection": {
            "bufferLimit": _positive_int(_UINT32_MAX - BODY_LIMIT_HEADROOM_BYTES),
            "connectionLimit": {"value": _positive_int(_UINT32_MAX)},
        },
        "http2": {"maxConcurrentStreams": _positive_int(_H2_STREAMS_MAX)},
    },
    "backendTrafficPolicy": {
        "circuitBreaker": {
            "maxConnections": _positive_int(_UINT32_MAX),
            "maxParallelRequests": _positive_int(_UINT32_MAX),
            "maxPendingRequests": _positive_int(_UINT32_MAX),
            "maxParallelRetries": _positive_int(_UINT32_MAX),
            "maxRequestsPerConnection": _positive_int(_UINT32_MAX),
        },
        "http2": {"maxConcurrentStreams": _positive_int(_H2_STREAMS_MAX)},
    },
    "envoyPatchPolicy": {
        "route": {
            # 0 is Envoy's "no timeout", which long SSE generations need.
            "timeout": _duration(allow_zero=True),
            "connectTimeout": _duration(allow_zero=False),
        },
        "circuitBreakers": {
            "maxConnections": _positive_int(_UINT32_MAX),
            "maxRequests": _positive_int(_UINT32_MAX),
            "maxPendingRequests": _positive_int(_UINT32_MAX),
        },
    },
}


def _collect(node: Any, schema: Mapping[str, Any], path: str, out: dict[str, Any]) -> None:
    """Validate ``node`` against ``schema``; store every explicitly set leaf in ``out`` by key path."""
    if node is None:  # `clientTrafficPolicy:` with nothing under it, as YAML often ends up
        return
    if not isinstance(node, Mapping):
        raise ValuesError(path, f"expected a mapping with keys {', '.join(schema)}, got {node!r}")
    for key, raw in node.items():
        child_path = f"{path}.{key}"
        if key not in schema:
            raise ValuesError(child_path, _unknown_key_problem(str(key), schema))
        spec = schema[key]
        if isinstance(spec, Mapping):
            _collect(raw, spec, child_path, out)
        elif raw is not None:  # an explicit null keeps the default, as in Helm
            out[child_path] = spec(child_path, raw)


def _unknown_key_problem(key: str, allowed: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key{hint}; allowed here: {', '.join(allowed)}"


def load_values(data: Mapping[str, Any] | None) -> GatewayValues:
    """Validate a parsed values.yaml and resolve it into :class:`GatewayValues`.

    Precedence for the pod-cluster thresholds: ``envoyPatchPolicy.circuitBreakers`` is applied last
    (as the EnvoyPatchPolicy is in the seed's system), so a value set there explicitly wins over
    ``backendTrafficPolicy.circuitBreaker``; a patch-policy *default* never overrides an explicit
    backend-policy value.
    """
    if data is None:
        return GatewayValues()
    if not isinstance(data, Mapping):
        raise ValuesError("", f"the values file must be a mapping at the top level, got {data!r}")
    gateway = data.get("gateway")
    if gateway is None:
        return GatewayValues()
    if not isinstance(gateway, Mapping):
        raise ValuesError("gateway", f"expected a mapping, got {gateway!r}")
    for key in gateway:
        # Other gateway.* keys belong to the chart, but a near-miss of a policy name is a typo that
        # would otherwise silently drop a whole policy block.
        if key not in _SCHEMA and difflib.get_close_matches(str(key), list(_SCHEMA), n=1, cutoff=0.8):
            raise ValuesError(f"gateway.{key}", _unknown_key_problem(str(key), _SCHEMA))

    explicit: dict[str, Any] = {}
    for policy, schema in _SCHEMA.items():
        _collect(gateway.get(policy), schema, f"gateway.{policy}", explicit)

    def pick(*paths: str, default: Any) -> Any:
        """The first explicitly set value among ``paths`` (highest precedence first)."""
        return next((explicit[p] for p in paths if p in explicit), default)

    defaults = GatewayValues()
    ctp, btp, epp = "gateway.clientTrafficPolicy", "gateway.backendTrafficPolicy", "gateway.envoyPatchPolicy"
    return GatewayValues(
        buffer_limit=pick(f"{ctp}.connection.bufferLimit", default=defaults.buffer_limit),
        connection_limit=pick(f"{ctp}.connection.connectionLimit.value", default=None),
        downstream_max_concurrent_streams=pick(
            f"{ctp}.http2.maxConcurrentStreams", default=defaults.downstream_max_concurrent_streams
        ),
        pod_max_connections=pick(
            f"{epp}.circuitBreakers.maxConnections",
            f"{btp}.circuitBreaker.maxConnections",
            default=defaults.pod_max_connections,
        ),
        pod_max_requests=pick(
            f"{epp}.circuitBreakers.maxRequests",
            f"{btp}.circuitBreaker.maxParallelRequests",
            default=defaults.pod_max_requests,
        ),
        pod_max_pending_requests=pick(
            f"{epp}.circuitBreakers.maxPendingRequests",
            f"{btp}.circuitBreaker.maxPendingRequests",
            default=defaults.pod_max_pending_requests,
        ),
        pod_max_retries=pick(f"{btp}.circuitBreaker.maxParallelRetries", default=defaults.pod_max_retries),
        pod_max_requests_per_connection=pick(
            f"{btp}.circuitBreaker.maxRequestsPerConnection",
            default=defaults.pod_max_requests_per_connection,
        ),
        pod_max_concurrent_streams=pick(
            f"{btp}.http2.maxConcurrentStreams", default=defaults.pod_max_concurrent_streams
        ),
        route_timeout=pick(f"{epp}.route.timeout", default=defaults.route_timeout),
        connect_timeout=pick(f"{epp}.route.connectTimeout", default=defaults.connect_timeout),
    )
