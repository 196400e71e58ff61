"""Layering of src/saeforge, read from the import statements (ast, nothing is imported).

A unit is the first path component under src/saeforge (a subpackage, or a top-level module without
`.py`); unit a depends on unit b when a module of a imports `saeforge.b...` (also as
`from saeforge import b`, or relatively). Data flows one way, so the units form no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "saeforge"
LEAVES = {"paths", "atomic", "runlock"}  # the bottom layer: they may import only each other


def unit_of(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def imported_modules(path: Path, package: Path = PACKAGE) -> set[str]:
    """Dotted names of everything the module at `path` imports, relative imports resolved."""
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    here = parts[:-1]  # the module's package (for __init__.py, parts[-1] is "__init__")
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out.add(module)
            out.update(f"{module}.{alias.name}" for alias in node.names)  # `from saeforge import b`
    return out


def dependency_graph() -> dict[str, set[str]]:
    """unit -> units it imports from (itself excluded)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = unit_of(path)
        graph.setdefault(unit, set())
        for name in imported_modules(path):
            parts = name.split(".")
            if parts[0] == "saeforge" and len(parts) > 1 and parts[1] != unit:
                if (PACKAGE / parts[1]).is_dir() or (PACKAGE / f"{parts[1]}.py").is_file():
                    graph[unit].add(parts[1])
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path a → ... → a) through every unit that lies on a cycle, each reported once."""
    cycles: list[list[str]] = []
    covered: set[str] = set()
    for start in sorted(graph):
        if start in covered:
            continue
        stack = [(start, [start])]
        seen: set[str] = set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    cycles.append(path + [start])
                    covered.update(path)
                    stack = []
                    break
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    return cycles


def test_no_import_cycles_between_units():
    cycles = find_cycles(dependency_graph())
    assert not cycles, "import cycles between saeforge units:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_paths_and_atomic_import_only_each_other():
    graph = dependency_graph()
    for leaf in sorted(LEAVES):
        extra = graph.get(leaf, set()) - LEAVES
        assert not extra, f"saeforge.{leaf} must import nothing from saeforge but {LEAVES - {leaf}}; it imports {extra}"


def test_the_checks_see_cycles_and_every_import_form(tmp_path):
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    module = tmp_path / "saeforge" / "sae" / "model.py"
    module.parent.mkdir(parents=True)
    module.write_text("import saeforge.atomic\nfrom saeforge import paths\nfrom ..lm import capture\nfrom . import x\n")
    names = imported_modules(module, tmp_path / "saeforge")
    assert {"saeforge.atomic", "saeforge.paths", "saeforge.lm", "saeforge.sae.x"} <= names
    graph = dependency_graph()
    assert {"activations", "sae", "interpret", "pipelines", "paths", "atomic"} <= set(graph)
    assert "sae" in graph["pipelines"] and "paths" in graph["lm"]
