"""The plain measures of the code's structure (issue 20), each held by a test: no import cycle
(lazy imports inside functions included), layers that point down, no module too long to read in
one sitting, and a dispatcher that never asks an executor or an execution what it is."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent
PRODUCT = ("db", "jobs", "scheduler")
LAYERS = {"db": 0, "jobs": 1, "scheduler": 2}  # a module imports only from its own layer or those below
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def product_modules() -> dict[str, Path]:
    return {module_name(p): p for folder in PRODUCT for p in sorted((REPO / folder).rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """Every module of ours `path` imports, at the top or inside a function.

    `from package import name` counts as importing `package.name` when that is a module.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {n for n in found if n in known and n != name}


def import_graph() -> dict[str, set[str]]:
    modules = product_modules()
    known = set(modules)
    return {name: imports_of(path, name, known) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_between_modules_lazy_imports_included():
    assert cycles(import_graph()) == []


def test_the_cycle_check_sees_a_cycle_closed_by_a_lazy_import(tmp_path: Path):
    """The walk is not blind: a cycle closed by an import inside a function is found."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import x\n")
    graph = {name: imports_of(tmp_path / f"{name}.py", name, {"a", "b"}) for name in ("a", "b")}
    assert cycles(graph) == [["a", "b"]]


def test_layers_point_down():
    graph = import_graph()
    upward = sorted(
        f"{name} imports {target}"
        for name, targets in graph.items()
        for target in targets
        if LAYERS[target.split(".")[0]] > LAYERS[name.split(".")[0]]
    )
    assert upward == []


@pytest.mark.parametrize("folder", [*PRODUCT, "scripts"])
def test_no_module_is_too_long_to_read_in_one_sitting(folder: str):
    long = {
        str(path.relative_to(REPO)): lines
        for path in sorted((REPO / folder).rglob("*.py"))
        if (lines := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def asks_what_it_is(path: Path) -> list[str]:
    """`getattr`/`hasattr` calls whose object is an executor or an execution."""
    return [
        f"{path.name}:{node.lineno}: {ast.unparse(node)}"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("getattr", "hasattr")
        and node.args
        and any(word in ast.unparse(node.args[0]).lower() for word in ("executor", "execution", "delivered"))
    ]


def test_nothing_asks_an_executor_or_an_execution_what_it_is():
    assert [hit for path in product_modules().values() for hit in asks_what_it_is(path)] == []


def test_the_getattr_check_sees_the_old_dispatcher(tmp_path: Path):
    old = tmp_path / "old.py"
    old.write_text('if getattr(self.rt.executor, "start_until", None) is None:\n    pass\n')
    assert asks_what_it_is(old) == ["old.py:1: getattr(self.rt.executor, 'start_until', None)"]
