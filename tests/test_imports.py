"""No import circle in the package: the module-level imports between atv_sparse's modules form a DAG.

Only imports executed when a module is imported count (module-level statements, including those
under a module-level ``if`` / ``try``); an import inside a function runs when it is called and is
the way to reach upward without a circle. Each edge goes to the module named (``from .x import y``
reaches ``x`` and, when ``y`` is a submodule, ``x.y``); parent packages are not edges, since every
module would otherwise reach ``atv_sparse/__init__.py``.
"""

import ast
from pathlib import Path

import atv_sparse

PACKAGE = Path(atv_sparse.__file__).parent

# Circles in code this change does not own, each named exactly (module -> ... -> itself); the
# test fails on any other circle, and on an entry here that no longer exists (remove it then).
ALLOWED_CYCLES: set[tuple[str, ...]] = set()


def module_names() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package is its __init__.py)."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("atv_sparse",) + path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _module_level_imports(tree: ast.Module):
    """Import statements that run at import time: module level, through if / try / with blocks."""
    todo = list(tree.body)
    while todo:
        node = todo.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, field, []):
                    todo.extend(child.body if isinstance(child, ast.ExceptHandler) else [child])


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports at module level."""
    names = module_names()
    graph = {}
    for name, path in names.items():
        is_package = path.name == "__init__.py"
        here = name.split(".") if is_package else name.split(".")[:-1]
        deps = set()
        for node in _module_level_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = here[:len(here) - node.level + 1] if node.level else []
                module = ".".join(base + (node.module.split(".") if node.module else []))
                submodules = [f"{module}.{alias.name}" for alias in node.names]
                # ``from . import x`` of submodules only does not run the package's own __init__ again
                targets = submodules if all(m in names for m in submodules) else [module] + submodules
            for target in targets:
                while target and target not in names:  # a name inside a module: the module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    deps.add(target)
        graph[name] = deps
    return graph


def find_cycles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """Every elementary circle reachable by depth-first search, each rotated to start at its
    smallest module name (so that the same circle always reads the same)."""
    cycles = set()
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):]
                start = cycle.index(min(cycle))
                cycles.add(tuple(cycle[start:] + cycle[:start]))
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return cycles


def test_the_graph_sees_the_package():
    graph = import_graph()
    assert "atv_sparse.evaluate" in graph and "atv_sparse.tinybench.scoring" in graph
    assert "atv_sparse.tinybench.metrics" in graph["atv_sparse.tinybench.scoring"]
    assert "atv_sparse.errors" in graph["atv_sparse.tinybench.metrics"]  # a relative "from ..errors import"


def test_find_cycles_on_a_known_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e2"}, "e2": {"e"}}
    assert find_cycles(graph) == {("a", "b", "c"), ("e", "e2")}
    assert find_cycles({"a": {"b"}, "b": set()}) == set()


def test_no_import_cycle_in_the_package():
    cycles = find_cycles(import_graph())
    unexpected = sorted(cycles - ALLOWED_CYCLES)
    assert not unexpected, "import cycles: " + "; ".join(" -> ".join(c + (c[0],)) for c in unexpected)
    assert not ALLOWED_CYCLES - cycles, f"allowed cycles that no longer exist: {sorted(ALLOWED_CYCLES - cycles)}"
