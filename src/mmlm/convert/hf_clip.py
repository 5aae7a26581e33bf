"""transformers `CLIPModel` <-> mmlm CLIP: config fields and tensor names.

transformers has no form for CLIP's ModifiedResNet, so only ViT models export.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import CLIPConfig, TextConfig, ViTConfig
from .mapping import Rule, rename

_HF_ACT = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
           "silu": "silu"}
_ACT_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu"}


def _block_rules(ours: str, theirs: str) -> list[Rule]:
    o, t = f"{ours}.transformer.blocks.{{i}}", f"{theirs}.encoder.layers.{{i}}"
    rules = [Rule(f"{o}.attn.qkv.{p}", tuple(f"{t}.self_attn.{x}_proj.{p}" for x in "qkv")) for p in ("weight", "bias")]
    pairs = [("attn.proj", "self_attn.out_proj"), ("norm1", "layer_norm1"), ("norm2", "layer_norm2"),
             ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]
    return rules + [Rule(f"{o}.{a}.{p}", f"{t}.{b}.{p}") for a, b in pairs for p in ("weight", "bias")]


def _ln(ours: str, theirs: str) -> list[Rule]:
    return [Rule(f"{ours}.{p}", f"{theirs}.{p}") for p in ("weight", "bias")]


RULES: list[Rule] = [
    Rule("visual.patch_embed.weight", "vision_model.embeddings.patch_embedding.weight"),
    Rule("visual.class_embedding", "vision_model.embeddings.class_embedding"),
    Rule("visual.pos_embed", "vision_model.embeddings.position_embedding.weight"),
    *_ln("visual.norm_pre", "vision_model.pre_layrnorm"),
    *_block_rules("visual", "vision_model"),
    *_ln("visual.norm_post", "vision_model.post_layernorm"),
    Rule("visual.proj.weight", "visual_projection.weight"),
    Rule("text.token_embed.weight", "text_model.embeddings.token_embedding.weight"),
    Rule("text.pos_embed", "text_model.embeddings.position_embedding.weight"),
    *_block_rules("text", "text_model"),
    *_ln("text.norm_final", "text_model.final_layer_norm"),
    Rule("text.proj.weight", "text_projection.weight"),
    Rule("logit_scale", "logit_scale"),
]


def _act(name: str, where: str) -> str:
    if name not in _HF_ACT:
        raise ValueError(f"{where}.hidden_act {name!r} is not supported; known: {sorted(_HF_ACT)}")
    return _HF_ACT[name]


def vit_config_from_hf(v: dict[str, Any]) -> ViTConfig:
    """An HF CLIPVisionConfig dict (CLIPModel's or LLaVA's `vision_config`) -> ViTConfig."""
    return ViTConfig(image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 32),
                     width=v.get("hidden_size", 768), layers=v.get("num_hidden_layers", 12),
                     heads=v.get("num_attention_heads", 12), mlp_dim=v.get("intermediate_size", 3072),
                     act=_act(v.get("hidden_act", "quick_gelu"), "vision_config"),
                     norm_eps=v.get("layer_norm_eps", 1e-5), in_channels=v.get("num_channels", 3))


def vit_config_to_hf(v: ViTConfig, projection_dim: int) -> dict[str, Any]:
    return {
        "model_type": "clip_vision_model", "hidden_size": v.width, "intermediate_size": v.mlp_dim,
        "num_hidden_layers": v.layers, "num_attention_heads": v.heads, "image_size": v.image_size,
        "patch_size": v.patch_size, "num_channels": v.in_channels, "hidden_act": _ACT_HF[v.act],
        "layer_norm_eps": v.norm_eps, "projection_dim": projection_dim,
    }


def config_from_hf(hf: dict[str, Any]) -> CLIPConfig:
    """An HF CLIPModel config.json dict -> CLIPConfig."""
    if hf.get("model_type") != "clip":
        raise ValueError(f"expected a transformers CLIP config (model_type 'clip'), got {hf.get('model_type')!r}")
    v, t = hf.get("vision_config") or {}, hf.get("text_config") or {}
    return CLIPConfig(embed_dim=hf.get("projection_dim", 512), vision=vit_config_from_hf(v), text=text_config_from_hf(t),
                      logit_scale_init=hf.get("logit_scale_init_value", 2.6592))


def text_config_from_hf(t: dict[str, Any]) -> TextConfig:
    """An HF CLIPTextConfig dict (CLIPModel's `text_config`, or a CLIPTextModel's config.json) -> TextConfig."""
    vocab = t.get("vocab_size", 49408)
    eos = t.get("eos_token_id", 49407)
    # transformers pools at argmax(input_ids) when eos_token_id == 2 (configs older than its PR #24773).
    legacy = eos == 2
    return TextConfig(vocab_size=vocab, context_length=t.get("max_position_embeddings", 77),
                      width=t.get("hidden_size", 512), layers=t.get("num_hidden_layers", 12),
                      heads=t.get("num_attention_heads", 8), mlp_dim=t.get("intermediate_size", 2048),
                      act=_act(t.get("hidden_act", "quick_gelu"), "text_config"), norm_eps=t.get("layer_norm_eps", 1e-5),
                      eot_token_id=vocab - 1 if legacy else eos, pool="argmax" if legacy else "eot")


def text_config_to_hf(t: TextConfig, projection_dim: int) -> dict[str, Any]:
    """TextConfig -> an HF CLIPTextConfig dict."""
    if t.pool == "eot" and t.eot_token_id == 2:
        raise ValueError("text.eot_token_id 2 with pool 'eot' cannot be expressed: transformers treats "
                         "eos_token_id == 2 as argmax pooling")
    return {
        "model_type": "clip_text_model", "vocab_size": t.vocab_size, "max_position_embeddings": t.context_length,
        "hidden_size": t.width, "intermediate_size": t.mlp_dim, "num_hidden_layers": t.layers,
        "num_attention_heads": t.heads, "hidden_act": _ACT_HF[t.act], "layer_norm_eps": t.norm_eps,
        "projection_dim": projection_dim,
        # 2 tells transformers to pool at argmax(input_ids), exactly what pool == "argmax" does.
        "eos_token_id": 2 if t.pool == "argmax" else t.eot_token_id,
    }


def config_to_hf(cfg: CLIPConfig) -> dict[str, Any]:
    if not isinstance(cfg.vision, ViTConfig):
        raise ValueError("transformers' CLIPModel has no ModifiedResNet vision tower: only ViT CLIP models export "
                         "to Hugging Face format (keep ResNet models in mmlm or OpenAI format)")
    if cfg.logit_bias_init is not None:
        raise ValueError("transformers' CLIPModel has no logit_bias (a SigLIP-style model): it cannot export as CLIPModel")
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": cfg.logit_scale_init,
        "torch_dtype": "float32",
        "vision_config": vit_config_to_hf(cfg.vision, cfg.embed_dim),
        "text_config": text_config_to_hf(cfg.text, cfg.embed_dim),
    }


def _hf_ignored(name: str) -> bool:
    return name.endswith("position_ids")  # a buffer older transformers saved


def state_dict_from_hf(sd: dict[str, torch.Tensor], cfg: CLIPConfig | None = None, source: str = "hf") -> dict[str, torch.Tensor]:
    return rename(sd, RULES, "to_ours", source, ignore=_hf_ignored)


def state_dict_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return rename(sd, RULES, "to_theirs", "mmlm")
