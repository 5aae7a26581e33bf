"""transformers `LlavaForConditionalGeneration` <-> mmlm Llava: config fields and tensor names.

The tables are CLIP's vision rules and Llama's LM rules under LLaVA's prefixes, plus the projector.
transformers has written three layouts over the years: `language_model.model.*` + `vision_tower.vision_model.*`
(llava-hf checkpoints), `model.language_model.*` + `model.vision_tower.*` (its modules in v5), and what v5's
`save_pretrained` writes (`language_model.model.*`, `vision_tower.*`). All three load; export writes the last.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..config import LlavaConfig
from . import hf_clip, hf_llama
from .mapping import Rule, rename

# Canonical names: language_model.{embed_tokens,layers,norm}.*, lm_head.weight, vision_tower.{embeddings,...}.*,
# multi_modal_projector.*. Each pattern maps one historical layout onto them.
_CANONICAL = [
    (re.compile(r"^model\.language_model\."), "language_model."),
    (re.compile(r"^language_model\.model\."), "language_model."),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^model\.(vision_tower|multi_modal_projector)\."), r"\1."),
    (re.compile(r"^vision_tower\.vision_model\."), "vision_tower."),
]


def _canonical(name: str) -> str:
    for pat, repl in _CANONICAL:
        name = pat.sub(repl, name)
    return name


def _saved_name(name: str) -> str:
    """Canonical -> the layout transformers 5's save_pretrained writes."""
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    return re.sub(r"^language_model\.", "language_model.model.", name)


def _rules() -> list[Rule]:
    rules = []
    for r in hf_clip.RULES:  # CLIP's vision tower, without CLIP's output projection
        if r.ours.startswith("visual.") and r.ours != "visual.proj.weight":
            theirs = tuple(t.replace("vision_model.", "vision_tower.", 1) for t in r.their_names)
            rules.append(Rule("vision." + r.ours.removeprefix("visual."), theirs if len(theirs) > 1 else theirs[0]))
    for ours, theirs in (("fc1", "linear_1"), ("fc2", "linear_2")):
        rules += [Rule(f"projector.{ours}.{p}", f"multi_modal_projector.{theirs}.{p}") for p in ("weight", "bias")]
    for r in hf_llama.RULES:
        theirs = tuple(re.sub(r"^model\.", "language_model.", t) for t in r.their_names)
        rules.append(Rule("lm." + r.ours, theirs if len(theirs) > 1 else theirs[0]))
    return rules


RULES = _rules()


def config_from_hf(hf: dict[str, Any]) -> LlavaConfig:
    """An HF LlavaForConditionalGeneration config.json dict -> LlavaConfig."""
    if hf.get("model_type") != "llava":
        raise ValueError(f"expected a transformers LLaVA config (model_type 'llava'), got {hf.get('model_type')!r}")
    act = hf.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"projector_hidden_act {act!r} is not supported (LLaVA's projector uses 'gelu')")
    strategy = hf.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy {strategy!r} is not supported; known: 'default', 'full'")
    text = dict(hf.get("text_config") or {})
    text.setdefault("model_type", "llama")
    lm = hf_llama.config_from_hf(text)
    lm.tie_embeddings = bool(hf.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
    return LlavaConfig(vision=hf_clip.vit_config_from_hf(hf.get("vision_config") or {}), lm=lm,
                       vision_layer=hf.get("vision_feature_layer", -2), drop_cls=strategy == "default",
                       projector="mlp2x_gelu", projector_bias=bool(hf.get("multimodal_projector_bias", True)),
                       image_token_id=hf.get("image_token_id", hf.get("image_token_index", 32000)))


def config_to_hf(cfg: LlavaConfig) -> dict[str, Any]:
    if cfg.vision.kind != "vit":
        raise ValueError(f"transformers' LLaVA holds a CLIP ViT tower; a {cfg.vision.kind} tower cannot export "
                         "(keep the model in mmlm format)")
    if cfg.projector != "mlp2x_gelu":
        raise ValueError(f"transformers' LLaVA projector is the 2-layer GELU MLP; projector {cfg.projector!r} "
                         "cannot export (keep the model in mmlm format)")
    if cfg.connector != "llava" or cfg.video is not None or cfg.audio is not None:
        raise ValueError("transformers' LLaVA reads images through a projector only; a model with a Flamingo "
                         "connector or a video / audio tower cannot export (keep the model in mmlm format)")
    if cfg.image_pos_embed:
        raise ValueError("transformers' LLaVA has no image position embedding; a model with image_pos_embed "
                         "cannot export (keep the model in mmlm format)")
    if not 0 <= cfg.image_token_id < cfg.lm.vocab_size:
        raise ValueError(f"image_token_id {cfg.image_token_id} is outside the vocabulary (size {cfg.lm.vocab_size}); "
                         "transformers' LLaVA embeds the image token, so it must be a vocabulary id to export")
    text = hf_llama.config_to_hf(cfg.lm)
    text.pop("architectures", None)
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "vision_config": hf_clip.vit_config_to_hf(cfg.vision, cfg.vision.width),
        "text_config": text,
        "image_token_index": cfg.image_token_id,
        "image_seq_length": cfg.image_tokens,
        "projector_hidden_act": "gelu",
        "vision_feature_select_strategy": "default" if cfg.drop_cls else "full",
        "vision_feature_layer": cfg.vision_layer,
        "multimodal_projector_bias": cfg.projector_bias,
        "tie_word_embeddings": cfg.lm.tie_embeddings,
        "torch_dtype": "float32", "dtype": "float32",
    }


def _ignored(name: str) -> bool:
    return name.endswith("position_ids") or name.endswith("rotary_emb.inv_freq")


def state_dict_from_hf(sd: dict[str, torch.Tensor], cfg: LlavaConfig, source: str = "hf") -> dict[str, torch.Tensor]:
    sd = {_canonical(k): v for k, v in sd.items()}
    if cfg.lm.tie_embeddings:  # some checkpoints store the tied head anyway
        sd.pop("lm_head.weight", None)
    return rename(sd, RULES, "to_ours", source, ignore=_ignored)


def state_dict_to_hf(sd: dict[str, torch.Tensor], cfg: LlavaConfig) -> dict[str, torch.Tensor]:
    lm_sizes = hf_llama._split_sizes(cfg.lm)

    def sizes(rule: Rule, t: torch.Tensor) -> list[int]:  # the LM's q/k/v differ under GQA; CLIP's are equal
        return lm_sizes(rule, t) if rule.ours.startswith("lm.") else [t.shape[0] // len(rule.their_names)] * len(rule.their_names)

    out = rename(sd, RULES, "to_theirs", "mmlm", split_sizes=sizes)
    return {_saved_name(k): v for k, v in out.items()}
