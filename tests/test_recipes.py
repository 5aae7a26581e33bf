"""The YAML recipes ship inside the package: found by name, listed and copied by `mmlm recipes`, and `configs/`
in a checkout is the same files."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmlm.assets import copy_recipe, list_recipes, recipe_path, recipes_dir
from mmlm.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_recipes_live_in_the_package_and_configs_is_a_link_to_them():
    assert recipes_dir() == REPO / "src" / "mmlm" / "recipes"
    assert (REPO / "configs").is_symlink() and (REPO / "configs").resolve() == recipes_dir()
    names = {"clip-shapes", "clip-shapes-vit", "clip-fashion-mnist", "llava-shapes", "llava-smollm2"}
    assert names <= set(list_recipes())
    # package data: the wheel carries the recipes (tests/test_wheel.py installs one and checks)
    assert '"mmlm" = ["recipes/*.yaml", "csrc/*.c"]' in (REPO / "pyproject.toml").read_text()


def test_recipe_path_by_name():
    assert recipe_path("clip-shapes") == recipe_path("clip-shapes.yaml") == recipes_dir() / "clip-shapes.yaml"
    with pytest.raises(FileNotFoundError, match="known: .*clip-shapes"):
        recipe_path("nope")


def test_every_recipe_has_a_one_line_description():
    for name, description in list_recipes().items():
        assert description.endswith(".") and "\n" not in description and 20 < len(description) < 200, name


def test_mmlm_recipes_lists_and_copies(tmp_path, capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert main(["recipes", "list"]) == 0 and capsys.readouterr().out == out
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == list(list_recipes())
    assert any(line.startswith("clip-shapes ") and "shapes dataset" in line for line in lines)

    assert main(["recipes", "copy", "clip-shapes", "--out", str(tmp_path / "mine")]) == 0
    copy = tmp_path / "mine" / "clip-shapes.yaml"
    assert capsys.readouterr().out.strip() == str(copy)
    assert copy.read_bytes() == recipe_path("clip-shapes").read_bytes()
    # never overwrites an edited copy; unknown names say which exist
    copy.write_text("# mine\n")
    assert main(["recipes", "copy", "clip-shapes", "--out", str(tmp_path / "mine")]) == 2
    assert "exists" in capsys.readouterr().err and copy.read_text() == "# mine\n"
    assert main(["recipes", "copy", "nope"]) == 2
    assert "known:" in capsys.readouterr().err


def test_a_copied_recipe_loads_with_overrides(tmp_path):
    from mmlm.train.recipes import load_recipe

    path = copy_recipe("clip-shapes", tmp_path)
    cfg = load_recipe("clip", path, ["train.steps=7"])
    assert cfg.train.steps == 7 and cfg.model.vision.image_size == 64
