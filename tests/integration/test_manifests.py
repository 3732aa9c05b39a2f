"""`extproc-router manifests`: the seed's values.yaml -> the Kubernetes deployment.

Every rendering here is validated the way deploy/kubernetes/ is (kubernetes-validate, strict; the
Envoy bootstrap with `envoy --mode validate`), and each knob is followed to where it must land.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc_router.cli import build_parser, main
from extproc_router.envoyconfig.values import ValuesError, load_deployment_values, load_values
from extproc_router.manifests import (
    DEFAULT_RELEASE,
    UNBOUNDED_REQUEST_WAIT_S,
    Names,
    load_checked_values,
    render_manifests,
)
from extproc_router.stack import envoy_binary

REPO = Path(__file__).resolve().parents[2]
K8S_DIR = REPO / "deploy" / "kubernetes"

# Every values.yaml snippet of the seed's deploying-gateway.rst, merged into one file, as written there.
SEED_VALUES = """\
gatewayPlugin:
  replicaCount: 3
  container:
    resources:
      limits:
        cpu: "16"
        memory: 32Gi
      requests:
        cpu: "16"
        memory: 32Gi
    envs:
      AIBRIX_STATESYNC_ENABLED: "true"
  dependencies:
    redis:
      host: ""   # leave empty to use the chart-managed Redis (aibrix-redis-master)
      port: 6379

gateway:
  envoyProxy:
    replicas: 3
    container:
      envoy:
        resources:
          limits:
            cpu: "8"
            memory: 16Gi
          requests:
            cpu: "8"
            memory: 16Gi
  clientTrafficPolicy:
    connection:
      bufferLimit: 4194304   # bytes; 4 MiB default
      connectionLimit:
        value: 1024
    http2:
      maxConcurrentStreams: 1024
  backendTrafficPolicy:
    circuitBreaker:
      maxConnections: 1024
      maxParallelRequests: 1024
      maxParallelRetries: 1024
      maxPendingRequests: 1024
      maxRequestsPerConnection: 1024
    http2:
      maxConcurrentStreams: 1024
  envoyPatchPolicy:
    route:
      timeout: 120s
      connectTimeout: 6s
    circuitBreakers:
      maxConnections: 1024
      maxRequests: 1024
      maxPendingRequests: 1024

metadata:
  redis:
    replicas: 1
    container:
      resources:
        requests:
          cpu: "1"
          memory: 2Gi
        limits:
          cpu: "2"
          memory: 4Gi
