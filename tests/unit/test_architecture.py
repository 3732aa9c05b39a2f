"""ARCHITECTURE.md's import table, checked against the code: each package imports only what the
table allows. A new dependency between packages is a design change: make it here and there."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OURS = ("routing", "statesync", "ext_proc", "extproc_router")

# package (a folder or one module) -> the packages of ours it may import besides itself
ALLOWED: dict[str, set[str]] = {
    "routing": set(),
    "statesync": {"routing", "extproc_router.resp"},
    "ext_proc": {"routing", "extproc_router.ratelimit"},
    "extproc_router.resp": set(),
    "extproc_router.argtypes": set(),
    "extproc_router.ratelimit": {"extproc_router.resp"},
    "extproc_router.discovery": {"routing"},
    "extproc_router.envoyconfig": set(),
    "extproc_router.simulator": {"extproc_router.argtypes"},
    "extproc_router.loadtest": {"extproc_router.argtypes"},
}
APPLICATION = "extproc_router"  # cli, config, serve, stack, policy: may import anything, imported by none


def _unit(module: str) -> str | None:
    """The ALLOWED key (or the application layer) a dotted module name belongs to."""
    if module.split(".")[0] not in OURS:
        return None
    for key in sorted(ALLOWED, key=len, reverse=True):
        if module == key or module.startswith(key + "."):
            return key
    return APPLICATION


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def _modules() -> list[tuple[str, Path]]:
    found = []
    for top in OURS:
        for path in sorted((REPO / top).rglob("*.py")):
            if path.name.endswith("_pb2.py"):
                continue
            rel = path.relative_to(REPO).with_suffix("")
            found.append((".".join(rel.parts).removesuffix(".__init__"), path))
    return found


def test_imports_follow_the_architecture() -> None:
    broken = []
    for module, path in _modules():
        own = _unit(module)
        assert own is not None
        if own == APPLICATION:
            continue
        for imported in _imports(path):
            target = _unit(imported)
            if target is None or target == own:
                continue
            if target == APPLICATION or target not in ALLOWED[own]:
                broken.append(f"{module} imports {imported} ({own} may import "
                              f"{sorted(ALLOWED[own]) or 'nothing of ours'})")
    assert not broken, "\n".join(broken)


def test_a_forbidden_import_is_caught(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from extproc_router.serve import RouterProcess\nimport routing.router\n")
    assert _imports(bad) == {"extproc_router.serve", "routing.router"}
    assert _unit("extproc_router.serve") == APPLICATION
    assert _unit("extproc_router.simulator.server") == "extproc_router.simulator"
    assert "extproc_router.discovery" not in ALLOWED["routing"]


def test_the_table_in_architecture_md_names_every_package() -> None:
    text = (REPO / "ARCHITECTURE.md").read_text()
    for key in ALLOWED:
        shown = key.replace(".", "/") + "/" if "." not in key else key
        assert f"`{shown}`" in text or f"`{key}`" in text or key in text, key
