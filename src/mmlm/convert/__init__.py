"""Conversion between mmlm models and OpenAI, open_clip, Hugging Face and GGUF formats (`formats.py` picks one
for a path)."""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint import build_model, load_state_dict_strict, read_state_dict
from ..config import model_config_from_dict


def _config_file(config: str | Path | None) -> dict | None:
    return None if config is None else json.loads(Path(config).read_text())


def from_openai(src: str | Path, config: str | Path | None = None, head_width: int = 64):
    """An OpenAI-format CLIP state dict (.pt/.bin read with weights_only=True, or .safetensors) -> mmlm CLIP.

    The architecture is inferred from shapes unless `config` (an mmlm config.json) is given.
    """
    from .openai_clip import config_from_openai_state_dict, state_dict_from_openai

    sd = read_state_dict(src)
    cfg_dict = _config_file(config)
    cfg = model_config_from_dict(cfg_dict, str(config)) if cfg_dict else config_from_openai_state_dict(sd, head_width)
    model = build_model(cfg)
    load_state_dict_strict(model, state_dict_from_openai(sd, cfg, str(src)), str(src))
    return model.eval()


def from_open_clip(src: str | Path, config: str | Path):
    """An open_clip state dict + its model-config JSON (`{"embed_dim", "vision_cfg", "text_cfg", ...}`) -> mmlm CLIP."""
    from .openai_clip import config_from_open_clip, state_dict_from_openai

    if config is None:
        raise ValueError("open_clip checkpoints carry no architecture: pass --config with the model's open_clip JSON "
                         "(e.g. open_clip/model_configs/ViT-B-32.json)")
    cfg_dict = _config_file(config)
    cfg = model_config_from_dict(cfg_dict, str(config)) if "kind" in cfg_dict else config_from_open_clip(cfg_dict)
    sd = read_state_dict(src)
    model = build_model(cfg)
    load_state_dict_strict(model, state_dict_from_openai(sd, cfg, str(src)), str(src))
    return model.eval()