"""

MIB = 1024 * 1024


# ------------------------------------------------------------------------------------------ helpers


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["manifests", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def docs_of(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = find(docs, kind, name)
    return doc


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def env_of(deployment: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(deployment)["env"]}


def args_of(deployment: dict[str, Any]) -> Any:
    return build_parser().parse_args(container(deployment)["args"])


def arg_after(deployment: dict[str, Any], flag: str) -> str:
    args = container(deployment)["args"]
    return args[args.index(flag) + 1]


def bootstrap_of(docs: list[dict[str, Any]], names: Names) -> str:
    return one(docs, "ConfigMap", names.envoy_config)["data"]["envoy.yaml"]


def validate_schemas(docs: list[dict[str, Any]]) -> None:
    import kubernetes_validate

    k8s_version = kubernetes_validate.utils.latest_version()
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, k8s_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def envoy_validate(bootstrap: str, tmp_path: Path) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text(bootstrap)
    proc = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path), "-l", "error"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"envoy rejects the bootstrap:\n{proc.stdout}\n{proc.stderr}"


def render(data: dict[str, Any] | None, names: Names | None = None) -> list[dict[str, Any]]:
    rendering = render_manifests(load_checked_values(data), names=names or Names())
    return [m.doc for m in rendering.manifests]


def write_values(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "values.yaml"
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------ the seed


@pytest.fixture
def seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[list[dict[str, Any]], str, Names]:
    """The seed's merged values, deployed as the seed's release `aibrix`: the docs, stderr, the names."""
    values = write_values(tmp_path, SEED_VALUES)
    code, out, err = cli(capsys, "-f", str(values), "--namespace", "aibrix-system", "--release", "aibrix",
                         "--create-namespace")
    assert code == 0, err
    return docs_of(out), err, Names("aibrix", "aibrix-system")


def test_the_seeds_values_render_and_validate(seed: tuple[list[dict[str, Any]], str, Names],
                                              tmp_path: Path) -> None:
    docs, _, names = seed
    validate_schemas(docs)
    envoy_validate(bootstrap_of(docs, names), tmp_path)
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert kinds == sorted([
        ("Namespace", "aibrix-system"),
        ("ServiceAccount", "aibrix"), ("ClusterRole", "aibrix-system:aibrix-pod-reader"),
        ("ClusterRoleBinding", "aibrix-system:aibrix-pod-reader"),
        ("Deployment", "aibrix-redis-master"), ("Service", "aibrix-redis-master"),
        ("Deployment", "aibrix"), ("Service", "aibrix"),
        ("ConfigMap", "aibrix-envoy-config"), ("Deployment", "aibrix-envoy"), ("Service", "aibrix-envoy"),
        ("NetworkPolicy", "aibrix"), ("NetworkPolicy", "aibrix-redis-master"),
    ])
    for doc in docs:
        if doc["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == "aibrix-system", doc["metadata"]["name"]


def test_the_seeds_knobs_land_where_they_should(seed: tuple[list[dict[str, Any]], str, Names],
                                                tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs, err, names = seed
    router = one(docs, "Deployment", names.router)
    # gatewayPlugin.replicaCount, container.resources, container.envs
    assert router["spec"]["replicas"] == 3
    assert container(router)["resources"] == {"requests": {"cpu": "16", "memory": "32Gi"},
                                              "limits": {"cpu": "16", "memory": "32Gi"}}
    env = env_of(router)
    assert env["AIBRIX_STATESYNC_ENABLED"] == "true"
    # dependencies.redis.host "" -> REDIS_HOST <release>-redis-master, served by the bundled Redis on port
    assert env["REDIS_HOST"] == "aibrix-redis-master"
    assert env["REDIS_PORT"] == "6379"
    assert one(docs, "Service", env["REDIS_HOST"])["spec"]["ports"][0]["port"] == 6379
    # gateway.envoyProxy.replicas, container.envoy.resources (and Envoy's worker threads from its CPUs)
    envoy = one(docs, "Deployment", names.envoy)
    assert envoy["spec"]["replicas"] == 3
    assert container(envoy)["resources"] == {"requests": {"cpu": "8", "memory": "16Gi"},
                                             "limits": {"cpu": "8", "memory": "16Gi"}}
    assert arg_after(envoy, "--concurrency") == "8"
    # metadata.redis.replicas, container.resources
    redis = one(docs, "Deployment", names.redis)
    assert redis["spec"]["replicas"] == 1
    assert container(redis)["resources"] == {"requests": {"cpu": "1", "memory": "2Gi"},
                                             "limits": {"cpu": "2", "memory": "4Gi"}}
    # The policies: the ConfigMap is exactly what `envoy-config` prints for the same file.
    values = write_values(tmp_path, SEED_VALUES)
    code = main(["envoy-config", "-f", str(values), "--listen", "0.0.0.0:8888",
                 "--extproc", "aibrix.aibrix-system.svc.cluster.local:50052",
                 "--router-http", "aibrix.aibrix-system.svc.cluster.local:8080"])
    assert code == 0
    assert bootstrap_of(docs, names) == capsys.readouterr().out
    # bufferLimit is also the router's body limit; the route timeout bounds the routers' shutdown.
    assert args_of(router).max_body_bytes == 4194304
    assert args_of(router).shutdown_grace == 120
    # The seed's 16 CPUs per router replica are for a multi-threaded process: said on stderr.
    assert "one router process is one event loop" in err


def test_every_knob_moves_with_its_value(tmp_path: Path) -> None:
    """Values unlike the defaults, so that a knob that is ignored cannot pass by chance."""
    data = {
        "gatewayPlugin": {
            "replicaCount": 5,
            "container": {"resources": {"requests": {"cpu": "750m", "memory": "3Gi"}, "limits": {"memory": "6Gi"}},
                          "envs": {"ROUTING_ALGORITHM": "least-request", "AIBRIX_PREFILL_REQUEST_TIMEOUT": 45,
                                   "EXTPROC_ROUTER_KV_EVENTS": True}},
            "dependencies": {"redis": {"port": 6380}},
        },
        "gateway": {
            "envoyProxy": {"replicas": 4, "container": {"envoy": {"resources": {
                "requests": {"cpu": "1500m", "memory": "1536Mi"}, "limits": {"cpu": "3500m", "memory": "3Gi"}}}}},
            "clientTrafficPolicy": {"connection": {"bufferLimit": 8 * MIB}},
            "envoyPatchPolicy": {"route": {"timeout": "10m"}},
        },
        "metadata": {"redis": {"container": {"resources": {"requests": {"cpu": "300m", "memory": "700Mi"}}}}},
    }
    names = Names()
    docs = render(data)
    validate_schemas(docs)
    envoy_validate(bootstrap_of(docs, names), tmp_path)
    router, envoy = one(docs, "Deployment", names.router), one(docs, "Deployment", names.envoy)
    redis = one(docs, "Deployment", names.redis)

    assert router["spec"]["replicas"] == 5
    assert container(router)["resources"] == {"requests": {"cpu": "750m", "memory": "3Gi"},
                                              "limits": {"memory": "6Gi"}}
    env = env_of(router)
    assert (env["ROUTING_ALGORITHM"], env["AIBRIX_PREFILL_REQUEST_TIMEOUT"], env["EXTPROC_ROUTER_KV_EVENTS"]) == \
        ("least-request", "45", "true")
    assert env["AIBRIX_STATESYNC_ENABLED"] == "true"  # the default, merged under the file's envs
    assert (env["REDIS_HOST"], env["REDIS_PORT"]) == (names.redis, "6380")
    (redis_port,) = one(docs, "Service", names.redis)["spec"]["ports"]
    assert redis_port["port"] == 6380 and redis_port["targetPort"] == "redis"

    assert envoy["spec"]["replicas"] == 4
    assert container(envoy)["resources"]["limits"] == {"cpu": "3500m", "memory": "3Gi"}
    assert arg_after(envoy, "--concurrency") == "4"  # 3.5 CPUs: 4 workers

    # Redis: the requests given, the default memory limit kept.
    assert container(redis)["resources"] == {"requests": {"cpu": "300m", "memory": "700Mi"},
                                             "limits": {"memory": "1Gi"}}

    # bufferLimit -> Envoy and the router; route timeout -> Envoy's route, both drains and grace periods.
    bootstrap = yaml.safe_load(bootstrap_of(docs, names))
    (listener,) = bootstrap["static_resources"]["listeners"]
    assert listener["per_connection_buffer_limit_bytes"] == 9 * MIB
    assert args_of(router).max_body_bytes == 8 * MIB
    assert args_of(router).shutdown_grace == 600
    assert router["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > \
        args_of(router).drain_delay + args_of(router).shutdown_grace
    prestop = container(envoy)["lifecycle"]["preStop"]["exec"]["command"][-1]
    assert "/drain_listeners?graceful" in prestop and "$(seq 1 605)" in prestop
    drain = int(arg_after(envoy, "--drain-time-s"))
    assert envoy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain + 605


def test_the_seeds_external_redis_drops_the_bundled_one(tmp_path: Path) -> None:
    data = {"gatewayPlugin": {"dependencies": {"redis": {"host": "my-redis.cache.example.com", "port": 6390}}}}
    names = Names()
    docs = render(data)
    validate_schemas(docs)
    env = env_of(one(docs, "Deployment", names.router))
    assert (env["REDIS_HOST"], env["REDIS_PORT"]) == ("my-redis.cache.example.com", "6390")
    assert not [d for d in docs if "redis" in d["metadata"]["name"]]
    assert not [d for d in docs if d["metadata"].get("labels", {}).get("app.kubernetes.io/name") == "redis"]
    assert [p["metadata"]["name"] for p in find(docs, "NetworkPolicy")] == [names.router]
    # An IP address works as well.
    env = env_of(one(render({"gatewayPlugin": {"dependencies": {"redis": {"host": "10.1.2.3"}}}}),
                     "Deployment", names.router))
    assert (env["REDIS_HOST"], env["REDIS_PORT"]) == ("10.1.2.3", "6379")


def test_the_defaults_are_deploy_kubernetes(capsys: pytest.CaptureFixture[str]) -> None:
    """deploy/kubernetes/ is `manifests --create-namespace --demo-models` split into files, in the
    kustomization's order (test_deploy checks the files are current and valid)."""
    code, out, _ = cli(capsys, "--create-namespace", "--demo-models")
    assert code == 0
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    committed = [d for name in kustomization["resources"] for d in docs_of((K8S_DIR / name).read_text())]
    assert committed == docs_of(out)
    # Without the options: no Namespace, no simulated pods.
    code, out, _ = cli(capsys)
    assert code == 0
    assert [d for d in docs_of(out) if d["kind"] == "Namespace" or "demo" in d["metadata"]["name"]] == []


