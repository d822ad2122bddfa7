"""The package's modules import each other without cycles, at the top of each file: a
newcomer can move code without discovering an import order that only works by accident."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "python" / "soniq"
PROGRAMS = ("soniq.cli", "soniq.demos", "soniq.benchmarks")  # lazy imports keep `soniq --help` fast


def _modules() -> dict:
    mods = {}
    for f in ROOT.rglob("*.py"):
        parts = ("soniq",) + f.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = (f, parts[-1] == "__init__")
    return mods


def _target(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _edges(mods: dict, top_level_only: bool) -> dict:
    edges = {}
    for mod, (f, is_pkg) in mods.items():
        tree = ast.parse(f.read_text())
        nodes = tree.body if top_level_only else [n for n in ast.walk(tree)]
        out = set()
        for n in nodes:
            names = []
            if isinstance(n, ast.ImportFrom):
                t = _target(mod, is_pkg, n)
                names = [t] + [f"{t}.{a.name}" for a in n.names]
            elif isinstance(n, ast.Import):
                names = [a.name for a in n.names]
            for t in names:
                if t in mods and t not in ("soniq", mod) and not mod.startswith(t + "."):
                    out.add(t)
                    # importing a.b.c runs package a.b's __init__ first (unless mod lives in it)
                    parent = t.rsplit(".", 1)[0]
                    if parent in mods and parent != "soniq" and not (mod + ".").startswith(parent + "."):
                        out.add(parent)
        edges[mod] = out
    return edges


def test_no_import_cycles():
    mods = _modules()
    edges = _edges(mods, top_level_only=False)
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(mods):
        if m not in state:
            visit(m)


def test_library_imports_at_top_of_file():
    mods = _modules()
    top, every = _edges(mods, True), _edges(mods, False)
    late = {m: sorted(every[m] - top[m]) for m in mods
            if not m.startswith(PROGRAMS) and every[m] - top[m]}
    assert not late, f"soniq modules imported inside functions or below the top: {late}"
