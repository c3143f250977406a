"""The package's import graph: no cycles, and imports only go down the declared layer order.

docs/design.md draws the same order. Every `import`/`from ... import` of a pipeline module counts,
including the ones inside functions (a lazy import is still a dependency).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "pipeline"

# Lowest first. A module may import its own layer and the layers before it, never a later one.
LAYERS = (
    ("base", ("errors", "config", "fileio", "device", "distributed", "provenance", "figures")),
    ("data", ("data",)),
    ("cache", ("cache",)),
    ("extraction", ("extraction",)),
    ("decoder", ("decoder",)),
    ("training", ("training",)),
    ("inference", ("inference",)),
    ("reporting", ("reporting",)),
    ("serving", ("serving",)),
    ("app", ("cli", "demo", "__main__", "__init__")),
)


def layer_of(module: str) -> int:
    """pipeline.training.runs -> index of 'training' in LAYERS."""
    head = module.split(".")[1] if module.count(".") >= 1 else "__init__"
    for i, (_, names) in enumerate(LAYERS):
        if head in names:
            return i
    raise AssertionError(f"{module}: not in any layer of tests/test_layers.py (add it, and to docs/design.md)")


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1] if len(parts) > 1 else parts
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """The pipeline modules `path` imports (absolute names)."""
    me = module_name(path)
    is_pkg = path.name == "__init__.py"
    base = me.split(".") if is_pkg else me.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "pipeline")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[:len(base) - node.level + 1]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "pipeline":
                continue
            for a in node.names:   # `from pipeline.cache import readers` imports the module pipeline.cache.readers
                sub = f"{mod}.{a.name}"
                out.add(sub if _exists(sub) else mod)
    out.discard(me)
    return {m for m in out if m != "pipeline"}


def _exists(module: str) -> bool:
    p = PKG.parent / Path(*module.split("."))
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PKG.rglob("*.py")}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_follow_the_layer_order():
    bad = []
    for mod, deps in graph().items():
        for d in deps:
            if layer_of(d) > layer_of(mod):
                bad.append(f"{mod} ({LAYERS[layer_of(mod)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})")
    assert not bad, "imports against the layer order:\n" + "\n".join(sorted(bad))


def test_the_checks_catch_what_they_should(tmp_path):
    """The checker itself: a cycle and an upward import in a fake graph are found."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("pipeline.training.runs") > layer_of("pipeline.cache.readers")
    with pytest.raises(AssertionError):
        layer_of("pipeline.nowhere.thing")
