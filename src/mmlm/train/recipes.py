"""The one recipe layer of `mmlm train`: a YAML recipe and dotted overrides -> a typed run config, for every kind.

    cfg = load_recipe("clip", recipe_path("clip-shapes"), ["train.lr=1e-3"])
    KINDS["clip"].train(cfg, "runs/clip")

A recipe is a YAML mapping laid over the kind's defaults (its run config's own), strictly: a field the run
config does not have is an error that names it. How the pieces combine:
- `model.preset` starts the model from a named architecture (the other `model` keys then change it); given
  on the command line, it replaces the recipe's whole `model` section;
- a mapping whose `kind` differs from the default's replaces it instead of merging into it (another tower
  type has other fields);
- `stage2:` holds the fields that change in stage 2, laid over the recipe when `stage` is 2;
- dotted overrides (`train.lr=1e-3`) apply last, and again after `stage2:`: the command line always wins.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from ..config import CLIPConfig, apply_overrides, clip_preset, from_dict, to_dict
from .clip_run import train_clip
from .clip_task import ClipRunConfig
from .diffusion_task import DiffusionRunConfig, train_diffusion
from .llava_run import train_llava
from .llava_task import LlavaRunConfig
from .vae_task import VAERunConfig, train_vae


@dataclass(frozen=True)
class RecipeKind:
    """What `mmlm train KIND` needs: the run config a recipe fills, the function that trains it, and (where
    the kind has presets) the model config a recipe starts from, by `model.preset` name (None: no preset)."""

    run_config: type
    train: Callable[..., dict[str, Any]]  # (run config, out dir, resume=True) -> summary
    model: Callable[[str | None], Any] | None = None


KINDS: dict[str, RecipeKind] = {
    "clip": RecipeKind(ClipRunConfig, train_clip, model=lambda preset: clip_preset(preset) if preset else CLIPConfig()),
    "llava": RecipeKind(LlavaRunConfig, train_llava),
    "diffusion": RecipeKind(DiffusionRunConfig, train_diffusion),
    "vae": RecipeKind(VAERunConfig, train_vae),
}


def read_recipe(path: str | Path | None) -> dict[str, Any]:
    """A recipe file's mapping ({} for no file)."""
    if path is None:
        return {}
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a YAML mapping at the top level")
    return raw


def merge(base: dict[str, Any], extra: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Lay `extra` over `base` in place, section by section; a key `base` lacks is an error naming it."""
    unknown = sorted(set(extra) - set(base))
    if unknown:
        raise ValueError(f"recipe{where}: unknown field(s) {unknown}; known: {sorted(base)}")
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base[k], dict) and v.get("kind", base[k].get("kind")) == base[k].get("kind"):
            merge(base[k], v, f"{where}.{k}")
        else:
            base[k] = copy.deepcopy(v)
    return base


def defaults(kind: str, preset: str | None = None) -> dict[str, Any]:
    """The kind's run config as a plain dict, before any recipe: each field's declared default (a field that
    its config derives later, such as LLaVA's stage-dependent `template`, stays unset), the model from
    `preset` where the kind has presets."""
    k = KINDS[kind]
    out = {}
    for f in dataclasses.fields(k.run_config):
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out[f.name] = to_dict(value) if dataclasses.is_dataclass(value) else value
    if k.model is not None:
        out["model"] = to_dict(k.model(preset))
    elif preset is not None:
        raise ValueError(f"model.preset: {kind} recipes have no presets; give the model's fields instead")
    return out


def build(cls: type, d: dict[str, Any], where: str = "") -> Any:
    """Dataclass `cls` from a plain dict, its dataclass-typed fields built first (with their own `from_dict`
    where they have one: a model config dispatching on its towers' `kind`)."""
    d = dict(d)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        sub = hints[f.name]
        if f.name in d and dataclasses.is_dataclass(sub):
            d[f.name] = sub.from_dict(d[f.name]) if hasattr(sub, "from_dict") else build(sub, d[f.name], f"{where}.{f.name}")
    return from_dict(cls, d, where)


def run_config_from_dict(kind: str, recipe: dict[str, Any], overrides: list[str] | None = None) -> Any:
    """A recipe mapping + dotted overrides -> the kind's run config (see the module's docstring)."""
    if kind not in KINDS:
        raise ValueError(f"unknown training kind {kind!r}; known: {sorted(KINDS)}")
    recipe = dict(recipe or {})
    overrides = list(overrides or [])
    stage2 = recipe.pop("stage2", None) or {}
    if not isinstance(stage2, dict):
        raise ValueError("recipe.stage2 must be a mapping of the fields that change in stage 2")
    model = dict(recipe.pop("model", None) or {})
    for o in [o for o in overrides if o.startswith("model.preset=")]:  # a preset replaces the base, so first
        model = {"preset": o.split("=", 1)[1].strip()}
        overrides.remove(o)
    full = defaults(kind, model.pop("preset", None))
    given = {k: v for k, v in recipe.items() if v is not None or full.get(k, v) is None}  # `train:` left empty: unset
    merge(full, {"model": model, **given})
    apply_overrides(full, overrides)
    if stage2:
        if "stage" not in full:
            raise ValueError(f"recipe.stage2: {kind} runs have no stages")
        if full["stage"] == 2:
            merge(full, stage2, ".stage2")
            apply_overrides(full, overrides)
    return build(KINDS[kind].run_config, full)


def load_recipe(kind: str, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """`mmlm train KIND --config PATH KEY=VALUE ...`: the run config of a recipe file (or of the defaults alone)."""
    return run_config_from_dict(kind, read_recipe(path), overrides)
