"""The import graph of `hf_specgen`: no circles between modules or between packages, and no arrow back up.

Read with the standard library (`ast`), without importing anything: every `import` and `from ... import`
counts, wherever it is (inside a function, under `if TYPE_CHECKING:`), because a lazy or type-only import
is a dependency all the same. `from pkg import name` imports the module `pkg.name` when there is one,
else `pkg`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest


ROOT = "hf_specgen"
SOURCE = Path(__file__).resolve().parents[1] / ROOT

# module -> {imported module: where, "path:line"}
Graph = dict[str, dict[str, str]]


def module_names(source: Path, package: str) -> dict[str, Path]:
    """`{dotted module name: file}` of every `.py` file under `source`, the package `package`.

    Args:
        source: the package's directory.
        package: its dotted name.

    Returns:
        A package's `__init__.py` under the package's own name.
    """
    names = {}
    for path in sorted(source.rglob("*.py")):
        parts = [package, *path.relative_to(source).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imported_names(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """What `module` (the file `path`) imports, as `(dotted name, line)`, relative imports resolved.

    Args:
        module: the module's dotted name.
        path: its file.
        modules: every module of the package (`module_names`), to tell a submodule from a name.

    Returns:
        Every imported name, wherever the import statement is (functions and `TYPE_CHECKING` blocks too).
    """
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.append((submodule if submodule in modules else source, node.lineno))
    return found


def import_graph(source: Path, package: str) -> Graph:
    """The package's modules and the modules of the package each imports (not itself, nothing outside).

    Args:
        source: the package's directory.
        package: its dotted name.

    Returns:
        `{module: {imported module: "path:line" of the first such import}}`, every module a key.
    """
    modules = module_names(source, package)
    graph: Graph = {name: {} for name in modules}
    for name, path in modules.items():
        for target, line in imported_names(name, path, modules):
            if target != package and not target.startswith(package + "."):
                continue
            while target not in modules:  # `pkg.mod.Class` written as a module path: its module
                target = target.rpartition(".")[0]
            if target != name:
                graph[name].setdefault(target, f"{path.relative_to(source.parent)}:{line}")
    return graph


def package_of(module: str, package: str) -> str:
    """The node of the package graph a module belongs to: its subpackage `pkg.X`, or itself (`pkg.Y`, `pkg`)."""
    return ".".join(module.split(".")[:2]) if module != package else package


def package_graph(graph: Graph, package: str) -> Graph:
    """`graph` between packages: an arrow `pkg.X -> pkg.Y` for each import from one to the other.

    Args:
        graph: the module graph (`import_graph`).
        package: the root package's name.

    Returns:
        `{node: {imported node: "path:line" of the first such import}}`.
    """
    packages: Graph = {}
    for module, targets in graph.items():
        node = packages.setdefault(package_of(module, package), {})
        for target, where in targets.items():
            other = package_of(target, package)
            if other != package_of(module, package):
                node.setdefault(other, where)
    return packages


def cycles(graph: Graph) -> list[list[str]]:
    """One circle through each strongly connected component of `graph` that has one (Tarjan's algorithm).

    Args:
        graph: `{node: {successor: ...}}`.

    Returns:
        Each circle as its nodes in order, the first repeated at the end (`[a, b, a]`); [] when there is none.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph.get(start, ())))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(graph.get(successor, ()))))
                    advanced = True
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)
    return [_circle(graph, set(component)) for component in components]


def _circle(graph: Graph, component: set[str]) -> list[str]:
    """A circle inside a strongly connected `component`: the shortest way back to its first member."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for successor in sorted(graph.get(node, ())):
                if successor == start:
                    return [*paths[node], start]
                if successor in component and successor not in paths:
                    paths[successor] = [*paths[node], successor]
                    following.append(successor)
        frontier = following
    raise AssertionError(f"{sorted(component)} is not strongly connected")


def describe(circle: list[str], graph: Graph) -> str:
    """`a -> b (a.py:3) -> a (b.py:7)`: a circle with where each arrow is written."""
    return circle[0] + "".join(f" -> {b} ({graph[a][b]})" for a, b in zip(circle, circle[1:]))


@pytest.fixture(scope="module")
def graph() -> Graph:
    return import_graph(SOURCE, ROOT)


def test_no_circle_between_modules(graph):
    found = cycles(graph)
    assert not found, "import circles between modules:\n" + "\n".join(describe(c, graph) for c in found)


def test_no_circle_between_packages(graph):
    packages = package_graph(graph, ROOT)
    found = cycles(packages)
    assert not found, "import circles between packages:\n" + "\n".join(describe(c, packages) for c in found)


def test_no_module_imports_the_root_package(graph):
    back = {module: targets[ROOT] for module, targets in graph.items() if ROOT in targets}
    assert not back, f"modules importing {ROOT} itself (import the submodule instead): " + ", ".join(
        f"{module} ({where})" for module, where in sorted(back.items())
    )


def test_the_graph_reads_every_kind_of_import(tmp_path):
    """The checks above can fail: a made-up package with one import of each kind, and circles."""
    source = tmp_path / "pkg"
    files = {
        "__init__.py": "from .version import VERSION\n",
        "version.py": "VERSION = '1'\n",
        "a/__init__.py": "",
        "a/one.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..b import two\n",
        "a/three.py": "def f():\n    from pkg import VERSION\n",
        "b/__init__.py": "",
        "b/two.py": "import os\nfrom ..a.one import Thing\nfrom . import four\n",
        "b/four.py": "from pkg.b.five import x\n",
        "b/five.py": "import pkg.b.four\n",
    }
    for name, text in files.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(text)
    graph = import_graph(source, "pkg")
    assert graph == {
        "pkg": {"pkg.version": "pkg/__init__.py:1"},
        "pkg.version": {},
        "pkg.a": {},
        "pkg.a.one": {"pkg.b.two": "pkg/a/one.py:3"},
        "pkg.a.three": {"pkg": "pkg/a/three.py:2"},
        "pkg.b": {},
        "pkg.b.two": {"pkg.a.one": "pkg/b/two.py:2", "pkg.b.four": "pkg/b/two.py:3"},
        "pkg.b.five": {"pkg.b.four": "pkg/b/five.py:1"},
        "pkg.b.four": {"pkg.b.five": "pkg/b/four.py:1"},
    }
    circles = sorted(cycles(graph))
    assert circles == [["pkg.a.one", "pkg.b.two", "pkg.a.one"], ["pkg.b.five", "pkg.b.four", "pkg.b.five"]]
    assert describe(circles[0], graph) == "pkg.a.one -> pkg.b.two (pkg/a/one.py:3) -> pkg.a.one (pkg/b/two.py:2)"
    packages = package_graph(graph, "pkg")
    assert cycles(packages) == [["pkg.a", "pkg.b", "pkg.a"]]
    assert packages["pkg.a"] == {"pkg.b": "pkg/a/one.py:3", "pkg": "pkg/a/three.py:2"}
