"""The package's import graph: every module imports on its own, and no two modules import each other,
directly or through others (lazy imports inside functions count: they are edges too)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "brats_cnn"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """``{module: modules of the package it imports}`` from the source (module level and inside functions)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("brats_cnn"):
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("brats_cnn")]
            graph[name] |= {t for t in targets if t in modules and t not in (name, "brats_cnn")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                return path[path.index(child):] + [child]
            if child not in state:
                found = visit(child)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert {"brats_cnn.inference.segment", "brats_cnn.network.dense", "brats_cnn.inference.prior", "brats_cnn.network.model"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


@pytest.mark.parametrize("module", sorted(_modules()))
def test_every_module_imports_on_its_own(module):
    result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-1500:]


# The floors of docs/architecture.md: a module may import its own floor's subpackage or any lower floor.
FLOORS = {"cli": 6, "demo": 6, "training": 5, "inference": 4, "network": 3, "preprocessing": 2, "evaluation": 2,
          "data": 1, "config": 1, "device": 0, "fsutil": 0, "outward": 0, "provenance": 0, "errors": 0}
MAX_LINES = 610  # "no module over ~600 lines" (issue 36); a longer one says why in its first lines ("Length:")


def floor_of(module: str) -> tuple[int, str]:
    parts = module.split(".")
    return (FLOORS[parts[1]], parts[1]) if len(parts) > 1 else (0, "")


def test_every_module_has_a_floor_and_imports_only_its_own_or_lower_floors():
    graph = import_graph()
    upward = []
    for module, imported in graph.items():
        here, group = floor_of(module)
        for target in imported:
            there, other = floor_of(target)
            if there > here or (there == here and here == 2 and other != group):  # preprocessing and evaluation are apart
                upward.append(f"{module} -> {target}")
    assert upward == []
    assert floor_of("brats_cnn.inference.segment") == (4, "inference") and floor_of("brats_cnn") == (0, "")


def test_the_stage_subpackages_hold_the_stages():
    modules = set(_modules())
    for package, names in {"data": ["layouts", "io", "labels"], "preprocessing": ["bias", "nyul", "normalise", "cache"],
                           "network": ["model", "dense", "checkpoint"], "training": ["train", "sampling", "loss"],
                           "inference": ["segment", "predict", "prior", "postprocess"],
                           "evaluation": ["metrics", "evaluate", "pairing", "report"]}.items():
        assert {f"brats_cnn.{package}.{name}" for name in names} <= modules, package
    assert not {"brats_cnn.segment", "brats_cnn.io", "brats_cnn.train", "brats_cnn.model"} & modules  # moved, not copied


def test_no_module_is_over_about_600_lines_without_saying_why():
    long = []
    for module, path in _modules().items():
        text = path.read_text()
        if text.count("\n") > MAX_LINES and "Length:" not in "\n".join(text.splitlines()[:5]):
            long.append(f"{module} ({text.count(chr(10))} lines)")
    assert long == []
