"""The core package's modules import one another one way only: no cycle, not even one for types
(a `TYPE_CHECKING` import counts: it ties the two modules together all the same)."""

from __future__ import annotations

import ast

from tests.helpers import REPO

CORE = REPO / "service" / "core"


def imported_core_modules(path) -> set[str]:
    """The service.core modules a file imports, at any depth of its code (functions and
    TYPE_CHECKING blocks too), by their short names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom):
            if node.level:  # a relative import: from . import x, from .x import y
                base = "service.core" + (f".{node.module}" if node.module else "")
            else:
                base = node.module or ""
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        found |= {n.split(".")[2] for n in names if n.startswith("service.core.")}
    return found - {path.stem}


def core_imports() -> dict[str, set[str]]:
    modules = {f.stem for f in CORE.glob("*.py")} - {"__init__"}
    return {m: imported_core_modules(CORE / f"{m}.py") & modules for m in sorted(modules)}


def test_features_and_metadata_do_not_import_each_other():
    """metadata.py owns the metadata vocabulary; features.py (the encoder that carries it) reads it."""
    graph = core_imports()
    assert "metadata" in graph["features"]
    assert "features" not in graph["metadata"], "service/core/metadata.py imports service.core.features"


def test_core_modules_import_one_another_without_a_cycle():
    graph = core_imports()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = path[path.index(module) :] + [module]
            raise AssertionError("service.core imports in a cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, path + [module])
        done.add(module)

    for module in graph:
        visit(module, [])
