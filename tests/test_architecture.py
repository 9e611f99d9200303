"""The layering of DESIGN.md, read from the source: no import cycles among ``ditx`` modules
(imports inside functions count), and the core never imports ``ditx.modalities`` or
``ditx.recipes`` (it finds them as plugins and package data)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_names(package: str = "ditx") -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """Every module an import statement in ``path`` names (at any depth of the file).

    ``from ditx import checkpoint`` counts as ``ditx.checkpoint``; ``from ditx.x import y`` as
    ``ditx.x`` (and ``ditx.x.y`` if that is a module). The implicit import of a parent package
    is not counted: it is what every submodule import does.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return found


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges between ditx modules, every imported top-level name per ditx module)."""
    known = module_names()
    edges: dict[str, set[str]] = defaultdict(set)
    tops: dict[str, set[str]] = defaultdict(set)
    for name, path in known.items():
        for target in imports_of(path, name, known):
            tops[name].add(target.partition(".")[0])
            if target in known and target != name:
                edges[name].add(target)
    return edges, tops


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_among_ditx_modules():
    edges, _ = import_graph()
    assert "ditx.train" in edges and "ditx.build" in edges["ditx.train"]  # the walk sees real imports
    assert cycles(edges) == []


def test_the_core_never_imports_modalities_or_recipes():
    """``ditx.modalities`` and ``ditx.recipes`` are installed inside the ``ditx`` package (from the
    top-level folders), but the core in ditx/ never imports them, under either name."""
    known = module_names()
    outside = ("ditx.modalities", "ditx.recipes", "modalities", "recipes")
    inside = tuple(f"{o}." for o in outside)
    offenders = {}
    for name, path in known.items():
        bad = sorted(t for t in imports_of(path, name, known) if t in outside or t.startswith(inside))
        if bad:
            offenders[name] = bad
    assert offenders == {}


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