def test_release_and_namespace_name_everything() -> None:
    names = Names("team-a", "inference")
    docs = render(None, names)
    validate_schemas(docs)
    for doc in docs:
        meta = doc["metadata"]
        assert meta["name"].startswith("team-a") or meta["name"].startswith("inference:team-a"), meta["name"]
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert meta["namespace"] == "inference"
        assert meta["labels"]["app.kubernetes.io/instance"] == "team-a"
    # Selectors carry the release: another release in the same namespace is never selected.
    other = render(None, Names("team-b", "inference"))
    for kind in ("Deployment", "Service", "NetworkPolicy"):
        mine = [d for d in docs if d["kind"] == kind]
        theirs_labels = [d["spec"]["template"]["metadata"]["labels"] for d in other if d["kind"] == "Deployment"]
        for doc in mine:
            spec = doc["spec"]
            selector = (spec.get("selector", {}).get("matchLabels") if kind == "Deployment"
                        else spec.get("selector") if kind == "Service" else spec["podSelector"]["matchLabels"])
            assert not any(selector.items() <= labels.items() for labels in theirs_labels), doc["metadata"]["name"]
    binding = one(docs, "ClusterRoleBinding", names.pod_reader)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "team-a", "namespace": "inference"}]
    assert one(render(None, Names("team-a", "other")), "ClusterRoleBinding", "other:team-a-pod-reader")
    # Envoy reaches this release's routers, and mounts this release's ConfigMap.
    bootstrap = yaml.safe_load(bootstrap_of(docs, names))
    hosts = {ep["endpoint"]["address"]["socket_address"]["address"]
             for c in bootstrap["static_resources"]["clusters"]
             for group in (c.get("load_assignment") or {}).get("endpoints", ())
             for ep in group["lb_endpoints"]}
    assert hosts == {"team-a.inference.svc.cluster.local"}
    (volume,) = one(docs, "Deployment", names.envoy)["spec"]["template"]["spec"]["volumes"]
    assert volume["configMap"]["name"] == "team-a-envoy-config"
    assert env_of(one(docs, "Deployment", "team-a"))["REDIS_HOST"] == "team-a-redis-master"


