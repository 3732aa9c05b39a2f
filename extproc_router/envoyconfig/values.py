"""The seed's values.yaml as typed, validated objects.

Two readers, one file:

* :func:`load_values` (``extproc-router envoy-config``, the local stack) reads the three Envoy policy
  blocks the seed documents: ``gateway.clientTrafficPolicy``, ``gateway.backendTrafficPolicy`` and
  ``gateway.envoyPatchPolicy``. The rest of the file (``gatewayPlugin``, ``metadata``, other
  ``gateway.*`` keys) belongs to other consumers and is ignored here, but an unknown key *inside* a
  policy block is an error: a misspelt knob that silently keeps its default is worse than a refusal
  to start.
* :func:`load_deployment_values` (``extproc-router manifests``) renders the whole deployment, so it
  reads every key and knows them all: besides the policies, ``gatewayPlugin.replicaCount``,
  ``gatewayPlugin.container.{resources,envs}``, ``gatewayPlugin.dependencies.redis.{host,port}``,
  ``gateway.envoyProxy.{replicas,container.envoy.resources}`` and
  ``metadata.redis.{replicas,container.resources}``. Any other key is an error naming it.
"""

from __future__ import annotations

import copy
import difflib
import ipaddress
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "BODY_LIMIT_HEADROOM_BYTES",
    "DEFAULT_LIMIT",
    "DeploymentValues",
    "GatewayValues",
    "ValuesError",
    "load_deployment_values",
    "load_values",
    "parse_duration",
    "parse_quantity",
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


def read_values_file(path: Path | None) -> Any:
    """The parsed YAML of a values file (None without one); ValuesError saying why it cannot be read."""
    if path is None:
        return None
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValuesError("", f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ValuesError("", f"{path} is not valid YAML: {exc}") from None


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


def _unknown_key_problem(key: str, allowed: Collection[str]) -> str:
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


# ---------------------------------------------------------------------------------------------
# The deployment (`extproc-router manifests`): gatewayPlugin, gateway.envoyProxy, metadata.redis.
#
# Defaults: today's production-shaped deployment. Several router replicas (one router process is one
# asyncio event loop, about one core: scale with replicas, not CPUs), so state sync is on, through
# the bundled Redis. The seed implies the bundled Redis's defaults are smaller than its sizing
# example (requests 1 CPU / 2Gi, limits 2 CPU / 4Gi: "increase ... from the defaults"); what the
# routers keep there is bounded (README: at most ~42 MB of stream plus ~2 MB of snapshot per replica).

DEFAULT_ROUTER_REPLICAS = 3
DEFAULT_ROUTER_RESOURCES: dict[str, dict[str, str]] = {"requests": {"cpu": "1", "memory": "1Gi"},
                                                       "limits": {"memory": "2Gi"}}
#: ``gatewayPlugin.container.envs``. The router's own default for the variable is false (as in the
#: seed); the deployment turns it on because it runs several replicas. ``null`` removes it.
DEFAULT_ROUTER_ENVS: dict[str, str] = {"AIBRIX_STATESYNC_ENABLED": "true"}
DEFAULT_REDIS_PORT = 6379
DEFAULT_ENVOY_REPLICAS = 3
DEFAULT_ENVOY_RESOURCES: dict[str, dict[str, str]] = {"requests": {"cpu": "2", "memory": "1Gi"},
                                                      "limits": {"memory": "2Gi"}}
DEFAULT_REDIS_REPLICAS = 1
DEFAULT_REDIS_RESOURCES: dict[str, dict[str, str]] = {"requests": {"cpu": "250m", "memory": "256Mi"},
                                                      "limits": {"memory": "1Gi"}}

_INT32_MAX = 2**31 - 1
_ENVS = "gatewayPlugin.container.envs"
_REDIS = "gatewayPlugin.dependencies.redis"

#: Router environment variables the manifests set from other keys (or fix, because the Service, the
#: probes and Envoy's clusters depend on them): in ``container.envs`` they would fight that value.
RESERVED_ENVS: dict[str, str] = {
    "REDIS_HOST": f"set from {_REDIS}.host; set that instead",
    "REDIS_PORT": f"set from {_REDIS}.port; set that instead",
    "AIBRIX_GRPC_MAX_MESSAGE_SIZE_BYTES": "the router's body limit follows "
                                          "gateway.clientTrafficPolicy.connection.bufferLimit; set that instead",
    "EXTPROC_ROUTER_GRPC_LISTEN": "fixed by the manifests (0.0.0.0:50052: the Service, the NetworkPolicy and "
                                  "Envoy's ext_proc cluster use it)",
    "EXTPROC_ROUTER_HTTP_LISTEN": "fixed by the manifests (0.0.0.0:8080: the probes, the Service and "
                                  "Prometheus use it)",
}


@dataclass(frozen=True)
class DeploymentValues:
    """Every key of the seed's values.yaml, resolved onto the defaults (what ``manifests`` renders).

    Resources are Kubernetes ``resources`` mappings (``requests`` / ``limits`` -> resource -> quantity
    string), already checked (names, quantities, request not above limit).
    """

    #: The three Envoy policy blocks, as ``envoy-config`` reads them.
    gateway: GatewayValues = field(default_factory=GatewayValues)
    #: ``gatewayPlugin.replicaCount``.
    router_replicas: int = DEFAULT_ROUTER_REPLICAS
    #: ``gatewayPlugin.container.resources``.
    router_resources: dict[str, dict[str, str]] = field(default_factory=lambda: copy.deepcopy(DEFAULT_ROUTER_RESOURCES))
    #: ``gatewayPlugin.container.envs``: extra environment of the router container, in order.
    router_env: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_ROUTER_ENVS))
    #: ``gatewayPlugin.dependencies.redis.host``; None (the seed's ``""``): the bundled Redis.
    redis_host: str | None = None
    #: ``gatewayPlugin.dependencies.redis.port``: ``REDIS_PORT``, and the bundled Redis Service's port.
    redis_port: int = DEFAULT_REDIS_PORT
    #: ``gateway.envoyProxy.replicas``.
    envoy_replicas: int = DEFAULT_ENVOY_REPLICAS
    #: ``gateway.envoyProxy.container.envoy.resources``.
    envoy_resources: dict[str, dict[str, str]] = field(default_factory=lambda: copy.deepcopy(DEFAULT_ENVOY_RESOURCES))
    #: ``metadata.redis.replicas`` (always 1: see :func:`load_deployment_values`).
    redis_replicas: int = DEFAULT_REDIS_REPLICAS
    #: ``metadata.redis.container.resources``.
    redis_resources: dict[str, dict[str, str]] = field(default_factory=lambda: copy.deepcopy(DEFAULT_REDIS_RESOURCES))

    @property
    def bundled_redis(self) -> bool:
        """Whether the deployment runs its own Redis (no external ``dependencies.redis.host``)."""
        return self.redis_host is None


