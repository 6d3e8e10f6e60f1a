"""The package's shape, read from its source with `ast`: imports form no cycle, layers import only downwards, and
every stage's options are defined once (an options dataclass) and reach the CLI and the API from there."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffstore"
# The ground and the store know nothing of the stages; stages never call back into the API or the CLI.
LOWER = ("errors", "key", "noise", "options", "device", "progress", "plots", "scale", "stream", "blocks", "preprocess",
         "datasets", "store", "models")
STAGES = ("extract", "probe", "cka", "finetune", "repfusion")
TOP = ("api", "cli")


def modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        rel = f.relative_to(PACKAGE.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> modules it imports (anywhere in the file, lazy imports inside functions included), each resolved
    to the deepest module of the package that exists."""
    mods = modules()
    graph = {m: set() for m in mods}
    for m, f in mods.items():
        package = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
                prefix = ".".join(p for p in (base, node.module or "") if p)
                names = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != m and name != "diffstore":
                    graph[m].add(name)
    return graph


def related(a: str, b: str) -> bool:
    """A package and its own submodules (importing a submodule runs its package's __init__)."""
    return a.startswith(b + ".") or b.startswith(a + ".")


def layer_of(module: str) -> str:
    first = module.split(".")[1] if module.count(".") else ""
    return "lower" if first in LOWER else "stage" if first in STAGES else "top" if first in TOP else "other"


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    edges = {m: {t for t in ts if not related(m, t)} for m, ts in graph.items()}
    cycles = []
    for start in edges:  # a path back to `start` through other modules is a cycle
        stack, seen = [(t, [start, t]) for t in edges[start]], set()
        while stack:
            node, path = stack.pop()
            if node == start:
                cycles.append(" -> ".join(path))
                break
            if node in seen:
                continue
            seen.add(node)
            stack += [(t, path + [t]) for t in edges.get(node, ())]
    assert not cycles, "import cycles:\n" + "\n".join(sorted(cycles)[:10])


def test_imports_run_only_downwards():
    upward = []
    for m, targets in import_graph().items():
        for t in targets:
            if layer_of(m) == "lower" and layer_of(t) in ("stage", "top"):
                upward.append(f"{m} -> {t}")
            if layer_of(m) == "stage" and layer_of(t) == "top":
                upward.append(f"{m} -> {t}")
    assert not upward, "imports from a lower layer into a stage, or from a stage into api/cli:\n" + "\n".join(upward)


@pytest.mark.parametrize("package", ["extract", "probe", "cka", "finetune"])
def test_each_stage_defines_its_options_once(package):
    """The stage's options class lives in <stage>/options.py; cli.py and api.py spell out no option of it."""
    import dataclasses
    import importlib

    options = importlib.import_module(f"diffstore.{package}.options")
    cls = next(v for k, v in vars(options).items() if k.endswith("Options") and dataclasses.is_dataclass(v)
               and v.__module__ == options.__name__)
    cli = (PACKAGE / "cli.py").read_text()
    for f in dataclasses.fields(cls):
        assert f.metadata["help"] not in cli, f"{package} option {f.name}: its help text is repeated in cli.py"
