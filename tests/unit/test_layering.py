"""The import graph of src/pyqmail: no cycle, and nothing imports a layer above its own.

The layers, lowest first (docs/architecture.md):

    foundation (every top-level module, and any package not named below)
    <- queue <- smtp, local, remote, inject <- send <- daemon <- cli, check, showctl, demo

A module may import its own layer and those below it. Modules within a layer may import
each other, but no two packages may import each other (a package cycle), and no modules
may form an import cycle. An import inside a function counts (it is still a dependency);
one under ``if TYPE_CHECKING:`` does not. The graph is read from the source with ast.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pyqmail

SRC = Path(pyqmail.__file__).parent

LAYER = {
    "queue": 1,
    "smtp": 2,
    "local": 2,
    "remote": 2,
    "inject": 2,
    "send": 3,
    "daemon": 4,
    "cli": 5,
    "check": 5,
    "showctl": 5,
    "demo": 5,
}

# Known violations, checked both ways (each must still exist, nothing else may appear).
# The tree has none: keep it so.
EXPECTED: frozenset[str] = frozenset()


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package (a package is its __init__)."""
    mods = {}
    for path in SRC.rglob("*.py"):
        parts = ("pyqmail", *path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _package(module: str) -> str:
    """The top-level name under pyqmail (``pyqmail.send.job`` -> ``send``); "" for the root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer(module: str) -> int:
    return LAYER.get(_package(module), 0)


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except those under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from _imports(ast.Module(body=node.orelse, type_ignores=[]))
        else:
            yield from _imports(node)


def _targets(
    module: str, is_package: bool, node: ast.Import | ast.ImportFrom, mods: dict[str, Path]
) -> Iterator[str]:
    """The pyqmail modules an import statement names (``from p import m``: the module p.m
    if there is one, else p), each cut back to the nearest module that exists."""
    names: list[str] = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            pkg = module.split(".") if is_package else module.split(".")[:-1]
            pkg = pkg[: len(pkg) - (node.level - 1)]
            base = ".".join([*pkg, base] if base else pkg)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            names.append(sub if sub in mods else base)
    for name in names:
        if name.split(".")[0] != "pyqmail":
            continue
        while name not in mods and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in mods:
            yield name


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules it imports (not itself, nor a package it is inside)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        is_package = path.name == "__init__.py"
        deps = set()
        for node in _imports(tree):
            for dep in _targets(module, is_package, node, mods):
                if dep != module and not module.startswith(dep + "."):
                    deps.add(dep)
        graph[module] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one member (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def violations(graph: dict[str, set[str]]) -> set[str]:
    problems = set()
    for module, deps in graph.items():
        for dep in deps:
            if _layer(dep) > _layer(module):
                problems.add(f"upward import: {module} imports {dep}")
    for component in _cycles(graph):
        problems.add("import cycle: " + " <-> ".join(component))
    packages: dict[str, set[str]] = {}
    for module, deps in graph.items():
        for dep in deps:
            a, b = _package(module), _package(dep)
            if a != b and a and b:
                packages.setdefault(a, set()).add(b)
    for a, bs in packages.items():
        for b in bs:
            if a < b and a in packages.get(b, set()):
                problems.add(f"package cycle: {a} <-> {b}")
    return problems


def test_no_cycle_and_nothing_upward() -> None:
    found = violations(import_graph())
    assert sorted(found - EXPECTED) == [], "new layering problems"
    assert sorted(EXPECTED - found) == [], "fixed: remove these from EXPECTED"


def test_the_checker_sees_what_it_must() -> None:
    """The rule itself, on a made-up graph: an upward import inside a function, a cycle."""
    graph = {
        "pyqmail.queue.a": {"pyqmail.send.b"},
        "pyqmail.send.b": {"pyqmail.queue.a"},
        "pyqmail.home": set(),
    }
    assert violations(graph) == {
        "upward import: pyqmail.queue.a imports pyqmail.send.b",
        "import cycle: pyqmail.queue.a <-> pyqmail.send.b",
        "package cycle: queue <-> send",
    }


def test_imports_in_functions_count_and_type_checking_ones_do_not() -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from pyqmail.cli import main\n"
        "else:\n    import pyqmail.cdb\n"
        "def f():\n    from pyqmail.send import job\n"
    )
    mods = {m: Path() for m in ("pyqmail.cli.main", "pyqmail.cdb", "pyqmail.send.job")}
    got = {t for node in _imports(tree) for t in _targets("pyqmail.home", False, node, mods)}
    assert got == {"pyqmail.cdb", "pyqmail.send.job"}
