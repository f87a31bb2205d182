"""The package's modules import each other without cycles (counting imports inside functions too).

The graph is built from the source with ``ast``, not by importing: an edge ``a -> b`` is any ``import``
statement in ``a`` (at module level or inside a function or class) that names our module ``b``. A relative
import is resolved against ``a``'s package; ``from pkg import name`` is an edge to ``pkg.name`` when that is
a module and to ``pkg`` otherwise. Importing a package also runs its ``__init__``, but that edge is left out
(``a.b.c`` does not count as importing ``a`` and ``a.b``): a package's ``__init__`` re-exporting its
submodules would otherwise make every import of a submodule a cycle. Modules without source in the tree
(the generated protobuf code) are left out too, as are imports under ``if TYPE_CHECKING:``, which never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "automtl_compiler"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``root`` (a package's file is its ``__init__``)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _base(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute module a (possibly relative) ``from ... import`` names."""
    if level == 0:
        return name or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    anchor = package[:len(package) - (level - 1)] if level > 1 else package
    return ".".join([*anchor, *([name] if name else [])])


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:``, which never run."""
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        found.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return found


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules that ``module`` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def add(target: str) -> None:
        if target in modules and target != module:     # generated modules (the protobuf code) have no source
            found.add(target)

    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, is_package, node.level, node.module)
            if base.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in modules else base)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of the package it imports."""
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (or a self-loop), each sorted (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(components)


def describe(component: list[str], graph: dict[str, set[str]]) -> str:
    """A component as its edges, e.g. ``a -> b, b -> a``."""
    members = set(component)
    return ", ".join(f"{a} -> {b}" for a in component for b in sorted(graph[a] & members))


def test_cycle_finder_finds_cycles_and_only_them():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}, "f": set()}
    assert find_cycles(graph) == [["a", "b", "c"], ["e"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_relative_and_from_imports_resolve(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "util.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .mod import thing\n")
    (pkg / "sub" / "mod.py").write_text("import os\nfrom .. import util\nfrom ..proto import pb2\n\ndef f():\n    from ..sub import other\n")
    (pkg / "sub" / "other.py").write_text(f"from {PACKAGE}.sub.mod import thing\nimport {PACKAGE}.util\n"
                                          "if TYPE_CHECKING:\n    from .. import sub\n")
    modules = module_files(pkg)
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert graph[f"{PACKAGE}.sub"] == {f"{PACKAGE}.sub.mod"}
    assert graph[f"{PACKAGE}.sub.mod"] == {f"{PACKAGE}.util", f"{PACKAGE}.sub.other"}
    assert graph[f"{PACKAGE}.sub.other"] == {f"{PACKAGE}.sub.mod", f"{PACKAGE}.util"}
    assert find_cycles(graph) == [[f"{PACKAGE}.sub.mod", f"{PACKAGE}.sub.other"]]


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 50 and f"{PACKAGE}.ir.graph" in graph[f"{PACKAGE}.ir"]
    cycles = find_cycles(graph)
    report = "\n".join(describe(c, graph) for c in cycles)
    assert not cycles, f"{len(cycles)} import cycle(s):\n{report}"


def test_importing_the_package_leaves_the_compiler_stack_unloaded():
    """torch._dynamo and triton cost ~150 MB of memory and seconds of start-up; nothing may import them eagerly
    (torch.compiler.disable and torch.utils.flop_counter both do)."""
    import subprocess
    import sys

    code = ("import sys, automtl_compiler, automtl_compiler.train.trainer, automtl_compiler.nn.compact; "
            "print(sorted(m for m in ('torch._dynamo', 'triton', 'torch._inductor') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout
