"""The one block walk: prune/ imports downward only (no circle: tests/test_imports.py), and every pass
walks the blocks through walk.py."""

import ast
from pathlib import Path

import atv_sparse

PACKAGE = Path(atv_sparse.__file__).parent


def _prune_imports() -> dict[str, set[str]]:
    """Module of prune/ -> the prune/ modules it imports, anywhere in the file (function bodies too)."""
    graph = {}
    for path in sorted((PACKAGE / "prune").glob("*.py")):
        name = path.stem
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                deps.add(node.module.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and node.level == 1:
                deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(
                    "atv_sparse.prune."):
                deps.add(node.module.split(".")[2])
        graph[name] = deps - {name}
    return graph


def test_walk_is_the_bottom_layer():
    graph = _prune_imports()
    assert graph["walk"] == set()
    for user in ("driver", "ablation_tokens", "tamp_tokens", "selectors"):
        assert "walk" in graph[user], user
    assert "driver" not in graph["ablation_tokens"] | graph["tamp_tokens"] | graph["selectors"]


def test_only_walk_captures_and_moves_blocks():
    """The loop is written once: no other pass builds a BlockRunner or captures block-0 inputs itself."""
    users = [PACKAGE / "prune" / f for f in ("driver.py", "ablation_tokens.py", "tamp_tokens.py")]
    users.append(PACKAGE / "analysis" / "mot.py")
    for path in users:
        text = path.read_text()
        assert "BlockRunner(" not in text and "_InputCatcher" not in text, path.name
        assert "block.to(" not in text, path.name
