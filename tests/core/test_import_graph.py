"""The engine's import graph has no loop: every module can be read from its dependencies up.

Imports inside functions count too (a function-local import is how a loop hides); imports under
``if TYPE_CHECKING:`` (annotations only, never executed) do not. The package's own ``__init__`` (which gathers
the public names of every module) is not a node.
"""

from __future__ import annotations

import ast
from pathlib import Path

import monoflow_core

PACKAGE = Path(monoflow_core.__file__).resolve().parent
ROOT = PACKAGE.parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The monoflow_core modules that ``path`` imports, at any depth of its code, TYPE_CHECKING blocks excluded."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    skipped: set[int] = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if _is_type_checking_block(node):
            skipped.update(id(child) for child in ast.walk(node) if child is not node)
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from . import x` may name a submodule x; otherwise the names live in the module `stem`.
            targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in modules else stem for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != "monoflow_core" and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    files = [p for p in PACKAGE.rglob("*.py")]
    modules = {_module_name(p) for p in files}
    return {_module_name(p): _imports(p, modules) for p in files if _module_name(p) != "monoflow_core"}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)) is not None:
            return found
    return None


def test_the_engine_has_no_import_loop():
    cycle = _cycle(_graph())
    assert cycle is None, "import loop: " + " -> ".join(cycle or [])


def test_the_finder_sees_a_function_local_loop():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen: set[str] = set()
    stack = [start]
    while stack:
        for nxt in graph.get(stack.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def test_checkpoints_do_not_depend_on_the_training_loop():
    graph = _graph()
    # The checkpoint package and every one of its modules, and whatever they import in turn.
    package = sorted(m for m in graph if m.startswith("monoflow_core.checkpoint."))
    reached = _reachable(graph, "monoflow_core.checkpoint")
    assert package and set(package) <= reached
    for module in ("monoflow_core.checkpoint", *package):
        assert "monoflow_core.training" not in _reachable(graph, module), module
    assert {"monoflow_core.config", "monoflow_core.flow", "monoflow_core.models"} <= reached
    assert "monoflow_core.checkpoint" in graph["monoflow_core.training"]
