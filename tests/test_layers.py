"""The import graph of src/fcnseg (ast, imports inside functions included) runs one way, from the ground up.

Layers, lowest first; a module may import its own layer (no cycle) or any layer below, never one above.
models/ and data/ share a layer and do not import each other. docs/ARCHITECTURE.md shows the table that
``render_table()`` prints: python -c "import sys; sys.path.insert(0, 'tests'); import test_layers as t; print(t.render_table())"
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "fcnseg"

#: layer name -> module prefixes in it, lowest layer first (``fcnseg/__init__.py``, the public facade, is on top)
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("ground", ("fcnseg.errors", "fcnseg.version")),
    ("files and machine", ("fcnseg.files", "fcnseg.hardware", "fcnseg.modes")),
    ("record", ("fcnseg.registry", "fcnseg.record", "fcnseg.config")),
    ("models and data", ("fcnseg.models", "fcnseg.data")),
    ("weights", ("fcnseg.weights",)),
    ("inference", ("fcnseg.inference",)),
    ("evaluation", ("fcnseg.evaluation",)),
    ("train", ("fcnseg.train",)),
    ("serve", ("fcnseg.serve",)),
    ("cli", ("fcnseg.cli", "fcnseg.__main__")),
    ("facade", ("fcnseg",)),
]
#: packages on one layer that must not import each other
SIBLINGS = {"fcnseg.models": "fcnseg.data", "fcnseg.data": "fcnseg.models"}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def imports(name: str, path: Path, is_pkg: bool, known: dict) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every fcnseg import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.split(".")[0] == "fcnseg"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "fcnseg":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.append((sub, None) if sub in known else (target, a.name))
    out = []
    for target, imported in found:
        while target not in known and "." in target:
            target = target.rsplit(".", 1)[0]
        if target != name:
            out.append((target, imported))
    return out


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{module} is in no layer: add it to LAYERS"
    return rank


def graph() -> dict[str, list[tuple[str, str | None]]]:
    known = modules()
    return {name: imports(name, path, is_pkg, known) for name, (path, is_pkg) in known.items()}


def upward(g) -> list[str]:
    bad = []
    for m, targets in g.items():
        for t, _ in targets:
            if layer_of(t) > layer_of(m) or t == "fcnseg":
                bad.append(f"{m} -> {t}")
            for pkg, other in SIBLINGS.items():
                if m.startswith(pkg + ".") or m == pkg:
                    if t == other or t.startswith(other + "."):
                        bad.append(f"{m} -> {t} (sibling)")
    return bad


def cycles(g) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w, _ in g.get(v, ()):
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

    for v in g:
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    for m in modules():
        layer_of(m)


def test_no_import_runs_against_the_layers():
    assert upward(graph()) == []


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_no_private_name_is_imported_across_modules():
    private = [f"{m} imports {n} from {t}" for m, ts in graph().items() for t, n in ts
               if n and n.startswith("_") and not n.startswith("__")]
    assert private == []


def test_no_module_over_500_lines_and_no_function_over_60():
    long_modules = [m for m, (p, _) in modules().items()
                    if len(p.read_text().splitlines()) > MAX_MODULE_LINES]
    long_functions = []
    for m, (p, _) in modules().items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{m}.{node.name}")
    assert long_modules == [], f"over {MAX_MODULE_LINES} lines: split them"
    assert long_functions == [], f"over {MAX_FUNCTION_LINES} lines: break them into named steps"


@pytest.mark.parametrize("edge, why", [
    ("fcnseg.models.fcn -> fcnseg.train.engine", "models never import train"),
    ("fcnseg.data.base -> fcnseg.weights.checkpoint", "data never imports checkpoint loading"),
    ("fcnseg.weights.checkpoint -> fcnseg.inference.segmenter.optimize", "weights sit below inference"),
])
def test_the_check_catches_an_upward_import(edge, why):
    src, dst = edge.split(" -> ")
    g = graph()
    g[src] = g[src] + [(dst, None)]
    assert f"{src} -> {dst}" in upward(g), why


def test_the_check_catches_a_cycle():
    g = graph()
    g["fcnseg.files"] = g["fcnseg.files"] + [("fcnseg.modes", None)]
    g["fcnseg.modes"] = g["fcnseg.modes"] + [("fcnseg.files", None)]
    assert ["fcnseg.files", "fcnseg.modes"] in cycles(g)


def render_table() -> str:
    """The layer table of docs/ARCHITECTURE.md, from ``LAYERS`` and the modules found."""
    known = sorted(modules())
    rows = ["| layer | modules |", "|---|---|"]
    for i, (name, _) in reversed(list(enumerate(LAYERS))):
        mods = [m for m in known if layer_of(m) == i]
        rows.append(f"| {i} {name} | {', '.join(f'`{m}`' for m in mods)} |")
    return "\n".join(rows) + "\n"


def test_architecture_doc_shows_the_current_layers():
    doc = (SRC.parent / "docs" / "ARCHITECTURE.md").read_text()
    assert render_table() in doc, "the layer table is stale: paste render_table() (see the module docstring)"


def test_architecture_doc_lists_every_module():
    doc = (SRC.parent / "docs" / "ARCHITECTURE.md").read_text()
    listing = doc[doc.index("## Modules"):]
    missing = [m for m, (path, is_pkg) in modules().items()
               if not is_pkg and not m.startswith("fcnseg.cli.") and f"{path.name}" not in listing]
    assert missing == []
