"""The package's layering, read from the source with ``ast`` (nothing is imported).

- no import circle among the package's modules;
- every arrow between packages points down the layers below: ``indicator`` (theory) and ``attacks`` (experiment)
  import neither each other nor ``audit``, ``studies`` or the CLI, and ``stats`` imports no other package;
- no core module imports a package module inside a function (the CLI and the optional molecular path may).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "qmis_jax"

# Higher rank = higher layer; an import must go to a strictly lower rank (private root helpers such as _checks are
# rank 0 and import only each other).
RANK = {
    "quantizers": 1,
    "problems": 1,
    "stats": 1,
    "store": 1,
    "indicator": 2,
    "attacks": 2,
    "train": 2,
    "audit": 3,
    "molecular": 3,
    "studies": 4,
    "cli": 5,
    "": 6,  # qmis_jax/__init__.py
}
CORE = ("indicator", "attacks", "stats", "audit", "train", "quantizers", "problems")


def _module_name(path: Path) -> str:
    parts = ("qmis_jax", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _targets(module: str, node: ast.AST) -> list[str]:
    """The package modules an import statement names (a submodule imported by name counts as that submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "qmis_jax"]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        package = module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        source = ".".join(base + ([node.module] if node.module else []))
    elif node.module and node.module.split(".")[0] == "qmis_jax":
        source = node.module
    else:
        return []
    submodules = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in MODULES]
    # ``from package import submodule`` from inside that package (or from the root) needs only the submodule
    inside = source == "qmis_jax" or module.startswith(source + ".")
    return submodules if len(submodules) == len(node.names) and inside else [source, *submodules]


def _imports(module: str, *, top_level: bool) -> list[tuple[int, str]]:
    tree = ast.parse(MODULES[module].read_text())
    nodes = tree.body if top_level else list(ast.walk(tree))
    return [(getattr(n, "lineno", 0), t) for n in nodes for t in _targets(module, n)]


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _rank(package: str) -> int:
    return 0 if package.startswith("_") else RANK[package]


def test_every_package_has_a_rank():
    assert {_package(m) for m in MODULES if not _package(m).startswith("_")} <= set(RANK)


def test_no_import_circle():
    graph = {m: {t for _, t in _imports(m, top_level=True) if t in MODULES and t != m} for m in MODULES}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                pytest.fail("import circle: " + " -> ".join(path[path.index(t) :] + [t]))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_every_arrow_points_down():
    bad = []
    for m in MODULES:
        src = _package(m)
        for line, t in _imports(m, top_level=False):
            dst = _package(t)
            if dst == src or (src.startswith("_") and dst.startswith("_")):
                continue
            if not _rank(dst) < _rank(src):
                bad.append(f"{MODULES[m].relative_to(ROOT.parent)}:{line} imports {t}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("package", ["indicator", "attacks"])
def test_theory_and_experiment_stay_apart(package):
    other = {"indicator": "attacks", "attacks": "indicator"}[package]
    forbidden = {other, "audit", "studies", "cli"}
    for m in MODULES:
        if _package(m) == package:
            hits = [t for _, t in _imports(m, top_level=False) if _package(t) in forbidden]
            assert not hits, f"{m} imports {hits}"


def test_stats_imports_no_other_package():
    for m in MODULES:
        if _package(m) == "stats":
            hits = [t for _, t in _imports(m, top_level=False) if _package(t) != "stats"]
            assert not hits, f"{m} imports {hits}"


def test_no_import_inside_a_function_in_the_core():
    bad = []
    for m in MODULES:
        if _package(m) in CORE:
            top = set(_imports(m, top_level=True))
            bad += [f"{m}:{line} imports {t}" for line, t in _imports(m, top_level=False) if (line, t) not in top]
    assert not bad, "\n".join(bad)


def test_public_namespaces_are_sorted_and_complete():
    for package in ("indicator", "attacks", "stats"):
        tree = ast.parse((ROOT / package / "__init__.py").read_text())
        exported = next(
            ast.literal_eval(n.value)
            for n in tree.body
            if isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in n.targets)
        )
        imported = [a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names]
        assert exported == sorted(exported), package
        assert sorted(imported) == sorted(exported), package
