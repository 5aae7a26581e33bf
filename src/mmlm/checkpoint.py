"""One checkpoint format: a directory with config.json + model.safetensors (+ tokenizer, preprocess).

Loading is strict: a missing, unexpected or mis-shaped tensor is an error that names it (the converters in
`convert/` load through the same check; `formats.py` opens every format). Files are written atomically
(temp file + rename), so a killed process never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import CLIPConfig, LlavaConfig, LMConfig, model_config_from_dict, to_dict

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PREPROCESS_NAME = "preprocess.json"


def build_model(cfg: Any) -> nn.Module:
    """The model class for a config (dispatch on its type, which its explicit `kind` chose)."""
    if isinstance(cfg, CLIPConfig):
        from .models.clip import CLIP

        return CLIP(cfg)
    if isinstance(cfg, LMConfig):
        from .models.lm import LM

        return LM(cfg)
    if isinstance(cfg, LlavaConfig):
        from .models.llava import Llava

        return Llava(cfg)
    raise TypeError(f"no model for config type {type(cfg).__name__}")


# ----------------------------------------------------------------------------- atomic file writes

def atomic_write(path: str | Path, write: Any) -> None:
    """Call `write(tmp_path)`, then rename the temp file onto `path` (same directory, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | Path, data: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


def read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata or {"format": "pt"}))


# ----------------------------------------------------------------------------- strict loading

def load_state_dict_strict(model: nn.Module, sd: dict[str, torch.Tensor], source: str, assign: bool = False) -> None:
    """Load `sd` into `model`; any missing, unexpected or mis-shaped tensor is a ValueError naming it.

    `assign` makes the tensors of `sd` the model's parameters instead of copying them (a model built on the
    meta device holds no memory before)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    mis_shaped = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in sd and sd[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing tensor(s) {missing[:8]}" + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        problems.append(f"unexpected tensor(s) {unexpected[:8]}" + (" ..." if len(unexpected) > 8 else ""))
    if mis_shaped:
        problems.append(f"mis-shaped tensor(s) {mis_shaped[:8]}")
    if problems:
        raise ValueError(f"{source}: " + "; ".join(problems))
    model.load_state_dict(sd, strict=True, assign=assign)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from .safetensors, or from .bin/.pt/.pth with `weights_only=True` (never arbitrary pickle)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a state dict)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


# ----------------------------------------------------------------------------- save / load

def save(model: nn.Module, directory: str | Path, tokenizer: Any = None, preprocess: Any = None,
         state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write an mmlm checkpoint directory: config.json, model.safetensors (+ tokenizer, preprocess.json).

    `state_dict` replaces model.state_dict() (a sharded model's weights gathered by the caller)."""
    if getattr(model, "quantized", None):
        raise ValueError(f"this model's weights were quantized to {model.quantized} for inference (mmlm.quantize); "
                         "save the float model instead")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(directory / WEIGHTS_NAME, model.state_dict() if state_dict is None else state_dict)
    write_json(directory / CONFIG_NAME, to_dict(model.config))
    if tokenizer is not None:
        tokenizer.save(directory)
    if preprocess is not None:
        write_json(directory / PREPROCESS_NAME, preprocess.to_dict())
    return directory


def load_model(directory: str | Path) -> nn.Module:
    """The model of an mmlm checkpoint directory (config.json with its `kind`, model.safetensors), loaded
    strictly. `formats.load` (`mmlm.load`) opens this and every other format."""
    directory = Path(directory)
    cfg = model_config_from_dict(read_json(directory / CONFIG_NAME), str(directory / CONFIG_NAME))
    model = build_model(cfg)
    load_state_dict_strict(model, read_state_dict(directory / WEIGHTS_NAME), str(directory / WEIGHTS_NAME))
    return model
