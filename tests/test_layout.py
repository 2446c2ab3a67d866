"""The package's shape: imports (lazy ones too) form no cycle, and no stage imports another stage
(they meet through the store, the codes store and SAE directories). Imports for annotations
only (`if TYPE_CHECKING:`) run nothing and are not counted."""

import ast
from pathlib import Path

import saekit

PKG = Path(saekit.__file__).parent
STAGES = {"harvest", "train", "pursue", "eval", "dashboard"}


def _runtime_nodes(tree: ast.AST):
    """Every node but those under `if TYPE_CHECKING:`."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
            continue
        yield child
        yield from _runtime_nodes(child)


def _module_imports() -> dict[str, set[str]]:
    """saekit module -> the saekit modules it imports, anywhere in it."""
    graph = {}
    for f in PKG.glob("*.py"):
        name = f.stem
        deps = set()
        for node in _runtime_nodes(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("saekit"):
                parts = node.module.split(".")
                if len(parts) > 1:
                    deps.add(parts[1])
                else:  # from saekit import x
                    deps.update(a.name for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("saekit."))
        graph[name] = {d for d in deps if (PKG / f"{d}.py").exists() and d != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return path[path.index(d) :] + [d]
            if d not in state and (found := visit(d)):
                return found
        state[n] = 2
        path.pop()
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_module_level_imports_form_no_cycle():
    graph = _module_imports()
    assert {"sae", "sae_lens_io", "harvest", "generator"} <= set(graph)  # the parser sees the package
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_stage_imports_another_stage():
    graph = _module_imports()
    crossing = {(s, d) for s in STAGES for d in graph[s] if d in STAGES}
    assert not crossing