def load_deployment_values(data: Mapping[str, Any] | None) -> DeploymentValues:
    """Validate a whole values.yaml (every key must be known) and resolve it onto the defaults.

    Merging follows Helm: a mapping given (``resources``, ``requests``, ``limits``, ``envs``) is merged
    entry by entry onto the default one, and ``null`` removes an entry (``envs: {X: null}`` drops a
    default variable, ``limits: null`` every default limit); a null number keeps its default.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ValuesError("", f"the values file must be a mapping at the top level, got {data!r}")
    _check_keys(data, "", ("gateway", "gatewayPlugin", "metadata"))
    gateway = _section(data, "gateway", ("clientTrafficPolicy", "backendTrafficPolicy", "envoyPatchPolicy",
                                         "envoyProxy"))
    plugin = _section(data, "gatewayPlugin", ("replicaCount", "container", "dependencies"))
    plugin_container = _section(plugin, "gatewayPlugin.container", ("resources", "envs"))
    redis_dep = _section(_section(plugin, "gatewayPlugin.dependencies", ("redis",)), _REDIS, ("host", "port"))
    proxy = _section(gateway, "gateway.envoyProxy", ("replicas", "container"))
    envoy_container = _section(_section(proxy, "gateway.envoyProxy.container", ("envoy",)),
                               "gateway.envoyProxy.container.envoy", ("resources",))
    metadata = _section(data, "metadata", ("redis",))
    redis = _section(metadata, "metadata.redis", ("replicas", "container"))
    redis_container = _section(redis, "metadata.redis.container", ("resources",))

    redis_host = _leaf(redis_dep, _REDIS, "host", _redis_host, None)
    if redis_host is not None and redis:
        raise ValuesError("metadata.redis", f"the bundled Redis is not deployed with an external {_REDIS}.host "
                                            f"({redis_host}): remove this block, as the seed says")
    router_env = _envs(plugin_container, _ENVS, DEFAULT_ROUTER_ENVS)
    return DeploymentValues(
        gateway=load_values(data),
        router_replicas=_leaf(plugin, "gatewayPlugin", "replicaCount", _positive_int(_INT32_MAX),
                              DEFAULT_ROUTER_REPLICAS),
        router_resources=_resources(plugin_container, "gatewayPlugin.container.resources", DEFAULT_ROUTER_RESOURCES),
        router_env=router_env,
        redis_host=redis_host,
        redis_port=_leaf(redis_dep, _REDIS, "port", _port_number, DEFAULT_REDIS_PORT),
        envoy_replicas=_leaf(proxy, "gateway.envoyProxy", "replicas", _positive_int(_INT32_MAX),
                             DEFAULT_ENVOY_REPLICAS),
        envoy_resources=_resources(envoy_container, "gateway.envoyProxy.container.envoy.resources",
                                   DEFAULT_ENVOY_RESOURCES),
        redis_replicas=_leaf(redis, "metadata.redis", "replicas", _redis_replicas, DEFAULT_REDIS_REPLICAS),
        redis_resources=_resources(redis_container, "metadata.redis.container.resources", DEFAULT_REDIS_RESOURCES),
    )


def _check_keys(node: Mapping[str, Any], path: str, allowed: Collection[str]) -> None:
    for key in node:
        if key not in allowed:
            raise ValuesError(f"{path}.{key}" if path else str(key), _unknown_key_problem(str(key), allowed))


def _section(parent: Mapping[str, Any], path: str, allowed: Collection[str]) -> Mapping[str, Any]:
    """The mapping at ``path`` (its last part a key of ``parent``), its keys checked; {} when absent."""
    raw = parent.get(path.rpartition(".")[2])
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ValuesError(path, f"expected a mapping with keys {', '.join(allowed)}, got {raw!r}")
    _check_keys(raw, path, allowed)
    return raw


def _leaf(parent: Mapping[str, Any], path: str, key: str, check: Leaf, default: Any) -> Any:
    raw = parent.get(key)
    return default if raw is None else check(f"{path}.{key}", raw)


def _port_number(path: str, raw: Any) -> int:
    if isinstance(raw, str) and raw.isdigit():  # Helm charts quote it as often as not
        raw = int(raw)
    return _positive_int(65535)(path, raw)


def _redis_replicas(path: str, raw: Any) -> int:
    value = _positive_int(_INT32_MAX)(path, raw)
    if value != 1:
        raise ValuesError(path, f"must be 1, got {value}: the bundled Redis is one in-memory instance, and "
                                f"{value} independent copies behind one Service would split the routers' shared "
                                f"state between them; for a replicated Redis, set {_REDIS}.host to it")
    return value


_DNS_LABEL = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?")


def _redis_host(path: str, raw: Any) -> str | None:
    if not isinstance(raw, str):
        raise ValuesError(path, f"expected a host name or IP address, got {raw!r}")
    if raw == "":  # the seed: leave empty to use the bundled Redis
        return None
    try:
        ipaddress.ip_address(raw)
        return raw
    except ValueError:
        pass
    name = raw.removesuffix(".")
    if len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValuesError(path, f"expected a host name or IP address without scheme or port (the port is "
                                f"{_REDIS}.port), got {raw!r}")
    return raw


# Kubernetes resource quantities: <number><suffix>, suffix binary (Ki..Ei), decimal (m, k..E) or an
# exponent (e3). Signs are not accepted: requests and limits cannot be negative.
_QUANTITY = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([eE][+-]?\d+|Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?")
_QUANTITY_SUFFIX = {
    "": Decimal(1), "m": Decimal("0.001"), "k": Decimal(10**3), "M": Decimal(10**6), "G": Decimal(10**9),
    "T": Decimal(10**12), "P": Decimal(10**15), "E": Decimal(10**18),
    "Ki": Decimal(2**10), "Mi": Decimal(2**20), "Gi": Decimal(2**30), "Ti": Decimal(2**40), "Pi": Decimal(2**50),
    "Ei": Decimal(2**60),
}


def parse_quantity(text: str) -> Decimal:
    """A Kubernetes quantity ("500m", "2", "1.5Gi", "1e3") as a number; ValueError if it is not one."""
    match = _QUANTITY.fullmatch(text)
    if match is None:
        raise ValueError(f"expected a Kubernetes quantity such as '500m', '2', '512Mi' or '4Gi', got {text!r}")
    number, suffix = Decimal(match.group(1)), match.group(2) or ""
    if suffix[:1] in ("e", "E") and len(suffix) > 1:
        return number.scaleb(int(suffix[1:]))
    return number * _QUANTITY_SUFFIX[suffix]


_RESOURCE_NAMES = ("cpu", "memory", "ephemeral-storage")
_EXTENDED_RESOURCE = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")


def _resource_name(path: str, name: Any) -> str:
    if isinstance(name, str) and (name in _RESOURCE_NAMES or _EXTENDED_RESOURCE.fullmatch(name)):
        return name
    if isinstance(name, str) and name.startswith("hugepages-"):
        try:
            parse_quantity(name.removeprefix("hugepages-"))
            return name
        except ValueError:
            pass
    close = difflib.get_close_matches(str(name), _RESOURCE_NAMES, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValuesError(path, f"unknown resource{hint}; expected {', '.join(_RESOURCE_NAMES)}, hugepages-<size> "
                            f"or an extended resource such as example.com/device")


def _quantity(path: str, raw: Any) -> str:
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise ValuesError(path, f"expected a Kubernetes quantity such as '500m', '2', '512Mi' or '4Gi', got {raw!r}")
    text = raw if isinstance(raw, str) else str(raw)  # cpu: 16 unquoted is the quantity "16"
    try:
        parse_quantity(text)
    except ValueError as exc:
        raise ValuesError(path, str(exc)) from None
    return text


def _resources(parent: Mapping[str, Any], path: str, default: Mapping[str, Mapping[str, str]]) -> dict[str, Any]:
    """``resources`` merged onto ``default`` (Helm's way), then checked: no request above its limit."""
    key = path.rpartition(".")[2]
    if key not in parent:
        return copy.deepcopy(dict(default))
    raw = parent[key]
    if raw is None:  # `resources: null` drops the defaults: no requests, no limits
        return {}
    if not isinstance(raw, Mapping):
        raise ValuesError(path, f"expected a mapping with keys requests, limits, got {raw!r}")
    _check_keys(raw, path, ("requests", "limits"))
    merged: dict[str, dict[str, str]] = {}
    given: set[str] = set()  # the paths the file set, to name the one to change
    for kind in ("requests", "limits"):
        entries = dict(default.get(kind, {}))
        if kind in raw:
            sub = raw[kind]
            if sub is None:
                entries = {}
            elif not isinstance(sub, Mapping):
                raise ValuesError(f"{path}.{kind}", f"expected a mapping of resource to quantity, got {sub!r}")
            else:
                for name, quantity in sub.items():
                    entry_path = f"{path}.{kind}.{name}"
                    name = _resource_name(entry_path, name)
                    if quantity is None:
                        entries.pop(name, None)
                    else:
                        entries[name] = _quantity(entry_path, quantity)
                        given.add(entry_path)
        if entries:
            merged[kind] = entries
    limits = merged.get("limits", {})
    for name, request in merged.get("requests", {}).items():
        if name in limits and parse_quantity(request) > parse_quantity(limits[name]):
            request_path, limit_path = f"{path}.requests.{name}", f"{path}.limits.{name}"
            if limit_path in given and request_path not in given:
                raise ValuesError(limit_path, f"{limits[name]} is below the request {request} "
                                              f"({request_path}{'' if request_path in given else ' by default'})")
            raise ValuesError(request_path, f"{request} is above the limit {limits[name]} "
                                            f"({limit_path}{'' if limit_path in given else ' by default'}; "
                                            f"raise it, or set it to null to drop it)")
    return merged


# A portable environment variable name (Kubernetes' classic rule: C identifiers plus '-' and '.').
_ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")


def _envs(parent: Mapping[str, Any], path: str, default: Mapping[str, str]) -> dict[str, str]:
    """``envs`` merged onto ``default``: name -> value as the container gets it (a string)."""
    if "envs" not in parent:
        return dict(default)
    raw = parent["envs"]
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ValuesError(path, f"expected a mapping of variable name to value, got {raw!r}")
    merged = dict(default)
    for name, value in raw.items():
        entry_path = f"{path}.{name}"
        if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
            raise ValuesError(entry_path, "not a valid environment variable name (letters, digits, '_', '-', '.'; "
                                          "not starting with a digit)")
        if name in RESERVED_ENVS:
            raise ValuesError(entry_path, RESERVED_ENVS[name])
        if value is None:
            merged.pop(name, None)
        elif isinstance(value, bool):  # Helm's `quote` writes YAML's true as "true"
            merged[name] = "true" if value else "false"
        elif isinstance(value, int | float | str):
            merged[name] = str(value)
        else:
            raise ValuesError(entry_path, f"expected a string, got {value!r}")
    return merged
