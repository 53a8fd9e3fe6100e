"""The package's import graph points down its floors, and has no cycles.

Floors are data here (docs/architecture.md draws them): a module may import modules of its own floor
or below, at the top of the file or inside a function alike. A new module gets a floor in FLOORS.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "slicelm"

FLOORS: dict[int, tuple[str, ...]] = {
    # 0. leaves: no slicelm imports of their own floor's concepts (the shipped modeling file imports
    # nothing of slicelm at all)
    0: ("errors", "version", "modeling_slicelm", "configuration_decilm", "modeling_decilm", "pca"),
    # 1. data and plumbing
    1: (
        "arch",
        "plan",
        "rotate",
        "meta",
        "hub",
        "devices",
        "outputs",
        "offload",
        "resources",
        "fingerprint",
        "streaming_io",
        "calibration",
        "config",
        "parallel",
    ),
    # 2. mechanisms on one model: norms, MLP channels, statistics, the plain layout, data, loading
    2: (
        "memory",
        "heads",
        "blocks",
        "fuse",
        "channels",
        "statistics",
        "bases",
        "plain",
        "data",
        "perplexity",
        "evaluation",
    ),
    # 3. folders and budgets
    3: ("checkpoint", "decilm", "budget"),
    # 4. loading any model (sliced folders included) and doing: the executor, the structure-local path
    4: ("models", "executor", "local"),
    # 5-6. deciding: the measured allocator follows candidates with the executor; planning joins them
    5: ("measured",),
    6: ("planning",),
    # 7. front doors and workflows
    7: ("slicing", "streaming", "export", "recovery", "plots"),
    8: ("sweep",),
    # 9. the command line and the package root
    9: ("cli", "__init__", "__main__"),
}


def _floor_of(module: str) -> int:
    head = module.split(".")[0]
    for floor, names in FLOORS.items():
        if head in names:
            return floor
    raise AssertionError(f"slicelm.{module} has no floor in tests/test_imports.py FLOORS")


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 1 else ".".join(parts)
        out[name] = path
    return out


def _imports(path: Path, known: set[str]) -> set[str]:
    """slicelm modules imported anywhere in the file (the package root counts as ``__init__``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "slicelm":
                names = [a.name if a.name in known else "__init__" for a in node.names]
            elif node.module.startswith("slicelm."):
                names = [node.module.removeprefix("slicelm.")]
        elif isinstance(node, ast.Import):
            names = [a.name.removeprefix("slicelm.") for a in node.names if a.name.startswith("slicelm.")]
            names += ["__init__" for a in node.names if a.name == "slicelm"]
        found.update(names)
    return found


def test_every_import_points_down_the_floors():
    modules = _modules()
    known = set(modules)
    upward = []
    for name, path in modules.items():
        mine = _floor_of(name)
        for target in _imports(path, known):
            if target.split(".")[0] == name.split(".")[0]:
                continue  # within one subpackage
            if _floor_of(target) > mine:
                upward.append(f"{name} (floor {mine}) imports {target} (floor {_floor_of(target)})")
    assert not upward, "\n".join(sorted(upward))


def test_no_cycles_between_modules():
    modules = _modules()
    known = set(modules)
    graph = {m: {t for t in _imports(p, known) if t in known and t != m} for m, p in modules.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif not state.get(nxt):
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if not state.get(module):
            visit(module, [])
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("shipped", ["modeling_slicelm.py", "modeling_decilm.py", "configuration_decilm.py"])
def test_the_shipped_modeling_files_import_nothing_of_slicelm(shipped):
    found = _imports(SRC / shipped, set(_modules())) - {"configuration_decilm"}  # shipped side by side
    assert found == set()
