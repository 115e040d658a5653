"""The package's shape: dependencies run one way (no import circles), stages stay small.

Imports are read from the source (module level and inside functions alike, since a lazy
import is still a dependency); only ``if TYPE_CHECKING:`` blocks are left out, as they never
run.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).parent.parent / "medtl"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, modules: set[str]) -> set[str]:
    """medtl modules imported anywhere in ``tree`` outside TYPE_CHECKING blocks."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("medtl"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("medtl"):
            for a in node.names:  # ``from medtl.io import dicom`` imports the submodule
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    modules = set(files)
    return {
        name: {m for m in _imports(ast.parse(p.read_text()), modules) if m != name}
        for name, p in files.items()
    }


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return groups


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_medtl_has_no_import_circles():
    assert find_cycles(import_graph()) == []


def test_the_engine_knows_only_the_strategy_protocol():
    graph = import_graph()
    assert "medtl.training.strategies" not in graph["medtl.training.engine"]
    assert "medtl.training.features" not in graph["medtl.training.engine"]
    assert "medtl.training.protocol" in graph["medtl.training.engine"]


def test_the_demo_calls_the_api_not_the_cli():
    assert "medtl.cli" not in import_graph()["medtl.demo"]


def _long_functions(limit: int) -> list[str]:
    out = []
    for p in sorted((PKG / "jobs").rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > limit:
                    out.append(f"{p.name}:{node.name} ({n} lines)")
    return out


def test_train_job_stages_are_small():
    assert _long_functions(80) == []
