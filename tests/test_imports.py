"""The package's imports: no circle, and every import points down the layers of docs/design.md 2.

Circles: only imports executed when a module is imported count (module-level statements,
including those under a module-level ``if`` / ``try``). Layers: every import counts, those inside
functions too, since a deferred import is still a dependency. Each edge goes to the module named
(``from .x import y`` reaches ``x`` and, when ``y`` is a submodule, ``x.y``); parent packages are
not edges, since every module would otherwise reach ``atv_sparse/__init__.py``.
"""

import ast
import re
from pathlib import Path

import atv_sparse

PACKAGE = Path(atv_sparse.__file__).parent

# The units of the package (a subpackage, or a top-level module; "atv_sparse" is the package's own
# __init__: load, SparseLinear, __version__), lowest layer first. A module may import modules of
# its own unit and of the units of lower layers; an import of a unit in its own layer or a higher
# one is an error. Keep docs/design.md 2 in step.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors",),
    ("textfiles", "patterns", "cli", "reports"),
    ("formats",),
    ("models",),
    ("calib",),
    ("prune",),
    ("kernels",),
    ("ops",),
    ("nn",),
    ("atv_sparse", "vllm_plugin"),
    ("analysis", "tinybench"),
    ("evaluation",),
    ("convert", "evaluate", "import_ct", "verify"),
)

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


def _every_import(tree: ast.Module):
    """Every import statement of the module, wherever it is (functions and classes included)."""
    return (node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)))


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


def import_graph(everywhere: bool = False) -> dict[str, set[str]]:
    """Module -> the package's modules it imports at module level (``everywhere``: in any scope)."""
    names = module_names()
    graph = {}
    for name, path in names.items():
        is_package = path.name == "__init__.py"
        here = name.split(".") if is_package else name.split(".")[:-1]
        deps = set()
        imports = _every_import if everywhere else _module_level_imports
        for node in imports(ast.parse(path.read_text(), str(path))):
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
    assert "atv_sparse.evaluate" in graph and "atv_sparse.evaluation.scoring" in graph
    assert "atv_sparse.evaluation.metrics" in graph["atv_sparse.evaluation.scoring"]
    assert "atv_sparse.errors" in graph["atv_sparse.evaluation.metrics"]  # a relative "from ..errors import"


def test_find_cycles_on_a_known_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e2"}, "e2": {"e"}}
    assert find_cycles(graph) == {("a", "b", "c"), ("e", "e2")}
    assert find_cycles({"a": {"b"}, "b": set()}) == set()


def test_no_import_cycle_in_the_package():
    cycles = find_cycles(import_graph())
    unexpected = sorted(cycles - ALLOWED_CYCLES)
    assert not unexpected, "import cycles: " + "; ".join(" -> ".join(c + (c[0],)) for c in unexpected)
    assert not ALLOWED_CYCLES - cycles, f"allowed cycles that no longer exist: {sorted(ALLOWED_CYCLES - cycles)}"


def unit_of(module: str) -> str:
    """``atv_sparse.prune.driver`` -> ``prune``; ``atv_sparse.convert`` -> ``convert``; the package -> itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def upward_imports(graph: dict[str, set[str]], layers) -> list[str]:
    """Every import of a unit in the importer's own layer or a higher one, as "a -> b (unit layer i
    -> unit layer j)"."""
    layer = {unit: i for i, units in enumerate(layers) for unit in units}
    bad = []
    for module, deps in sorted(graph.items()):
        for dep in sorted(deps):
            a, b = unit_of(module), unit_of(dep)
            if a != b and layer[b] >= layer[a]:
                bad.append(f"{module} -> {dep} ({a} layer {layer[a]} -> {b} layer {layer[b]})")
    return bad


def test_layer_check_on_a_known_graph():
    layers = (("low",), ("mid", "side"), ("top",))
    graph = {"p.top.a": {"p.mid.x", "p.low"}, "p.mid.x": {"p.low", "p.mid.y"}, "p.mid.y": set(), "p.low": set()}
    assert upward_imports(graph, layers) == []
    graph["p.low"] = {"p.mid.x"}
    graph["p.side"] = {"p.mid.y"}
    assert upward_imports(graph, layers) == ["p.low -> p.mid.x (low layer 0 -> mid layer 1)",
                                             "p.side -> p.mid.y (side layer 1 -> mid layer 1)"]


def test_every_unit_has_one_layer():
    units = [unit for units in LAYERS for unit in units]
    assert len(units) == len(set(units))
    assert {unit_of(m) for m in module_names()} == set(units)


def test_imports_only_point_down():
    """Function-level imports included: calib never reaches the bench, prune never reaches calib's users."""
    graph = import_graph(everywhere=True)
    assert "atv_sparse.tinybench.tasks" in graph["atv_sparse.convert.cli"]  # an import inside run() counts
    bad = upward_imports(graph, LAYERS)
    assert not bad, "imports up the layers:\n" + "\n".join(bad)


def test_design_doc_lists_the_layers():
    design = (Path(__file__).resolve().parent.parent / "docs" / "design.md").read_text()
    listed = design.split("Layers, lowest first:", 1)[1].strip().split("\n\n", 1)[0]
    rows = [re.fullmatch(r"(\d+)\. (.*)", line) for line in listed.splitlines()]
    assert [int(row[1]) for row in rows] == list(range(1, len(LAYERS) + 1))
    assert [tuple(u.strip(" `") for u in row[2].split(",")) for row in rows] == list(LAYERS)
