"""The package's layers: every import runs downwards, and no module imports itself back.

The order (docs/design.md §2): the base modules (``errors``, ``atomic``, ``configs``, the
package root) <
``slides`` < ``features`` < ``data`` < ``models`` < ``training`` < ``ssl`` < ``heatmaps`` <
``pipeline`` < ``synth`` < the command line (``cli``, ``demo``). Imports inside functions count:
a lazy import still ties the layers together.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import milkit

PACKAGE_DIR = Path(milkit.__file__).parent

LAYERS: list[tuple[str, ...]] = [
    ("milkit", "milkit.errors", "milkit.atomic", "milkit.configs"),
    ("milkit.slides",),
    ("milkit.features",),
    ("milkit.data",),
    ("milkit.models",),
    ("milkit.training",),
    ("milkit.ssl",),
    ("milkit.heatmaps",),
    ("milkit.pipeline",),
    ("milkit.synth",),
    ("milkit.cli", "milkit.demo"),
]


def module_name(path: Path) -> str:
    """``milkit/a/b.py`` -> ``milkit.a.b``; a package's ``__init__.py`` -> the package."""
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _walk(node: ast.AST, *, typing_only: bool) -> Iterator[tuple[ast.AST, bool]]:
    """Every node below ``node`` with whether it sits under ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        inside = typing_only or _type_checking_block(node) and child in getattr(node, "body", [])
        yield child, inside
        yield from _walk(child, typing_only=inside)


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """The milkit modules a file imports, each with whether it is for type checking only."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node, typing_only in _walk(ast.parse(path.read_text()), typing_only=False):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [target]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        found += [(t, typing_only) for t in targets if t == "milkit" or t.startswith("milkit.")]
    return found


def layer_of(module: str) -> int:
    """Index of the layer ``module`` belongs to (its longest matching prefix)."""
    best, best_length = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or (prefix != "milkit" and module.startswith(prefix + "."))
            if matches and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer; add it to LAYERS in {__file__}.")
    return best


def import_graph(*, runtime_only: bool) -> dict[str, set[str]]:
    """Module -> the milkit modules it imports."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        graph[module_name(path)] = {
            target for target, typing_only in imports_of(path) if not (runtime_only and typing_only)
        }
    return graph


def test_every_module_belongs_to_a_layer() -> None:
    for module in import_graph(runtime_only=False):
        layer_of(module)


def test_imports_never_reach_a_higher_layer() -> None:
    upward = [
        f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
        for module, targets in import_graph(runtime_only=False).items()
        for target in sorted(targets)
        if target != "milkit" and layer_of(target) > layer_of(module)
    ]
    assert not upward, "imports that run upwards:\n" + "\n".join(upward)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (a module's own package ``__init__`` excluded), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if module.startswith(target + "."):
                continue  # a module reads its package's __init__: not a cycle between modules
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if target in graph and not state.get(target):
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if not state.get(module):
            found = visit(module)
            if found:
                return found
    return None


def test_no_import_cycle_at_run_time() -> None:
    cycle = _cycle(import_graph(runtime_only=True))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_checks_see_an_upward_import_and_a_cycle() -> None:
    assert layer_of("milkit.pipeline.tile") > layer_of("milkit.features.tile_file")
    assert layer_of("milkit.training.continual.run") == layer_of("milkit.training")
    assert _cycle({"milkit.a.x": {"milkit.a.y"}, "milkit.a.y": {"milkit.a.x"}}) == [
        "milkit.a.x",
        "milkit.a.y",
        "milkit.a.x",
    ]
    assert _cycle({"milkit.a.x": {"milkit.a"}, "milkit.a": {"milkit.a.x"}}) is None
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("milkit_other")
