"""Checks on the package's structure rather than its behaviour.

The lowbit-internal import graph must be acyclic. A cycle among module-level imports works only while its modules
happen to be imported in one order; a cycle closed by an import moved into a function body works, but only because
it was hidden there -- the layering is still wrong (``api -> engine -> init -> models -> checkpoint -> api`` was
such a cycle). So the graph is checked twice: module-level imports alone, and with the lowbit imports inside
functions added. Not counted: imports under ``if TYPE_CHECKING:`` (never run), and a deferred import between a
package and its own submodules (``lowbit.kernels`` imports its Triton modules only when CUDA is used; a module
reads ``lowbit.__version__``): a submodule is never imported without its package, so they are one unit.
Importing ``a.b.c`` runs the package ``a.b`` first, so that is an edge too.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "lowbit"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module, deferred: bool) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that can run: those at module level (also in module-level ``if``/``try`` blocks and
    class bodies) and, with ``deferred``, those in function bodies; never those under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) and not deferred:
            continue
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
        else:
            stack.extend(ast.iter_child_nodes(node))
    return found


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The lowbit modules an import statement runs: the named module (``from pkg import sub``: the submodule
    ``pkg.sub``) and the packages above it that are not already above ``module``."""
    if isinstance(node, ast.Import):
        named = {alias.name for alias in node.names}
    else:
        base = node.module or ""
        if node.level:
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        named = {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    above = set(_ancestors(module))  # already being imported whenever ``module`` runs
    runs = {name for name in named if name in known}
    runs |= {pkg for name in named for pkg in _ancestors(name) if pkg in known and pkg not in above}
    return runs - {module}


def _related(a: str, b: str) -> bool:
    """Whether one of the two modules is a package holding the other."""
    return a.startswith(b + ".") or b.startswith(a + ".")


def import_graph(deferred: bool = False) -> dict[str, set[str]]:
    """Module -> the lowbit modules it imports at module level (with ``deferred``: also inside functions, except
    between a package and its own submodules)."""
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        top = set().union(*(_targets(n, name, is_package, known) for n in _imports(tree, deferred=False)))
        later = set().union(*(_targets(n, name, is_package, known) for n in _imports(tree, deferred=deferred)))
        graph[name] = (top | {t for t in later - top if not _related(name, t)}) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None when the graph is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_graph_follows_how_python_runs_imports():
    source = """
from . import b
from .c import x
import lowbit.d
from lowbit import e
from lowbit.pkg2.f import y
if TYPE_CHECKING:
    from lowbit import g
def later():
    from lowbit import h
    from lowbit.pkg import b
"""
    tree = ast.parse(source)
    known = {"lowbit", "lowbit.pkg", "lowbit.pkg.b", "lowbit.pkg.c", "lowbit.d", "lowbit.pkg2", "lowbit.pkg2.f",
             "lowbit.g", "lowbit.h"}  # fmt: skip
    found = set().union(*(_targets(n, "lowbit.pkg.a", False, known) for n in _imports(tree, deferred=False)))
    # ``from lowbit import e`` (not a module) reads the package itself; ``lowbit.pkg2.f`` runs ``lowbit.pkg2``
    assert found == {"lowbit.pkg.b", "lowbit.pkg.c", "lowbit.d", "lowbit", "lowbit.pkg2", "lowbit.pkg2.f"}
    later = set().union(*(_targets(n, "lowbit.pkg.a", False, known) for n in _imports(tree, deferred=True)))
    assert later - found == {"lowbit.h"}


def test_module_level_imports_have_no_cycle():
    graph = import_graph()
    assert {"lowbit.api", "lowbit.init.base", "lowbit.checkpoint"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle among module-level imports: " + " -> ".join(cycle or [])


def test_no_cycle_is_hidden_in_a_function_body():
    cycle = find_cycle(import_graph(deferred=True))
    assert cycle is None, "import cycle closed by an import inside a function: " + " -> ".join(cycle or [])