def test_helm_merging_and_null() -> None:
    values = load_deployment_values({"gatewayPlugin": {"container": {
        "envs": {"AIBRIX_STATESYNC_ENABLED": None, "EXTRA": "1"},
        "resources": {"limits": None, "requests": {"memory": None, "cpu": "2"}},
    }}})
    assert values.router_env == {"EXTRA": "1"}
    assert values.router_resources == {"requests": {"cpu": "2"}}
    assert load_deployment_values({"gatewayPlugin": {"container": {"envs": None, "resources": None}}}).router_env == {}
    defaults = load_deployment_values(None)
    assert load_deployment_values({"gatewayPlugin": {"replicaCount": None, "container": {}},
                                   "gateway": {"envoyProxy": None}, "metadata": None}) == defaults
    docs = render({"gatewayPlugin": {"container": {"resources": None}}})
    assert "resources" not in container(one(docs, "Deployment", DEFAULT_RELEASE))
    # The policies read here are the ones envoy-config reads.
    seed = yaml.safe_load(SEED_VALUES)
    assert load_deployment_values(seed).gateway == load_values(seed)


def test_route_timeout_zero_waits_a_bounded_time() -> None:
    names = Names()
    docs = render({"gateway": {"envoyPatchPolicy": {"route": {"timeout": 0}}}})
    router, envoy = one(docs, "Deployment", names.router), one(docs, "Deployment", names.envoy)
    assert args_of(router).shutdown_grace == UNBOUNDED_REQUEST_WAIT_S
    assert f"$(seq 1 {UNBOUNDED_REQUEST_WAIT_S + 5})" in container(envoy)["lifecycle"]["preStop"]["exec"]["command"][-1]


