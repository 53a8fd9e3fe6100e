"""The package's import graph points down its floors, and has no cycles.

Floors are data here (docs/architecture.md draws them): a module may import modules of its own floor
or below, at the top of the file or inside a function alike. A new module gets a floor in FLOORS.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "slicelm"

# The folders' own __init__ files hold a docstring and nothing else.
FOLDERS = ("modeling", "core", "steps", "allocate", "layouts", "io", "recover", "measure")
FLOORS: dict[int, tuple[str, ...]] = {
    # 0. leaves: no slicelm imports of their own floor's concepts (the shipped modeling files import
    # nothing of slicelm at all)
    0: (
        *FOLDERS,
        "errors",
        "version",
        "lazy",
        "io.names",
        "modeling.modeling_slicelm",
        "modeling.configuration_decilm",
        "modeling.modeling_decilm",
        "core.pca",
        "recover.config",
        "recover.report",
    ),
    # 1. data and plumbing
    1: (
        "core.arch",
        "core.plan",
        "core.rotate",
        "core.meta",
        "core.devices",
        "core.offload",
        "core.resources",
        "core.calibration",
        "io.hub",
        "io.outputs",
        "io.fingerprint",
        "io.streaming_io",
        "config",
        "recover.parallel",
        "recover.checkpoints",
    ),
    # 2. mechanisms on one model: norms, MLP channels, statistics, the plain layout, data, loading; the
    # planning context (what planning knows of the model, read from its config on the meta device)
    2: (
        "io.memory",
        "steps.heads",
        "steps.blocks",
        "core.fuse",
        "steps.channels",
        "core.statistics",
        "core.bases",
        "layouts.plain",
        "io.data",
        "measure.perplexity",
        "measure.evaluation",
        "recover.losses",
        "recover.student",
        "recover.windows",
        "recover.teacher",
        "recover.loop",
        "allocate.context",
    ),
    # 3. folders; exact counts, budgets and the checks of a config before loading
    3: ("layouts.checkpoint", "layouts.decilm", "allocate.counting", "allocate.budget", "allocate.checks"),
    # 4. loading any model (sliced folders included) and doing: the executor, the structure-local path
    4: ("io.models", "steps.executor", "steps.local"),
    # 5-6. deciding: the measured allocator follows candidates with the executor; planning joins them; the
    # local tier's measured choice plans the rotation's uniform plan too (mixtures of experts)
    5: ("allocate.measured",),
    6: ("allocate.planning", "allocate.local"),
    # 7. front doors and workflows
    7: ("slicing", "streaming", "export", "recover.recovery", "measure.plots"),
    8: ("measure.sweep",),
    # 9. the command line and the package root
    9: ("cli", "__init__", "__main__"),
}
# Packages whose modules are one idea together: imports inside one of them are free.
UNITS = ("cli", "measure.evaluation")


def _unit(module: str) -> str:
    """The module, or the unit package (:data:`UNITS`) it belongs to."""
    return next((u for u in UNITS if module == u or module.startswith(u + ".")), module)


def _floor_of(module: str) -> int:
    for floor, names in FLOORS.items():
        if _unit(module) in names:
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
                package = node.module.removeprefix("slicelm.")
                names = [f"{package}.{a.name}" if f"{package}.{a.name}" in known else package for a in node.names]
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
            if _unit(target) == _unit(name):
                continue  # within one unit package
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
    found = _imports(SRC / "modeling" / shipped, set(_modules()))  # side by side: relative imports only
    assert found == set()
