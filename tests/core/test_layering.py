"""The package's layers depend one way (``docs/architecture.md``), checked on the source with ``ast``.

Bottom to top: ``core`` -> the methods (``prefix``, ``prompt``, ``lora``, ``ia3``; none imports
another) -> ``families`` -> ``checkpoint`` -> the top (``prefix_hooks/__init__.py`` and the
self-check). Every import counts: module level, inside functions, under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

import prefix_hooks

PACKAGE_ROOT = Path(prefix_hooks.__file__).parent

METHODS = ("prefix", "prompt", "lora", "ia3")
LAYER = {"core": 0, **dict.fromkeys(METHODS, 1), "families": 2, "checkpoint": 3}
TOP = 4
"""Everything else directly under ``prefix_hooks/`` (``__init__`` and the ``check`` package, the self-check)."""


def unit_of(module: str) -> str:
    """``prefix_hooks.lora.layers`` -> ``lora``; a top-level module is its own unit."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_of(unit: str) -> int:
    return LAYER.get(unit, TOP)


def imported_modules(path: Path, module: str, is_package: bool) -> set[str]:
    """Every ``prefix_hooks`` module ``path`` imports (absolute or relative), anywhere in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return {name for name in found if name == "prefix_hooks" or name.startswith("prefix_hooks.")}


def module_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (names that are not modules are dropped)."""
    files = {}
    for path in root.rglob("*.py"):
        parts = ["prefix_hooks", *path.relative_to(root).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        files[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return {
        module: {name for name in imported_modules(path, module, is_package) if name in files and name != module}
        for module, (path, is_package) in files.items()
    }


def unit_graph(graph: Mapping[str, Iterable[str]]) -> dict[str, set[str]]:
    """The module graph folded onto units (``core``, ``lora``, ...), without self-edges."""
    units: dict[str, set[str]] = {}
    for module, targets in graph.items():
        source = unit_of(module)
        units.setdefault(source, set()).update(unit_of(target) for target in targets if unit_of(target) != source)
    return units


def violations(graph: Mapping[str, Iterable[str]]) -> list[str]:
    """Imports that point up a layer or sideways between two methods, as ``a -> b`` lines."""
    found = []
    for module, targets in sorted(graph.items()):
        source = unit_of(module)
        for target in sorted(targets):
            unit = unit_of(target)
            if unit == source or layer_of(source) == TOP:
                continue
            if layer_of(unit) > layer_of(source) or (unit in METHODS and source in METHODS):
                found.append(f"{module} -> {target}")
    return found


def cycles(units: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The unit-level cycles (each strongly connected component of more than one unit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in units.get(node, ()):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
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

    for node in sorted(units):
        if node not in index:
            visit(node)
    return found


def test_no_import_points_up_a_layer_or_between_methods() -> None:
    assert violations(module_graph(PACKAGE_ROOT)) == []


def test_the_packages_form_no_cycle() -> None:
    assert cycles(unit_graph(module_graph(PACKAGE_ROOT))) == []


def test_every_package_is_placed_in_a_layer() -> None:
    packages = {path.parent.name for path in PACKAGE_ROOT.glob("*/__init__.py")}
    assert packages - set(LAYER) <= {"check"}, "a new subpackage needs its place in LAYER (and in docs/architecture.md)"


def test_the_core_imports_nothing_above_it() -> None:
    graph = module_graph(PACKAGE_ROOT)
    core = {module: targets for module, targets in graph.items() if unit_of(module) == "core"}
    assert core, "no core modules found"
    assert {unit_of(target) for targets in core.values() for target in targets} <= {"core"}


# --- the checker can fail ---------------------------------------------------------------------


def _write(root: Path, files: Mapping[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_cycle_back_into_core_is_caught(tmp_path: Path) -> None:
    root = _write(tmp_path, {
        "__init__.py": "",
        "core/__init__.py": "",
        "core/attachment.py": "def f():\n    from prefix_hooks.checkpoint import api  # late import still counts\n",
        "checkpoint/__init__.py": "",
        "checkpoint/api.py": "from prefix_hooks.core.attachment import f\n",
    })
    graph = module_graph(root)
    assert "prefix_hooks.core.attachment -> prefix_hooks.checkpoint.api" in violations(graph)
    assert cycles(unit_graph(graph)) == [["checkpoint", "core"]]


@pytest.mark.parametrize("statement", [
    "from prefix_hooks.ia3 import scaling",
    "from prefix_hooks.ia3.scaling import scaling_of",
    "import prefix_hooks.ia3.scaling",
    "from ..ia3 import scaling",
])
def test_a_method_importing_another_is_caught(tmp_path: Path, statement: str) -> None:
    root = _write(tmp_path, {
        "__init__.py": "",
        "lora/__init__.py": "",
        "lora/attachment.py": f"from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    {statement}\n",
        "ia3/__init__.py": "",
        "ia3/scaling.py": "",
    })
    found = violations(module_graph(root))
    assert "prefix_hooks.lora.attachment -> prefix_hooks.ia3.scaling" in found
    assert all(line.startswith("prefix_hooks.lora.attachment -> prefix_hooks.ia3") for line in found)
