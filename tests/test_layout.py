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


def _node(dotted: str) -> str | None:
    """The module a dotted name under saekit runs: "store.reader", "sae" (a package: its __init__)."""
    path = PKG.joinpath(*dotted.split("."))
    return dotted if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file() else None


def _module_names() -> dict[str, Path]:
    """Every saekit module by dotted name under saekit ("pursue", "store.reader", "store" for its __init__)."""
    out = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(PKG).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name:
            out[name] = f
    return out


def _module_imports() -> dict[str, set[str]]:
    """saekit module -> the saekit modules it imports, anywhere in it. Importing `a.b` from outside
    the package `a` also runs `a`'s __init__, so that counts as importing `a` too."""
    graph = {}
    for name, f in _module_names().items():
        targets = set()
        for node in _runtime_nodes(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("saekit"):
                base = node.module.split(".")[1:]
                for a in node.names:  # from saekit.a import b: the module a.b, or a's own name b
                    targets.add(_node(".".join([*base, a.name])) or _node(".".join(base)) or "")
            elif isinstance(node, ast.Import):
                targets.update(
                    _node(".".join(a.name.split(".")[1:])) or "" for a in node.names if a.name.startswith("saekit.")
                )
        deps = set()
        for t in targets - {"", name}:
            deps.add(t)
            pkg = t.split(".")[0]
            if "." in t and not (name == pkg or name.startswith(pkg + ".")):
                deps.add(pkg)  # its package's __init__ runs first
        graph[name] = deps - {name}
    return graph


def _stage(module: str) -> str | None:
    top = module.split(".")[0]
    return top if top in STAGES else None


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
    assert {"sae", "sae.lens_io", "harvest", "harvest.generator", "store.reader"} <= set(graph)  # it sees the package
    assert "store" in graph["store.reader"] or "store" in graph["codes"]  # a package's __init__ counts
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_stage_imports_another_stage():
    graph = _module_imports()
    crossing = {(m, d) for m, deps in graph.items() for d in deps if _stage(m) and _stage(d) not in (None, _stage(m))}
    assert not crossing


def _lazy_imports(tree: ast.AST, in_function: bool = False):
    """Line numbers of every import inside a function, outside `if TYPE_CHECKING:`."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)) and in_function:
            yield child.lineno
        yield from _lazy_imports(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))


def test_each_lazy_import_says_why():
    """An import inside a function costs its caller nothing at `saekit --help`, but hides a
    dependency: each one says why it is lazy (a comment on its line, or on the line above)."""
    silent, seen = [], 0
    for f in _module_names().values():
        lines = f.read_text().splitlines()
        for n in _lazy_imports(ast.parse("\n".join(lines))):
            seen += 1
            above = lines[n - 2].strip() if n >= 2 else ""
            if "#" not in lines[n - 1] and not above.startswith("#"):
                silent.append(f"saekit/{f.relative_to(PKG)}:{n}: {lines[n - 1].strip()}")
    assert seen > 10  # the walker finds them (zarr, sae-lens, transformer-lens, matplotlib, ...)
    assert not silent, "\n".join(silent)
