"""The package layout: a shared core, analysis on top of it, distillation on top of both.

The import graph of every module of ``attnprobe`` and ``deltadistill`` (every import statement,
also the ones inside functions) must have no upward edge (core → attnprobe → deltadistill, never
the other way) and no cycle. Family-specific knowledge lives in the family adapters only.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("attnprobe", "deltadistill")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Internal modules that ``name`` imports (module-level and inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                targets.append(full if full in known else base)
        for t in targets:
            while t and t not in known and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in known and t != name:
                out.add(t)
    return out


def _layer(module: str) -> int:
    if module == "attnprobe.core" or module.startswith("attnprobe.core."):
        return 0
    return 1 if module.split(".")[0] == "attnprobe" else 2


LAYER_NAMES = {0: "attnprobe.core", 1: "attnprobe", 2: "deltadistill"}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def test_graph_is_not_empty(graph):
    assert "attnprobe.core.family" in graph and "deltadistill.train" in graph
    assert "attnprobe.core.family" in graph["attnprobe.capture"]  # the parser sees real edges
    assert "attnprobe.core.registry" in graph["deltadistill.trainer"]  # ...also inside functions


def test_no_upward_import(graph):
    upward = [f"{src} ({LAYER_NAMES[_layer(src)]}) imports {dst} ({LAYER_NAMES[_layer(dst)]})"
              for src, dsts in graph.items() for dst in dsts if _layer(dst) > _layer(src)]
    assert not upward, "imports against the layering:\n" + "\n".join(sorted(upward))


def test_no_import_cycle(graph):
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_modules_stay_small():
    big = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > 420}
    assert not big, f"modules over ~400 lines: {big}"


def test_family_knowledge_lives_in_the_adapters():
    """No module outside attnprobe/core/families names a denoiser class or branches on a family name."""
    from attnprobe.core.family import families

    classes = {c for f in families() for c in f.denoiser_classes}
    names = {f.name for f in families()}
    pattern = re.compile(r"(\.name|family|arch)\s*(==|!=|in)\s*[\(\[]?\s*[\"'](%s)[\"']" % "|".join(map(re.escape, names)))
    offenders = []
    for name, path in _modules().items():
        if name.startswith(("attnprobe.core.families", "attnprobe.demo")):  # the demo model is a PixArt by design
            continue
        text = path.read_text(encoding="utf-8")
        offenders += [f"{name}: names {c}" for c in classes if c in text]
        offenders += [f"{name}: branches on {m.group(0)!r}" for m in pattern.finditer(text)]
    assert not offenders, "\n".join(offenders)
