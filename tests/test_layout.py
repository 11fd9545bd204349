"""The package's layout shows its architecture: no import cycles, no borrowed private names,
a heart that fits on one screen, and an error tree drawn in full."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import charter
from charter.errors import CharterError
from charter.pipeline import run

PACKAGE = Path(charter.__file__).parent
SKIP = ("charter.migrations", "charter.demo.migrations")


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(relative.parts).removesuffix(".__init__")
        if not name.startswith(SKIP):
            found[name] = ast.parse(path.read_text(), str(path))
    return found


def _is_package(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()


def imports(name: str, tree: ast.Module, *, typing: bool = False) -> list[tuple[str, str]]:
    """(module, imported name) pairs; those under ``if TYPE_CHECKING`` only with ``typing``."""
    package = name if _is_package(name) else name.rpartition(".")[0]
    pairs: list[tuple[str, str]] = []

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                if typing:
                    visit(node.body)
                continue
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                module = node.module or ""
                target = (f"{base}.{module}" if module else base) if node.level else module
                pairs.extend((target, alias.name) for alias in node.names)
            elif isinstance(node, ast.Import):
                pairs.extend((alias.name, "") for alias in node.names)
            for field in ("body", "orelse", "finalbody", "handlers"):
                inner = getattr(node, field, None)
                if isinstance(inner, list) and not isinstance(node, ast.If | ast.FunctionDef):
                    visit(inner)

    visit(tree.body)
    return pairs


def test_no_import_cycles_between_charters_modules_not_even_for_type_checking():
    trees = modules()
    graph: dict[str, set[str]] = {name: set() for name in trees}
    for name, tree in trees.items():
        for module, imported in imports(name, tree, typing=True):
            for candidate in (f"{module}.{imported}", module):
                if candidate in trees and candidate != name:
                    graph[name].add(candidate)
                    break
    # Tarjan's strongly connected components: a cycle is a component of two or more.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            # A package and the submodules it re-exports are one unit, not a cycle.
            if len({m for m in component if m not in trees or not _is_package(m)}) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            connect(node)
    assert [] == cycles


def test_no_module_imports_another_modules_private_names():
    borrowed = [
        f"{name}: {module}.{imported}"
        for name, tree in modules().items()
        for module, imported in imports(name, tree, typing=True)
        if module.startswith("charter") and imported.startswith("_") and imported != "__version__"
    ]
    assert [] == borrowed


@pytest.mark.parametrize("function", [run.run, run.transact])
def test_the_heart_of_the_gate_fits_on_one_screen(function):
    lines, _ = inspect.getsourcelines(function)
    assert len(lines) <= 50


def test_the_errors_docstring_draws_every_public_error():
    for module in pkgutil.walk_packages(charter.__path__, "charter."):
        if not module.name.startswith(SKIP):
            importlib.import_module(module.name)

    def public(cls: type) -> list[type]:
        found = []
        for sub in cls.__subclasses__():
            if sub.__module__.startswith("charter") and not sub.__name__.startswith("_"):
                found.append(sub)
            found.extend(public(sub))
        return found

    doc = importlib.import_module("charter.errors").__doc__ or ""
    missing = [cls.__name__ for cls in public(CharterError) if f" {cls.__name__} " not in doc]
    assert [] == missing
