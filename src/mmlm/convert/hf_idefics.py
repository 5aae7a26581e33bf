"""transformers `IdeficsForVisionText2Text` (IDEFICS, the open Flamingo) <-> mmlm Llava with `connector: flamingo`.

IDEFICS is a CLIP ViT whose last hidden states (every token, before the post-LayerNorm) go to a perceiver
resampler, and a Llama whose decoder layers each follow a gated cross-attention layer every
`cross_layer_interval` layers. In mmlm that is a Llava with an `identity` projector (the resampler reads the tower's
width), `vision_layer -1` with the class token kept, and a Flamingo connector whose media token is `<image>`, each
text token seeing the most recent image before it (IDEFICS's processor mask). Its decoupled embedding and head (the
`additional_vocab_size` rows trained apart) are one vocabulary here: the additional rows follow the others.
Supported: the resampler (`use_resampler`), float gates, no query/key LayerNorms (IDEFICS-9B/80B's settings).
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import FlamingoConnectorConfig, LlavaConfig
from . import hf_clip, hf_llama
from .mapping import Rule, cat_rows, rename

_X, _XT = "flamingo.cross.{i}", "model.gated_cross_attn_layers.{i}"
_R, _RT = "flamingo.resampler", "model.perceiver_resampler"


def _rules() -> list[Rule]:
    rules = []
    for r in hf_clip.RULES:  # CLIP's vision tower, without CLIP's output projection
        if r.ours.startswith("visual.") and r.ours != "visual.proj.weight":
            theirs = tuple("model." + t for t in r.their_names)
            rules.append(Rule("vision." + r.ours.removeprefix("visual."), theirs if len(theirs) > 1 else theirs[0]))
    for r in hf_llama.RULES:  # the same names: IDEFICS's LM is a Llama under `model.`
        rules.append(Rule("lm." + r.ours, r.theirs))
    rules += [  # the perceiver resampler: the same names (tests/test_flamingo.py loads IDEFICS's strictly)
        Rule(f"{_R}.latents", f"{_RT}.latents"),
        *[Rule(f"{_R}.layer_norm.{p}", f"{_RT}.layer_norm.{p}") for p in ("weight", "bias")],
        *[Rule(f"{_R}.blocks.{{i}}.0.{n}.{p}", f"{_RT}.blocks.{{i}}.0.{n}.{p}")
          for n in ("context_layer_norm", "latents_layer_norm") for p in ("weight", "bias")],
        *[Rule(f"{_R}.blocks.{{i}}.0.{n}_proj.weight", f"{_RT}.blocks.{{i}}.0.{n}_proj.weight")
          for n in ("q", "k", "v", "output")],
        *[Rule(f"{_R}.blocks.{{i}}.1.ln.{p}", f"{_RT}.blocks.{{i}}.1.ln.{p}") for p in ("weight", "bias")],
        *[Rule(f"{_R}.blocks.{{i}}.1.{n}.weight", f"{_RT}.blocks.{{i}}.1.{n}.weight") for n in ("fc", "c_proj")],
    ]
    rules += [  # the gated cross-attention layers
        Rule(f"{_X}.input_layernorm.weight", f"{_XT}.input_layernorm.weight"),
        Rule(f"{_X}.post_attention_layernorm.weight", f"{_XT}.post_attention_layernorm.weight"),
        Rule(f"{_X}.cross_attn.q.weight", f"{_XT}.cross_attn.q_proj.weight"),
        Rule(f"{_X}.cross_attn.kv.weight", (f"{_XT}.cross_attn.k_proj.weight", f"{_XT}.cross_attn.v_proj.weight")),
        Rule(f"{_X}.cross_attn.proj.weight", f"{_XT}.cross_attn.o_proj.weight"),
        Rule(f"{_X}.mlp.fc1.weight", (f"{_XT}.mlp.gate_proj.weight", f"{_XT}.mlp.up_proj.weight")),
        Rule(f"{_X}.mlp.fc2.weight", f"{_XT}.mlp.down_proj.weight"),
        Rule(f"{_X}.alpha_cross_attn", f"{_XT}.alpha_cross_attn"),
        Rule(f"{_X}.alpha_dense", f"{_XT}.alpha_dense"),
    ]
    return rules


RULES = _rules()


def config_from_hf(hf: dict[str, Any]) -> LlavaConfig:
    """An HF IdeficsForVisionText2Text config.json dict -> LlavaConfig (connector: flamingo)."""
    if hf.get("model_type") != "idefics":
        raise ValueError(f"expected a transformers IDEFICS config (model_type 'idefics'), got {hf.get('model_type')!r}")
    p = dict(hf.get("perceiver_config") or {})
    for field, bad, why in (("use_resampler", False, "IDEFICS without its perceiver resampler"),
                            ("qk_layer_norms", True, "query/key LayerNorms in the LM (qk_layer_norms)"),
                            ("alpha_type", "vector", "per-channel gates (alpha_type 'vector')")):
        value = hf.get(field, p.get(field, {"use_resampler": False, "qk_layer_norms": False,
                                             "alpha_type": "float"}[field]))
        if value == bad or (field == "use_resampler" and not (value or p.get("use_resampler"))):
            raise ValueError(f"config.json: {why} is not supported (mmlm reads IDEFICS-9B/80B's layout)")
    if p.get("qk_layer_norms_perceiver"):
        raise ValueError("config.json: query/key LayerNorms in the resampler (qk_layer_norms_perceiver) are not supported")
    layers, interval = hf.get("num_hidden_layers", 32), hf.get("cross_layer_interval", 1)
    if layers % interval:
        raise ValueError(f"config.json: cross_layer_interval {interval} does not divide num_hidden_layers {layers}")
    v = dict(hf.get("vision_config") or {})
    vision = hf_clip.vit_config_from_hf({"image_size": v.get("image_size", 224), "patch_size": v.get("patch_size", 14),
                                         "hidden_size": v.get("embed_dim", 768),
                                         "num_hidden_layers": v.get("num_hidden_layers", 32),
                                         "num_attention_heads": v.get("num_attention_heads", 16),
                                         "intermediate_size": v.get("intermediate_size", 5120),
                                         "hidden_act": v.get("hidden_act", "gelu"),
                                         "layer_norm_eps": v.get("layer_norm_eps", 1e-5),
                                         "num_channels": v.get("num_channels", 3)})
    vocab = hf.get("vocab_size", 32000) + hf.get("additional_vocab_size", 0)
    heads = hf.get("num_attention_heads", 32)
    lm = hf_llama.config_from_hf({
        "model_type": "llama", "vocab_size": vocab, "hidden_size": hf.get("hidden_size", 4096),
        "intermediate_size": hf.get("intermediate_size", 11008), "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": heads, "hidden_act": hf.get("hidden_act", "silu"),
        "rms_norm_eps": hf.get("rms_norm_eps", 1e-6), "max_position_embeddings": hf.get("max_position_embeddings", 2048),
        "rope_parameters": hf.get("rope_parameters") or {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": hf.get("tie_word_embeddings", False), "bos_token_id": hf.get("bos_token_id"),
        "eos_token_id": hf.get("eos_token_id")})
    flamingo = FlamingoConnectorConfig(media_dim=vision.width, latents=p.get("resampler_n_latents", 64),
                                       resampler_depth=p.get("resampler_depth", 6),
                                       resampler_heads=p.get("resampler_n_heads", 16),
                                       resampler_head_dim=p.get("resampler_head_dim", 96), interval=interval,
                                       cross_heads=heads, only_last_media=True)
    # IDEFICS's tokenizer adds <fake_token_around_image> then <image> after the vocabulary: <image> is the last id
    return LlavaConfig(vision=vision, lm=lm, vision_layer=-1, drop_cls=False, projector="identity",
                       projector_bias=False, image_token_id=hf.get("image_token_id", vocab - 1), connector="flamingo",
                       flamingo=flamingo)


def config_to_hf(cfg: LlavaConfig) -> dict[str, Any]:
    if cfg.flamingo is not None and cfg.flamingo.offset:
        raise ValueError(f"transformers' IDEFICS puts its cross-attention before LM blocks 0, interval, ...: "
                         f"flamingo.offset {cfg.flamingo.offset} cannot export (keep the model in mmlm format)")
    if cfg.connector != "flamingo" or cfg.projector != "identity" or cfg.vision.kind != "vit" \
            or cfg.vision_layers != [-1] and cfg.vision_layers != [cfg.vision.layers] or cfg.drop_cls:
        raise ValueError("transformers' IDEFICS reads a ViT's last hidden states (class token kept) through its "
                         "resampler: only a Flamingo-connector Llava with an identity projector, vision_layer -1 and "
                         "drop_cls false exports (keep the model in mmlm format)")
    if cfg.video is not None or cfg.audio is not None or cfg.image_pos_embed:
        raise ValueError("transformers' IDEFICS reads images alone: a model with a video or audio tower or an image "
                         "position embedding cannot export (keep the model in mmlm format)")
    f, lm = cfg.flamingo, cfg.lm
    if not f.only_last_media or (f.cross_heads or lm.heads) != lm.heads or lm.kv_heads not in (0, lm.heads):
        raise ValueError("transformers' IDEFICS attends to the most recent image with the LM's heads and no grouped "
                         "keys: only_last_media true, cross_heads = heads, kv_heads = heads to export")
    text = hf_llama.config_to_hf(lm)
    return {
        "architectures": ["IdeficsForVisionText2Text"], "model_type": "idefics",
        "vocab_size": lm.vocab_size, "additional_vocab_size": 0, "hidden_size": lm.width,
        "intermediate_size": lm.mlp_dim, "num_hidden_layers": lm.layers, "num_attention_heads": lm.heads,
        "hidden_act": text["hidden_act"], "rms_norm_eps": lm.norm_eps, "max_position_embeddings": lm.max_seq_len,
        "rope_parameters": {"rope_type": "default", "rope_theta": lm.rope_theta},
        "tie_word_embeddings": lm.tie_embeddings, "cross_layer_interval": f.interval, "use_resampler": True,
        "alpha_type": "float", "qk_layer_norms": False, "image_token_id": cfg.image_token_id,
        "bos_token_id": lm.bos_token_id, "eos_token_id": (lm.eos_token_id or [None])[0],
        "vision_config": {"embed_dim": cfg.vision.width, "image_size": cfg.vision.image_size,
                          "patch_size": cfg.vision.patch_size, "num_hidden_layers": cfg.vision.layers,
                          "num_attention_heads": cfg.vision.heads, "intermediate_size": cfg.vision.mlp_dim,
                          "hidden_act": hf_clip.vit_config_to_hf(cfg.vision, cfg.vision.width)["hidden_act"],
                          "layer_norm_eps": cfg.vision.norm_eps, "num_channels": cfg.vision.in_channels},
        "perceiver_config": {"use_resampler": True, "resampler_n_latents": f.latents,
                             "resampler_depth": f.resampler_depth, "resampler_n_heads": f.resampler_heads,
                             "resampler_head_dim": f.resampler_head_dim, "qk_layer_norms_perceiver": False},
        "torch_dtype": "float32", "dtype": "float32",
    }


def _ignored(name: str) -> bool:
    return name.endswith("position_ids") or name.endswith("rotary_emb.inv_freq")


_DECOUPLED = (("model.embed_tokens.weight", "model.embed_tokens.additional_embedding.weight"),
              ("lm_head.weight", "lm_head.additional_fc.weight"))


def state_dict_from_hf(sd: dict[str, torch.Tensor], cfg: LlavaConfig, source: str = "hf") -> dict[str, torch.Tensor]:
    sd = dict(sd)
    for base, extra in _DECOUPLED:  # the additional rows after the others: one vocabulary
        if extra in sd:
            sd[base] = cat_rows([sd[base], sd.pop(extra)])
    if cfg.lm.tie_embeddings:  # stored once, as the embedding
        sd = {k: v for k, v in sd.items() if not k.startswith("lm_head.")}
    return rename(sd, RULES, "to_ours", source, ignore=_ignored)


def state_dict_to_hf(sd: dict[str, torch.Tensor], cfg: LlavaConfig) -> dict[str, torch.Tensor]:
    """Written with one vocabulary (additional_vocab_size 0): the same model for transformers."""
    lm_sizes = hf_llama._split_sizes(cfg.lm)

    def sizes(rule: Rule, t: torch.Tensor) -> list[int]:
        if rule.ours.startswith("lm."):
            return lm_sizes(rule, t)
        return [t.shape[0] // len(rule.their_names)] * len(rule.their_names)

    return rename(sd, RULES, "to_theirs", "mmlm", split_sizes=sizes)
