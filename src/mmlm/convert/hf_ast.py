"""transformers `ASTModel` / `ASTForAudioClassification` <-> mmlm AudioSpectrogramTransformer: config fields and
tensor names.

The tensor names are those on disk (every published AST checkpoint, and what transformers still writes), not
the attribute names of transformers' current modules. An ASTForAudioClassification directory prefixes the
model's names with `audio_spectrogram_transformer.` and adds `classifier.*`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import ASTConfig
from .mapping import Rule, rename

MODEL_TYPE = "audio-spectrogram-transformer"
CLASSIFIER = "ASTForAudioClassification"
PREFIX = "audio_spectrogram_transformer."
_HF_ACT = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "quick_gelu": "quick_gelu",
           "silu": "silu"}


def _act(name: str) -> str:
    if name not in _HF_ACT:
        raise ValueError(f"config.hidden_act {name!r} is not supported; known: {sorted(_HF_ACT)}")
    return _HF_ACT[name]


def _pair(ours: str, theirs: str) -> list[Rule]:
    return [Rule(f"{ours}.{p}", f"{theirs}.{p}") for p in ("weight", "bias")]


def rules(classifier: bool) -> list[Rule]:
    """The name table; `classifier` for an ASTForAudioClassification directory."""
    pre = PREFIX if classifier else ""
    o, t = "transformer.blocks.{i}", f"{pre}encoder.layer.{{i}}"
    table = [
        *_pair("patch_embed", f"{pre}embeddings.patch_embeddings.projection"),
        Rule("cls_token", f"{pre}embeddings.cls_token"),
        Rule("dist_token", f"{pre}embeddings.distillation_token"),
        Rule("pos_embed", f"{pre}embeddings.position_embeddings"),
        *[Rule(f"{o}.attn.qkv.{p}", tuple(f"{t}.attention.attention.{x}.{p}" for x in ("query", "key", "value")))
          for p in ("weight", "bias")],
        *_pair(f"{o}.attn.proj", f"{t}.attention.output.dense"),
        *_pair(f"{o}.norm1", f"{t}.layernorm_before"),
        *_pair(f"{o}.norm2", f"{t}.layernorm_after"),
        *_pair(f"{o}.mlp.fc1", f"{t}.intermediate.dense"),
        *_pair(f"{o}.mlp.fc2", f"{t}.output.dense"),
        *_pair("norm", f"{pre}layernorm"),
    ]
    if classifier:
        table += [*_pair("head.norm", "classifier.layernorm"), *_pair("head.dense", "classifier.dense")]
    return table


def _num_labels(hf: dict[str, Any]) -> int:
    """The classifier's outputs: id2label's size, else num_labels, else transformers' default of 2."""
    if hf.get("id2label"):
        return len(hf["id2label"])
    return int(hf.get("num_labels", 2))


def config_from_hf(hf: dict[str, Any]) -> ASTConfig:
    """An HF AST config.json dict -> ASTConfig (num_labels > 0 when `architectures` names the classifier)."""
    if hf.get("model_type") != MODEL_TYPE:
        raise ValueError(f"expected a transformers AST config (model_type {MODEL_TYPE!r}), got {hf.get('model_type')!r}")
    classifier = CLASSIFIER in (hf.get("architectures") or [])
    return ASTConfig(num_mel_bins=hf.get("num_mel_bins", 128), max_length=hf.get("max_length", 1024),
                     patch_size=hf.get("patch_size", 16), frequency_stride=hf.get("frequency_stride", 10),
                     time_stride=hf.get("time_stride", 10), width=hf.get("hidden_size", 768),
                     layers=hf.get("num_hidden_layers", 12), heads=hf.get("num_attention_heads", 12),
                     mlp_dim=hf.get("intermediate_size", 3072), act=_act(hf.get("hidden_act", "gelu")),
                     norm_eps=hf.get("layer_norm_eps", 1e-12), qkv_bias=hf.get("qkv_bias", True),
                     num_labels=_num_labels(hf) if classifier else 0)


def config_to_hf(cfg: ASTConfig) -> dict[str, Any]:
    out = {
        "architectures": [CLASSIFIER if cfg.num_labels else "ASTModel"], "model_type": MODEL_TYPE,
        "num_mel_bins": cfg.num_mel_bins, "max_length": cfg.max_length, "patch_size": cfg.patch_size,
        "frequency_stride": cfg.frequency_stride, "time_stride": cfg.time_stride, "hidden_size": cfg.width,
        "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads, "intermediate_size": cfg.mlp_dim,
        "hidden_act": {"gelu_tanh": "gelu_pytorch_tanh"}.get(cfg.act, cfg.act), "layer_norm_eps": cfg.norm_eps,
        "qkv_bias": cfg.qkv_bias, "torch_dtype": "float32",
    }
    if cfg.num_labels:
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
    return out


def state_dict_from_hf(sd: dict[str, torch.Tensor], cfg: ASTConfig, source: str = "hf") -> dict[str, torch.Tensor]:
    return rename(sd, rules(cfg.num_labels > 0), "to_ours", source)


def state_dict_to_hf(sd: dict[str, torch.Tensor], cfg: ASTConfig) -> dict[str, torch.Tensor]:
    return rename(sd, rules(cfg.num_labels > 0), "to_theirs", "mmlm")
