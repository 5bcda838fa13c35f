"""The layout's guard (docs/internals.md, "Wings"): jqlora is a few wings whose imports run one way.

Every module's imports are read with `ast`: top-level and function-level ``import`` / ``from ... import``, importing a
module's parent packages (``import jqlora.adapters.load`` runs ``jqlora/adapters/__init__.py`` first), and module
dotted module names written as strings (lazy forwards such as `jqlora.planning`'s PEP 562 face, ``importlib.import_module``);
logger names are not imports. On that graph: no circle of any length, no import from a wing to one it may not use,
at most 12 loose modules at the top, no module over 500 lines, and a test folder for every wing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "jqlora"

# The wings, and the wings each may import (besides its own): the table in docs/internals.md.
MAY_IMPORT = {
    "quant": set(),
    "config": set(),
    "data": {"config"},
    "lora": {"quant"},
    "parallel": {"lora", "quant"},
    "models": {"lora", "quant"},
    "checkpoints": {"models", "parallel", "lora", "quant"},
    "adapters": {"checkpoints", "models", "parallel", "lora", "quant"},
    "training": {"models", "lora", "quant"},
    "planning": {"training", "models", "parallel", "lora", "quant", "config"},
    "evaluation": {"adapters", "checkpoints", "models", "parallel", "lora", "quant"},
    "run": {"evaluation", "planning", "training", "adapters", "checkpoints", "models", "parallel", "lora", "data", "quant", "config"},
}
TOP = "(top level)"  # the CLIs and `jqlora/__init__.py`: they may import every wing
MAX_LOOSE = 12
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The module that importing ``name`` (a module, or a name inside one) executes last."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _with_parents(target: str, importer: str) -> set[str]:
    """``target`` and the packages above it that importing it runs, leaving out the importer's own packages (already
    running) and ``jqlora`` itself (every module is inside it)."""
    out, name = {target}, target.rpartition(".")[0]
    while name and name != "jqlora":
        if not (importer == name or importer.startswith(name + ".")):
            out.add(name)
        name = name.rpartition(".")[0]
    return out


def _imports(module: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    logger_args = {id(node.args[0]) for node in ast.walk(tree) if isinstance(node, ast.Call) and node.args
                   and getattr(node.func, "attr", getattr(node.func, "id", None)) == "getLogger"}
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
            names += [f"{base}.{a.name}" for a in node.names]
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in MODULES and "." in node.value
              and id(node) not in logger_args):
            names.append(node.value)
    out: set[str] = set()
    for name in names:
        target = _resolve(name) if name.startswith("jqlora") else None
        if target is not None and target != module:
            out |= _with_parents(target, module)
    out.discard(module)
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def wing(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in MAY_IMPORT) else TOP


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_the_import_reader_sees_every_kind_of_import():
    """The graph holds a function-level import, a parent package run by a submodule import, and a lazy face's
    string; a logger name is not an import."""
    assert "jqlora.planning.aot" in GRAPH["jqlora.planning.remat"]
    assert "jqlora.adapters" in GRAPH["jqlora.run.loop"]  # `from jqlora.adapters import init_state`
    assert "jqlora.planning.memory" in GRAPH["jqlora.planning"]  # the PEP 562 face's table
    assert "jqlora.models.decode" in GRAPH["jqlora.run.samples"]  # imported inside a method
    assert "jqlora.train" not in GRAPH["jqlora.run.model"]  # logging.getLogger("jqlora.train")
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circles():
    assert _cycles(GRAPH) == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_one_way(module):
    own = wing(module)
    if own == TOP:
        return
    allowed = MAY_IMPORT[own] | {own}
    wrong = sorted(t for t in GRAPH[module] if wing(t) not in allowed)
    assert not wrong, f"{module} ({own}) imports {wrong}; {own} may import {sorted(MAY_IMPORT[own])}"


def test_the_wing_table_has_no_circle():
    assert _cycles({w: set(deps) for w, deps in MAY_IMPORT.items()}) == []


def test_few_loose_modules_at_the_top():
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(loose) <= MAX_LOOSE, loose
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(MAY_IMPORT)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_over_500_lines(module):
    n = len(MODULES[module].read_text().splitlines())
    assert n <= MAX_LINES, f"{MODULES[module].relative_to(REPO)}: {n} lines; cut it by concern"


def test_tests_mirror_the_wings():
    for w in MAY_IMPORT:
        assert sorted((REPO / "tests" / w).glob("test_*.py")), f"tests/{w}/ has no tests"
