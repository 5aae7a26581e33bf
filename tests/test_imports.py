"""The shape of mmlm's imports: no cycles, no arrows from a lower layer to a higher one, no private names
taken from another module, every module importable, and `import mmlm` doing no work.

The graph is read from the source with `ast`, so a function-level (lazy) import is an edge like any other: a
cycle hidden inside a function is still a cycle. Importing `a.b.c` also runs the packages above it; those
implicit edges are left out (every module would otherwise "import" its package's `__init__`).
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import mmlm

ROOT = Path(mmlm.__file__).resolve().parent

# Bottom to top: a module may import from its own layer (without a cycle) or from a layer below, never above.
# A new top-level module or package goes in the lowest layer its imports allow.
LAYERS = [
    ["config", "diffusion_config", "assets", "report", "native"],  # configs, file lookup, figures, the C loops
    ["models", "tokenizer", "data", "quant", "weights", "schedulers", "devices"],  # the model code, inputs, weights on disk, device choice
    ["checkpoint", "generation", "image_generation"],  # mmlm's own checkpoint format; decoding
    ["distributed", "convert"],  # process groups (train/ and eval/ both use them); other formats <-> mmlm
    ["formats"],  # opens and writes every format
    ["mmlm", "chat", "eval"],  # the public facade (mmlm/__init__), chat, evaluation
    ["train"],
    ["serve", "bench_common", "bench", "bench_models", "bench_generation", "quickstart", "quickstart_llava",
     "quickstart_generation", "plan"],
    ["cli", "__main__"],
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
# packages a module may need only for an optional feature (extras `serve`, `interop`)
OPTIONAL = {"fastapi", "starlette", "pydantic", "uvicorn", "httpx", "gguf", "transformers"}


def _modules() -> dict[str, Path]:
    """Every module under src/mmlm by dotted name (a package by its `__init__.py`)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ("mmlm",) + path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, str, int]]:
    """(imported mmlm module, the name taken from it or "", line) for every import in the file, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == "mmlm"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "mmlm":
                continue
            for a in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{source}.{a.name}"
                found.append((sub, "", node.lineno) if sub in MODULES else (source, a.name, node.lineno))
    return found


def _owner(dotted: str) -> str:
    """The module that `dotted` names (or the nearest enclosing one)."""
    while dotted not in MODULES and "." in dotted:
        dotted = dotted.rpartition(".")[0]
    return dotted


def _graph() -> dict[str, set[str]]:
    return {name: {_owner(m) for m, _, _ in _imports(name, path)} - {name} for name, path in MODULES.items()}


def _component(module: str) -> str:
    return "mmlm" if module == "mmlm" else module.split(".")[1]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) per strongly connected group of modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for group in groups:  # walk inside the group from its first member until a module repeats
        path = [min(group)]
        while True:
            nxt = min(w for w in graph[path[-1]] if w in group)
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
                break
            path.append(nxt)
    return cycles


def test_the_graph_sees_every_kind_of_import():
    graph = _graph()
    assert "mmlm.formats" in graph["mmlm"]  # a function-level `from .formats import load`
    assert "mmlm.distributed" in graph["mmlm.train.loop"]  # `from .. import distributed`
    assert "mmlm.train.recipes" in graph["mmlm.cli"]  # a lazy import inside a command function
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_arrow_from_a_lower_layer_to_a_higher_one():
    unplaced = sorted({_component(m) for m in MODULES} - set(LAYER))
    assert not unplaced, f"put these in a layer of tests/test_imports.py LAYERS: {unplaced}"
    upward = [f"{a} (layer {LAYER[_component(a)]}) imports {b} (layer {LAYER[_component(b)]})"
              for a, targets in sorted(_graph().items()) for b in sorted(targets)
              if LAYER[_component(a)] < LAYER[_component(b)]]
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_no_private_names_from_other_modules():
    taken = [f"{path.relative_to(ROOT.parent)}:{line}: from {source} import {imported}"
             for name, path in MODULES.items() for source, imported, line in _imports(name, path)
             if imported.startswith("_") and not imported.startswith("__") and _owner(source) != name]
    assert not taken, "private names imported across modules (make them public where they live):\n" + "\n".join(taken)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in OPTIONAL:
            pytest.skip(f"{name} needs the optional package {e.name}")
        raise


def test_importing_mmlm_does_no_work():
    """`import mmlm` (and the CLI module behind `mmlm --help`) loads no model library, server or plotting
    package: they are imported where they are used."""
    heavy = ["torch", "numpy", "transformers", "fastapi", "uvicorn", "matplotlib", "gguf", "PIL", "tokenizers"]
    code = ("import sys, mmlm, mmlm.cli; "
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"import mmlm loaded {out}"
