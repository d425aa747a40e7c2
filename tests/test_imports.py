"""The house's import rules, checked on the source (every import statement, module-level or inside a function).

- no import circle between hfpatch modules;
- imports point down the layers: apps -> hfpatch/__init__ -> patcher -> recipe -> techniques -> catalogue ->
  technique -> (primitives, arch, kernels, cache) -> compat, errors; nothing imports a layer above itself;
- technique families do not import each other (they meet only in a recipe);
- only hfpatch/compat.py imports transformers internals (anything below a top-level `transformers` name).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "hfpatch"

# Lower numbers sit lower in the house. A module may import its own layer or any layer below it.
LAYERS = [
    ("hfpatch.errors", 0),
    ("hfpatch.files", 0),  # atomic outputs; imports only errors
    ("hfpatch.compat", 1),
    ("hfpatch.primitives", 2),
    ("hfpatch.arch", 2),
    ("hfpatch.kernels", 2),
    ("hfpatch.cache", 2),
    ("hfpatch.technique", 3),
    ("hfpatch.catalogue", 4),
    ("hfpatch.techniques", 5),
    ("hfpatch.recipe", 6),
    ("hfpatch.patcher", 7),
    ("hfpatch", 8),  # the package __init__: public names only
    ("hfpatch.__main__", 9),
    ("hfpatch.apps", 9),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file; `from x import y` counts y when it is a module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                child = f"{target}.{alias.name}"
                found.append((child if child in known else target, node.lineno))
    return found


def _graph() -> dict[str, list[tuple[str, int]]]:
    modules = _modules()
    known = set(modules)
    return {name: [(t, line) for t, line in _imports(name, path, known) if t in known]
            for name, path in modules.items()}


def _layer(module: str) -> int:
    best, rank = "", None
    for prefix, level in LAYERS:
        matches = module == prefix or (prefix != "hfpatch" and module.startswith(prefix + "."))
        if matches and len(prefix) > len(best):
            best, rank = prefix, level
    assert rank is not None, f"{module} has no layer in tests/test_imports.py LAYERS; add it"
    return rank


def _cycles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target, _ in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or any(t == node for t, _ in graph[node]):
                components.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return components


def test_every_module_has_a_layer():
    for module in _modules():
        _layer(module)


def test_no_import_circle():
    assert _cycles(_graph()) == []


def test_imports_point_down_the_layers():
    upward = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)}) at line {line}"
        for module, targets in _graph().items()
        for target, line in targets
        if _layer(target) > _layer(module)
    ]
    assert upward == []


def test_technique_families_do_not_import_each_other():
    def family(module: str) -> str | None:
        parts = module.split(".")
        return parts[2] if len(parts) > 3 and parts[1] == "techniques" else None

    crossing = [
        f"{module} imports {target} at line {line}"
        for module, targets in _graph().items()
        for target, line in targets
        if family(module) and family(target) and family(module) != family(target)
    ]
    assert crossing == []


def test_only_compat_imports_transformers_internals():
    offenders = []
    for name, path in _modules().items():
        if name == "hfpatch.compat":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            modules = []
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                modules = [node.module or ""]
            offenders += [f"{name}:{node.lineno} imports {m}" for m in modules if m.startswith("transformers.")]
    assert offenders == []


@pytest.mark.parametrize("source, expected", [
    ({"a": [("b", 1)], "b": [("a", 2)]}, [["a", "b"]]),
    ({"a": [("b", 1)], "b": []}, []),
    ({"a": [("a", 1)]}, [["a"]]),
])
def test_cycle_finder_finds_circles(source, expected):
    assert _cycles(source) == expected
