"""The package structure the README promises: no import cycle between the project's modules,
qn_keras never importing Beam, pipeline or serving code, and model_dir never importing the
packages above it. Read from the source (every import statement, also inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("qn_keras", "serving", "pipeline", "qn_cli")


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


def _imports(path: Path, modules) -> set[str]:
    """Project modules ``path`` imports: ``from X import Y`` counts as X.Y when that is a
    module (X's ``__init__`` runs first, as for every submodule, and is not a dependency)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [s for s in subs if s in modules]
            if len(names) < len(subs):
                names.append(node.module)
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def _graph():
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_no_import_cycles():
    graph = _graph()
    state, cycles = {}, []

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(trail[trail.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_library_layers():
    graph = _graph()
    for name, imports in graph.items():
        if name.startswith("qn_keras"):
            assert not {
                i for i in imports if i.split(".")[0] in ("serving", "pipeline", "qn_cli")
            }, name
    above = ("qn_keras.training", "qn_keras.optimization", "qn_keras.tuning", "qn_keras.nemo")
    assert not [i for i in graph["qn_keras.model_dir"] if i.startswith(above)]
    assert graph["qn_keras.choices"] == set()  # imports nothing: cheap for the CLI and Beam