def test_a_new_bootstrap_rolls_envoy() -> None:
    names = Names()
    key = "extproc-router.io/envoy-config-sha256"

    def annotation(data: dict[str, Any] | None) -> str:
        return one(render(data), "Deployment", names.envoy)["spec"]["template"]["metadata"]["annotations"][key]

    assert annotation(None) == annotation({"gateway": {"envoyProxy": {"replicas": 7}}})
    assert annotation(None) != annotation({"gateway": {"envoyPatchPolicy": {"route": {"timeout": "300s"}}}})


@pytest.mark.parametrize(
    ("data", "key", "problem"),
    [
        ({"gatewayplugin": {}}, "gatewayplugin", "did you mean 'gatewayPlugin'"),
        ({"controllerManager": {"replicas": 1}}, "controllerManager", "allowed here: gateway, gatewayPlugin, metadata"),
        ({"gatewayPlugin": {"replicas": 3}}, "gatewayPlugin.replicas", "did you mean 'replicaCount'"),
        ({"gatewayPlugin": {"replicaCount": 0}}, "gatewayPlugin.replicaCount", "positive integer"),
        ({"gatewayPlugin": {"replicaCount": "3"}}, "gatewayPlugin.replicaCount", "positive integer"),
        ({"gatewayPlugin": {"container": {"image": "x"}}}, "gatewayPlugin.container.image", "unknown key"),
        ({"gatewayPlugin": {"container": {"resources": {"requests": {"memroy": "1Gi"}}}}},
         "gatewayPlugin.container.resources.requests.memroy", "did you mean 'memory'"),
        ({"gatewayPlugin": {"container": {"resources": {"limits": {"cpu": "two"}}}}},
         "gatewayPlugin.container.resources.limits.cpu", "Kubernetes quantity"),
        ({"gatewayPlugin": {"container": {"resources": {"requests": {"memory": "3Gi"}}}}},
         "gatewayPlugin.container.resources.requests.memory", "above the limit 2Gi"),
        ({"gatewayPlugin": {"container": {"resources": {"claims": []}}}},
         "gatewayPlugin.container.resources.claims", "unknown key"),
        ({"gatewayPlugin": {"container": {"envs": ["A=1"]}}}, "gatewayPlugin.container.envs", "mapping"),
        ({"gatewayPlugin": {"container": {"envs": {"A B": "1"}}}}, "gatewayPlugin.container.envs.A B",
         "environment variable name"),
        ({"gatewayPlugin": {"container": {"envs": {"REDIS_HOST": "r"}}}}, "gatewayPlugin.container.envs.REDIS_HOST",
         "gatewayPlugin.dependencies.redis.host"),
        ({"gatewayPlugin": {"container": {"envs": {"AIBRIX_GRPC_MAX_MESSAGE_SIZE_BYTES": "1"}}}},
         "gatewayPlugin.container.envs.AIBRIX_GRPC_MAX_MESSAGE_SIZE_BYTES", "bufferLimit"),
        ({"gatewayPlugin": {"container": {"envs": {"AIBRIX_STATESYNC_ENABLED": "ture"}}}},
         "gatewayPlugin.container.envs.AIBRIX_STATESYNC_ENABLED", "true or false"),
        ({"gatewayPlugin": {"container": {"envs": {"AIBRIX_STATESYNC_ENABLE": "true"}}}},
         "gatewayPlugin.container.envs.AIBRIX_STATESYNC_ENABLE", "did you mean 'AIBRIX_STATESYNC_ENABLED'"),
        ({"gatewayPlugin": {"container": {"envs": {"AIBRIX_PREFIX_CACHE_BLOCK_SIZE": "-4"}}}},
         "gatewayPlugin.container.envs.AIBRIX_PREFIX_CACHE_BLOCK_SIZE", "AIBRIX_PREFIX_CACHE_BLOCK_SIZE"),
        ({"gatewayPlugin": {"container": {"envs": {"ROUTING_ALGORITHM": "prefix_cache"}}}},
         "gatewayPlugin.container.envs.ROUTING_ALGORITHM", "expected one of least-request, pd, prefix-cache"),
        ({"gatewayPlugin": {"dependencies": {"redis": {"host": "redis:6379"}}}},
         "gatewayPlugin.dependencies.redis.host", "without scheme or port"),
        ({"gatewayPlugin": {"dependencies": {"redis": {"port": 70000}}}},
         "gatewayPlugin.dependencies.redis.port", "at most 65535"),
        ({"gatewayPlugin": {"dependencies": {"redis": {"password": "x"}}}},
         "gatewayPlugin.dependencies.redis.password", "allowed here: host, port"),
        ({"gateway": {"enable": True}}, "gateway.enable", "allowed here"),
        ({"gateway": {"envoyProxy": {"replica": 2}}}, "gateway.envoyProxy.replica", "did you mean 'replicas'"),
        ({"gateway": {"envoyProxy": {"container": {"shutdownManager": {}}}}},
         "gateway.envoyProxy.container.shutdownManager", "allowed here: envoy"),
        ({"gateway": {"envoyProxy": {"container": {"envoy": {"resources": {"limits": {"memory": "512Mi"}}}}}}},
         "gateway.envoyProxy.container.envoy.resources.limits.memory", "below the request 1Gi"),
        ({"gateway": {"clientTrafficPolicy": {"connection": {"bufferLimit": "4MiB"}}}},
         "gateway.clientTrafficPolicy.connection.bufferLimit", "positive integer"),
        ({"metadata": {"redis": {"replicas": 3}}}, "metadata.redis.replicas", "must be 1"),
        ({"metadata": {"redis": {"container": {"resources": {"requests": {"cpu": -1}}}}}},
         "metadata.redis.container.resources.requests.cpu", "Kubernetes quantity"),
        ({"metadata": {"service": {}}}, "metadata.service", "allowed here: redis"),
        ({"gatewayPlugin": {"dependencies": {"redis": {"host": "ext"}}}, "metadata": {"redis": {"replicas": 1}}},
         "metadata.redis", "remove this block"),
    ],
)
def test_bad_values_name_the_key(data: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(ValuesError) as err:
        load_checked_values(data)
    assert err.value.path == key
    assert str(err.value).startswith(f"{key}: ")
    assert problem in str(err.value)


def test_cli_errors_and_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = write_values(tmp_path, "gatewayPlugin:\n  replicaCount: many\n")
    code, out, err = cli(capsys, "-f", str(bad))
    assert (code, out) == (2, "")
    assert err == f"extproc-router manifests: error: {bad}: gatewayPlugin.replicaCount: expected a positive " \
                  f"integer, got 'many'\n"
    code, out, err = cli(capsys, "--release", "Team_A")
    assert code == 2 and "release name 'Team_A'" in err
    code, out, err = cli(capsys, "-f", str(tmp_path / "missing.yaml"))
    assert code == 2 and "cannot read" in err
    # Several replicas without state sync render, with a warning on stderr.
    no_sync = write_values(tmp_path, "gatewayPlugin:\n  container:\n    envs:\n      AIBRIX_STATESYNC_ENABLED: null\n")
    code, out, err = cli(capsys, "-f", str(no_sync), "-o", str(tmp_path / "out.yaml"))
    assert code == 0 and out == ""
    assert "warning: gatewayPlugin.replicaCount is 3" in err and "AIBRIX_STATESYNC_ENABLED" in err
    assert "AIBRIX_STATESYNC_ENABLED" not in env_of(one(docs_of((tmp_path / "out.yaml").read_text()),
                                                        "Deployment", DEFAULT_RELEASE))
    code, _, err = cli(capsys)
    assert code == 0 and err == ""  # the defaults draw no warning


def test_extproc_router_manifests_subcommand(tmp_path: Path) -> None:
    values = write_values(tmp_path, SEED_VALUES)
    proc = subprocess.run([sys.executable, "-m", "extproc_router", "manifests", "-f", str(values)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert one(docs_of(proc.stdout), "Deployment", DEFAULT_RELEASE)["spec"]["replicas"] == 3


def test_the_readme_deploys_the_seeds_examples(tmp_path: Path) -> None:
    """The README's Kubernetes section shows the seed's own values (merged) and an external Redis."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Run it on Kubernetes"):readme.index("## Commands")]
    blocks = [block.split("```", 1)[0] for block in section.split("```yaml\n")[1:]]
    seed_block, external_block = blocks
    assert yaml.safe_load(seed_block) == yaml.safe_load(SEED_VALUES)
    docs = render(yaml.safe_load(external_block))
    assert not [d for d in docs if "redis" in d["metadata"]["name"]]
    assert "manifests -f values.yaml --namespace aibrix-system --release aibrix" in section
