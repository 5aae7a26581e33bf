"""Read and write Hugging Face model directories (no transformers import needed)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..checkpoint import build_on_meta, read_json, read_state_dict, save_tensors, write_json
from ..config import ASTConfig, LlavaConfig, LMConfig
from ..weights import INDEX_NAME, close_all, load_into, open_weights
from . import hf_ast, hf_clip, hf_idefics, hf_llama, hf_llava


def read_hf_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF directory: model.safetensors, its sharded index, or pytorch_model.bin (weights_only)."""
    d = Path(directory)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = d / index_name
        if index.is_file():
            sd: dict[str, torch.Tensor] = {}
            for shard in sorted(set(read_json(index)["weight_map"].values())):
                sd.update(read_state_dict(d / shard))
            return sd
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (d / name).is_file():
            return read_state_dict(d / name)
    raise FileNotFoundError(f"{d}: no model.safetensors, pytorch_model.bin or shard index")


# transformers `model_type` -> the module that converts its config and tensor names (same functions in each).
CONVERTERS = {"clip": hf_clip, "llama": hf_llama, "qwen2": hf_llama, "llava": hf_llava, "idefics": hf_idefics,
              hf_ast.MODEL_TYPE: hf_ast}


def lazy_hf_weights(directory: str | Path) -> tuple[dict, list]:
    """The tensors of an HF directory without reading them: ({name: weights.FileTensor}, open files) from
    model.safetensors or its sharded index; a pytorch_model.bin (no memory map) is read whole, with no files."""
    d = Path(directory)
    if (d / INDEX_NAME).is_file():
        return open_weights(d)
    if (d / "model.safetensors").is_file():
        return open_weights(d / "model.safetensors")
    return read_hf_weights(d), []


def load_hf(directory: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> nn.Module:
    """A transformers CLIPModel / LlamaForCausalLM / Qwen2ForCausalLM / LlavaForConditionalGeneration /
    IdeficsForVisionText2Text / ASTModel / ASTForAudioClassification dir -> mmlm,
    built on the meta device, each tensor read straight into `dtype` on `device` (fused ones in place)."""
    d = Path(directory)
    hf_cfg = read_json(d / "config.json")
    conv = CONVERTERS.get(hf_cfg.get("model_type"))
    if conv is None:
        raise ValueError(f"{d / 'config.json'}: neither an mmlm config (no 'kind') nor a supported transformers "
                         f"model_type (got {hf_cfg.get('model_type')!r}; supported: {sorted(CONVERTERS)})")
    cfg = conv.config_from_hf(hf_cfg)
    model = build_on_meta(cfg)
    tensors, files = lazy_hf_weights(d)
    try:
        return load_into(model, conv.state_dict_from_hf(tensors, cfg, source=str(d)), str(d), dtype, device)
    finally:
        close_all(files)


def export_hf(model: nn.Module, out: str | Path, tokenizer=None, preprocess=None) -> Path:
    """Write `model` as a directory that transformers' `from_pretrained` loads (CLIPModel, LlamaForCausalLM,
    Qwen2ForCausalLM, LlavaForConditionalGeneration or, for a Flamingo connector, IdeficsForVisionText2Text)."""
    out = Path(out)
    if isinstance(model.config, LlavaConfig):  # a Flamingo connector: IDEFICS; else transformers' LLaVA
        conv = hf_idefics if model.config.connector == "flamingo" else hf_llava
        hf_cfg = conv.config_to_hf(model.config)
        tensors = conv.state_dict_to_hf(model.merged_state_dict(), model.config)  # LoRA merged
    elif isinstance(model.config, ASTConfig):
        hf_cfg = hf_ast.config_to_hf(model.config)
        tensors = hf_ast.state_dict_to_hf(model.state_dict(), model.config)
    elif isinstance(model.config, LMConfig):
        hf_cfg = hf_llama.config_to_hf(model.config)
        tensors = hf_llama.state_dict_to_hf(model.state_dict(), model.config)
    else:
        hf_cfg = hf_clip.config_to_hf(model.config)  # raises for models transformers cannot express
        tensors = hf_clip.state_dict_to_hf(model.state_dict())
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / "model.safetensors", tensors)
    write_json(out / "config.json", hf_cfg)
    if preprocess is not None:
        write_json(out / "preprocessor_config.json", preprocess.to_hf())
    if tokenizer is not None:
        tokenizer.save(out)
    return out
