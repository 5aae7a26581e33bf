"""OpenAI CLIP and open_clip state dicts <-> mmlm CLIP.

Both use OpenAI's tensor names. An OpenAI state dict carries no config, so the architecture is read
off tensor shapes exactly as OpenAI's `build_model` does (which assumes 64-wide attention heads);
open_clip ships a model-config JSON instead.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import CLIPConfig, ModifiedResNetConfig, TextConfig, ViTConfig
from .mapping import Rule, rename

_PARAM = ("weight", "bias")
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _pairs(ours: str, theirs: str, suffixes: tuple[str, ...] = _PARAM) -> list[Rule]:
    return [Rule(f"{ours}.{s}", f"{theirs}.{s}") for s in suffixes]


def _block_rules(ours: str, theirs: str) -> list[Rule]:
    o, t = f"{ours}.blocks.{{i}}", f"{theirs}.resblocks.{{i}}"
    return [Rule(f"{o}.attn.qkv.weight", f"{t}.attn.in_proj_weight"), Rule(f"{o}.attn.qkv.bias", f"{t}.attn.in_proj_bias"),
            *_pairs(f"{o}.attn.proj", f"{t}.attn.out_proj"), *_pairs(f"{o}.norm1", f"{t}.ln_1"),
            *_pairs(f"{o}.mlp.fc1", f"{t}.mlp.c_fc"), *_pairs(f"{o}.mlp.fc2", f"{t}.mlp.c_proj"),
            *_pairs(f"{o}.norm2", f"{t}.ln_2")]


TEXT_RULES = [
    Rule("text.token_embed.weight", "token_embedding.weight"),
    Rule("text.pos_embed", "positional_embedding"),
    *_block_rules("text.transformer", "transformer"),
    *_pairs("text.norm_final", "ln_final"),
    Rule("text.proj.weight", "text_projection", transpose=True),
    Rule("logit_scale", "logit_scale"),
    Rule("logit_bias", "logit_bias"),
]

VIT_RULES = [
    Rule("visual.patch_embed.weight", "visual.conv1.weight"),
    Rule("visual.class_embedding", "visual.class_embedding"),
    Rule("visual.pos_embed", "visual.positional_embedding"),
    *_pairs("visual.norm_pre", "visual.ln_pre"),
    *_block_rules("visual.transformer", "visual.transformer"),
    *_pairs("visual.norm_post", "visual.ln_post"),
    Rule("visual.proj.weight", "visual.proj", transpose=True),
]


def _resnet_rules() -> list[Rule]:
    rules = [Rule(f"visual.conv{k}.weight", f"visual.conv{k}.weight") for k in (1, 2, 3)]
    rules += [r for k in (1, 2, 3) for r in _pairs(f"visual.bn{k}", f"visual.bn{k}", _BN)]
    for s in (1, 2, 3, 4):
        b = f"visual.layer{s}.{{i}}"
        rules += [Rule(f"{b}.conv{k}.weight", f"{b}.conv{k}.weight") for k in (1, 2, 3)]
        rules += [r for k in (1, 2, 3) for r in _pairs(f"{b}.bn{k}", f"{b}.bn{k}", _BN)]
        rules += [Rule(f"{b}.downsample.conv.weight", f"{b}.downsample.0.weight"),
                  *_pairs(f"{b}.downsample.bn", f"{b}.downsample.1", _BN)]
    p = "visual.attnpool"
    rules += [Rule("visual.attn_pool.pos_embed", f"{p}.positional_embedding"),
              Rule("visual.attn_pool.attn.qkv.weight", tuple(f"{p}.{x}_proj.weight" for x in "qkv")),
              Rule("visual.attn_pool.attn.qkv.bias", tuple(f"{p}.{x}_proj.bias" for x in "qkv")),
              *_pairs("visual.attn_pool.attn.proj", f"{p}.c_proj")]
    return rules


RESNET_RULES = _resnet_rules()

# Entries OpenAI's TorchScript-era state dicts and open_clip carry that are not weights.
_IGNORED = {"input_resolution", "context_length", "vocab_size", "attn_mask", "visual.attn_mask"}


def _ignored(name: str) -> bool:
    return name in _IGNORED or name.endswith(".attn_mask")


def rules_for(cfg: CLIPConfig) -> list[Rule]:
    return (VIT_RULES if isinstance(cfg.vision, ViTConfig) else RESNET_RULES) + TEXT_RULES


def state_dict_from_openai(sd: dict[str, torch.Tensor], cfg: CLIPConfig, source: str = "openai") -> dict[str, torch.Tensor]:
    return rename(sd, rules_for(cfg), "to_ours", source, ignore=_ignored)


def state_dict_to_openai(sd: dict[str, torch.Tensor], cfg: CLIPConfig) -> dict[str, torch.Tensor]:
    return rename(sd, rules_for(cfg), "to_theirs", "mmlm")


def _count(sd: dict[str, torch.Tensor], prefix: str, pos: int) -> int:
    return len({k.split(".")[pos] for k in sd if k.startswith(prefix)})


def config_from_openai_state_dict(sd: dict[str, torch.Tensor], head_width: int = 64) -> CLIPConfig:
    """Infer the architecture from tensor shapes, as OpenAI's `clip.model.build_model` does.

    Head counts are not visible in shapes; OpenAI's models all use 64-wide heads (`head_width`).
    """
    for key in ("text_projection", "positional_embedding", "token_embedding.weight", "ln_final.weight"):
        if key not in sd:
            raise KeyError(f"not an OpenAI CLIP state dict: tensor {key!r} is missing")
    embed_dim = sd["text_projection"].shape[1]
    if "visual.proj" in sd:
        width = sd["visual.conv1.weight"].shape[0]
        patch = sd["visual.conv1.weight"].shape[-1]
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = ViTConfig(image_size=patch * grid, patch_size=patch, width=width,
                           layers=_count(sd, "visual.transformer.resblocks.", 3), heads=width // head_width,
                           mlp_dim=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0], act="quick_gelu")
    elif "visual.attnpool.positional_embedding" in sd:
        width = sd["visual.layer1.0.conv1.weight"].shape[0]
        grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        layers = tuple(_count(sd, f"visual.layer{s}.", 2) for s in (1, 2, 3, 4))
        vision = ModifiedResNetConfig(image_size=grid * 32, layers=layers, width=width, heads=width * 32 // head_width)
    else:
        raise KeyError("not an OpenAI CLIP state dict: neither visual.proj (ViT) nor visual.attnpool (ResNet) found")
    width = sd["ln_final.weight"].shape[0]
    vocab = sd["token_embedding.weight"].shape[0]
    text = TextConfig(vocab_size=vocab, context_length=sd["positional_embedding"].shape[0], width=width,
                      layers=_count(sd, "transformer.resblocks.", 2), heads=width // head_width,
                      mlp_dim=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0], act="quick_gelu",
                      eot_token_id=vocab - 1, pool="argmax")
    bias = float(sd["logit_bias"]) if "logit_bias" in sd else None
    return CLIPConfig(embed_dim=embed_dim, vision=vision, text=text, logit_bias_init=bias)


# open_clip model-config fields mmlm understands, with the values it supports for the rest.
_OC_VISION_DEFAULTS = {"patch_size": 16, "image_size": 224, "head_width": 64, "mlp_ratio": 4.0}
_OC_UNSUPPORTED = {  # field: value(s) that mean "the plain CLIP architecture"
    "ls_init_value": (None,), "patch_dropout": (0, 0.0), "attentional_pool": (False,), "attn_pooler_queries": (256,),
    "attn_pooler_heads": (8,), "no_ln_pre": (False,), "pos_embed_type": ("learnable",), "final_ln_after_pool": (False,),
    "pool_type": ("tok", "argmax"), "output_tokens": (False,), "timm_model_name": (None,), "hf_model_name": (None,),
    "embed_cls": (False,), "no_causal_mask": (False,), "proj_bias": (False,), "act_kwargs": (None, {}),
    "norm_kwargs": (None, {}), "proj_type": ("linear", None), "pad_id": (0,), "eos_id": (2, None), "hf_tokenizer_name": (None,),
    "tokenizer_kwargs": (None, {}), "tokenizer_mode": (None,), "custom_text": (False, True),
}


def _check_open_clip_fields(section: dict[str, Any], known: set[str], where: str) -> None:
    for key, value in section.items():
        if key in known:
            continue
        if key in _OC_UNSUPPORTED and value in _OC_UNSUPPORTED[key]:
            continue
        raise ValueError(f"open_clip config {where}.{key} = {value!r} is not supported by mmlm's CLIP")


def config_from_open_clip(oc: dict[str, Any]) -> CLIPConfig:
    """An open_clip model-config JSON (`{"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"}`) -> CLIPConfig."""
    act = "quick_gelu" if oc.get("quick_gelu", False) else "gelu"
    v, t = dict(oc.get("vision_cfg", {})), dict(oc.get("text_cfg", {}))
    _check_open_clip_fields({k: x for k, x in oc.items() if k not in ("vision_cfg", "text_cfg")},
                            {"embed_dim", "quick_gelu", "init_logit_scale", "init_logit_bias", "cast_dtype"}, "")
    _check_open_clip_fields(v, {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size"}, "vision_cfg")
    _check_open_clip_fields(t, {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}, "text_cfg")
    vv = {**_OC_VISION_DEFAULTS, **v}
    width = vv.get("width", 768)
    if isinstance(vv.get("layers", 12), (list, tuple)):
        vision = ModifiedResNetConfig(image_size=vv["image_size"], layers=tuple(vv["layers"]), width=width or 64,
                                      heads=(width or 64) * 32 // vv["head_width"])
    else:
        vision = ViTConfig(image_size=vv["image_size"], patch_size=vv["patch_size"], width=width, layers=vv.get("layers", 12),
                           heads=width // vv["head_width"], mlp_dim=int(width * vv["mlp_ratio"]), act=act)
    tw = t.get("width", 512)
    vocab = t.get("vocab_size", 49408)
    text = TextConfig(vocab_size=vocab, context_length=t.get("context_length", 77), width=tw, layers=t.get("layers", 12),
                      heads=t.get("heads", 8), mlp_dim=int(tw * t.get("mlp_ratio", 4.0)), act=act,
                      eot_token_id=vocab - 1, pool="argmax")
    bias = oc.get("init_logit_bias")
    return CLIPConfig(embed_dim=oc.get("embed_dim", 512), vision=vision, text=text, logit_bias_init=bias)
