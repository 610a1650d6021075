"""The import graph of fastntk: no cycle, and the library never imports its command line.

The graph is read from the source with ``ast`` (nothing is imported): every ``import`` and
``from ... import`` of a fastntk module, absolute or relative, at module level or inside a
function, is an edge from the importing module to the most specific fastntk module it names
(``from .scale import store`` -> ``fastntk.scale.store``; ``from .plan import Plan`` ->
``fastntk.plan``). The packages a module sits in are not edges (Python initialises them first,
whatever the module imports). FASTNTK_SRC points the test at another source tree, e.g.
``FASTNTK_SRC=/path/to/src pytest tests/test_imports.py``.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

SRC = Path(os.environ.get("FASTNTK_SRC", Path(__file__).resolve().parents[1] / "src"))
PACKAGE = "fastntk"
CLI = f"{PACKAGE}.cli"
ENTRY_POINTS = {f"{PACKAGE}.__main__"}
"""Modules outside fastntk/cli that may import it: ``python -m fastntk`` runs the command line."""


def module_files(src: Path = SRC) -> dict[str, Path]:
    """Every module under src/fastntk by dotted name (a package by its own name, not '.__init__')."""
    modules = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of dotted ``name`` that is a fastntk module, or None outside fastntk."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imports_of(module: str, modules: dict[str, Path]) -> set[str]:
    """The fastntk modules that ``module`` imports anywhere in its source."""
    tree = ast.parse(modules[module].read_text(encoding="utf-8"), filename=str(modules[module]))
    package = module if is_package(module, modules) else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level > 1:
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from A import b` imports the module A.b when there is one, else takes b from A
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in names:
            target = resolve(name, modules)
            if target is not None and target != module:
                found.add(target)
    return found


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    modules = module_files(src)
    return {module: imports_of(module, modules) for module in modules}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path [a, b, ..., a], or None (iterative depth-first search)."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    for root in sorted(graph):
        if colour[root] != WHITE:
            continue
        stack: list[tuple[str, list[str]]] = [(root, sorted(graph[root]))]
        colour[root] = GREY
        while stack:
            node, todo = stack[-1]
            if not todo:
                colour[node] = BLACK
                stack.pop()
                continue
            nxt = todo.pop(0)
            if colour.get(nxt, BLACK) == GREY:
                path = [n for n, _ in stack]
                return path[path.index(nxt):] + [nxt]
            if colour.get(nxt) == WHITE:
                colour[nxt] = GREY
                stack.append((nxt, sorted(graph[nxt])))
    return None


def in_cli(module: str) -> bool:
    return module == CLI or module.startswith(CLI + ".")


# ---------------------------------------------------------------------------- the checker itself


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / PACKAGE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_graph_reads_every_kind_of_import(tmp_path) -> None:
    src = write_tree(tmp_path, {
        "__init__.py": "from ._api import ntk\n",
        "_api.py": "import torch\nfrom .scale import store\n",
        "scale/__init__.py": "from .store import Writer\n",
        "scale/store.py": "def f():\n    from ..cli import main\n",
        "scale/data.py": "import fastntk.plan\nfrom .. import _api\nfrom ...outside import x\n",
        "plan.py": "from fastntk.cli.loading import load\n",
        "cli/__init__.py": "from fastntk import _api\n",
        "cli/loading.py": "class load: ...\n",
    })
    graph = import_graph(src)
    assert graph["fastntk"] == {"fastntk._api"}
    assert graph["fastntk._api"] == {"fastntk.scale.store"}
    assert graph["fastntk.scale"] == {"fastntk.scale.store"}
    assert graph["fastntk.scale.store"] == {"fastntk.cli"}  # inside a function
    assert graph["fastntk.scale.data"] == {"fastntk.plan", "fastntk._api"}
    assert graph["fastntk.plan"] == {"fastntk.cli.loading"}
    assert find_cycle(graph) == ["fastntk._api", "fastntk.scale.store", "fastntk.cli", "fastntk._api"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


# ---------------------------------------------------------------------------- fastntk


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    graph = import_graph()
    assert f"{PACKAGE}._api" in graph and CLI in graph, f"no fastntk source under {SRC}"
    return graph


def test_no_import_cycle(graph) -> None:
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_library_never_imports_the_cli(graph) -> None:
    offenders = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        if not in_cli(module) and module not in ENTRY_POINTS
        for target in targets
        if in_cli(target)
    )
    assert not offenders, "the library imports its command line: " + "; ".join(offenders)


def test_only_the_entry_point_runs_the_cli(graph) -> None:
    assert graph[f"{PACKAGE}.__main__"] == {CLI}
