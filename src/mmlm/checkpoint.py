"""One checkpoint format: a directory with config.json + model.safetensors (+ tokenizer, preprocess).

Loading is strict: a missing, unexpected or mis-shaped tensor is an error that names it (the converters in
`convert/` load through the same check; `formats.py` opens every format). Files are written atomically
(temp file + rename), so a killed process never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import (ASTConfig, AudioCLIPConfig, CLIPConfig, LlavaConfig, LMConfig, VideoCLIPConfig,
                     model_config_from_dict, to_dict)
from .weights import check_state_dict, close_all, load_into, open_weights

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PREPROCESS_NAME = "preprocess.json"


def build_model(cfg: Any) -> nn.Module:
    """The model class for a config (dispatch on its type, which its explicit `kind` chose)."""
    if isinstance(cfg, VideoCLIPConfig):  # before CLIPConfig: a video CLIP is an image CLIP with a temporal part
        from .models.video import VideoCLIP

        return VideoCLIP(cfg)
    if isinstance(cfg, AudioCLIPConfig):
        from .models.audio import AudioCLIP

        return AudioCLIP(cfg)
    if isinstance(cfg, ASTConfig):
        from .models.audio import AudioSpectrogramTransformer

        return AudioSpectrogramTransformer(cfg)
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
    meta device holds no memory before). `weights.load_into` is the same check for weights read lazily."""
    check_state_dict(model.state_dict(), sd, source)
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


# torch.nn.init's in-place initialisers (what nn.Linear, nn.Embedding and the models' init_weights call)
_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")


@contextlib.contextmanager
def _skip_init() -> Iterator[None]:
    """torch.nn.init's initialisers do nothing inside (transformers' `no_init_weights` does the same). On the
    meta device there is nothing to initialise, and the meta version of `normal_` imports torch._dynamo: measured
    ~1.4 s and ~80 MB once per process, more than a small model's whole load."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    for name in saved:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def build_on_meta(cfg: Any) -> nn.Module:
    """The model for `cfg` with every parameter on the meta device (shapes, no memory, no random init):
    what a load fills in. Buffers that follow from the config (RoPE frequencies) are real CPU tensors."""
    with torch.device("meta"), _skip_init():
        return build_model(cfg)


def load_model(directory: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> nn.Module:
    """The model of an mmlm checkpoint directory (config.json with its `kind`, model.safetensors), loaded
    strictly, each tensor read from the memory-mapped file straight into `dtype` on `device` (see weights.py).
    `formats.load` (`mmlm.load`) opens this and every other format."""
    directory = Path(directory)
    cfg = model_config_from_dict(read_json(directory / CONFIG_NAME), str(directory / CONFIG_NAME))
    model = build_on_meta(cfg)
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    tensors, files = open_weights(path)
    try:
        return load_into(model, tensors, str(path), dtype, device)
    finally:
        close_all(files)
