"""The package's import graph has no cycle, counting imports inside functions too.

A cycle that works only because one of its imports sits inside a function is still a
cycle: the modules cannot be read, tested or changed apart. Each edge is an explicit
import of a ``divattn`` module (``from .x import y`` is an edge to ``x``, or to ``x.y``
when that is a module); the implicit import of a module's parent packages is not one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import divattn

ROOT = Path(divattn.__file__).resolve().parent


def _modules() -> dict:
    """{dotted name: path} of every module in the package."""
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> set:
    """The divattn modules ``name`` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in modules else stem for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # "import divattn.ops.api as x" names a module; a.b.c -> a.b
                target = target.rpartition(".")[0]
            if target.startswith("divattn") and target != name:
                out.add(target)
    return out


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def import_graph() -> dict:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    # divattn.ops.functions imports the Triton module only inside a function
    assert any(m.startswith("divattn.ops.triton") for m in graph["divattn.ops.functions"])


def test_no_import_cycle():
    cycles = _cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_kernels_report_does_not_import_the_benchmarks():
    graph = import_graph()
    upward = {m: sorted(t for t in deps if t.startswith("divattn.bench"))
              for m, deps in graph.items() if m.startswith("divattn.kernels_report")}
    assert not any(upward.values()), upward
