"""The house rules, read from the source with `ast` (no import runs): the layers import one way, no module
cycle, no class over 200 lines, no function over 60.

Layers, top to bottom (a module may import its own layer or any layer below it, never one above):

    testing  ->  cli, python -m avgguf  ->  avgguf (public API)  ->  server  ->  eval  ->  runtime  ->  export
    ->  converters  ->  config  ->  gguf  ->  errors, atomic, version

Every import counts: module level, inside functions and under TYPE_CHECKING (a type-only import is still
coupling). `python tests/test_layers.py` prints each module's layer and the edges that break a rule.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = [
    ("testing", ["avgguf.testing"]),  # helpers of tests/ and bench/: nothing in avgguf imports them
    ("cli", ["avgguf.cli", "avgguf.__main__"]),
    ("api", ["avgguf", "avgguf.api"]),
    ("server", ["avgguf.server"]),
    ("eval", ["avgguf.eval"]),
    ("runtime", ["avgguf.runtime"]),
    ("export", ["avgguf.export"]),
    ("converters", ["avgguf.converters"]),
    ("config", ["avgguf.config"]),
    ("gguf", ["avgguf.gguf"]),
    ("base", ["avgguf.errors", "avgguf.atomic", "avgguf.version"]),
]
MAX_FUNCTION = 60
MAX_CLASS = 200


def modules() -> dict[str, Path]:
    """Module name -> file, as installed (converters/ is avgguf.converters: pyproject's package-dir)."""
    found = {}
    for base, prefix in ((ROOT / "avgguf", "avgguf"), (ROOT / "converters", "avgguf.converters")):
        for path in sorted(base.rglob("*.py")):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([prefix, *parts])] = path
    return found


def _package(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The avgguf modules `name` imports (a name imported from a package counts as its submodule when one
    exists, else as the package)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = _package(name, path).split(".")
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def layer(name: str) -> int:
    """Index of the layer `name` belongs to (the longest matching prefix wins)."""
    best, index = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, index = len(prefix), i
    assert index is not None, f"{name} is in no layer: add it to LAYERS"
    return index


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def upward_edges(edges: dict[str, set[str]]) -> list[str]:
    return [
        f"{a} ({LAYERS[layer(a)][0]}) imports {b} ({LAYERS[layer(b)][0]})"
        for a in sorted(edges)
        for b in sorted(edges[a])
        if layer(b) < layer(a)
    ]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def too_long() -> list[str]:
    """Functions over MAX_FUNCTION lines and classes over MAX_CLASS, with file:line."""
    out = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            limit = MAX_CLASS if isinstance(node, ast.ClassDef) else MAX_FUNCTION
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                lines = node.end_lineno - start + 1
                if lines > limit:
                    out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines (limit {limit})")
    return out


def test_every_module_has_a_layer():
    for name in modules():
        layer(name)


def test_no_module_imports_a_layer_above_it():
    assert upward_edges(graph()) == []


def test_no_import_cycle():
    assert cycles(graph()) == []


def test_no_class_over_200_lines_no_function_over_60():
    assert too_long() == []


def test_the_rules_can_fail():
    """The checkers see what they are for: an upward edge, a cycle."""
    assert upward_edges({"avgguf.gguf.adapter_format": {"avgguf.runtime.engine"}})
    assert cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b"]]
    assert layer("avgguf.cli.commands") < layer("avgguf.server.app") < layer("avgguf.errors")


if __name__ == "__main__":
    g = graph()
    for name in sorted(g):
        print(f"{LAYERS[layer(name)][0]:<10} {name}")
    problems = upward_edges(g) + [" <-> ".join(c) for c in cycles(g)] + too_long()
    print("\n".join(problems) or "all rules hold")
    sys.exit(1 if problems else 0)
