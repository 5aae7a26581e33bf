"""transformers `LlamaForCausalLM` / `Qwen2ForCausalLM` <-> mmlm LM: config fields and tensor names."""

from __future__ import annotations

from typing import Any

import torch

from ..config import LMConfig
from .mapping import Rule, rename

MODEL_TYPES = ("llama", "qwen2")
_HF_ACT = {"silu": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
_ACT_HF = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}

_L, _T = "blocks.{i}", "model.layers.{i}"
RULES: list[Rule] = [
    Rule("embed.weight", "model.embed_tokens.weight"),
    Rule(f"{_L}.norm1.weight", f"{_T}.input_layernorm.weight"),
    *[Rule(f"{_L}.attn.qkv.{p}", tuple(f"{_T}.self_attn.{x}_proj.{p}" for x in "qkv")) for p in ("weight", "bias")],
    *[Rule(f"{_L}.attn.proj.{p}", f"{_T}.self_attn.o_proj.{p}") for p in ("weight", "bias")],
    Rule(f"{_L}.norm2.weight", f"{_T}.post_attention_layernorm.weight"),
    *[Rule(f"{_L}.mlp.fc1.{p}", (f"{_T}.mlp.gate_proj.{p}", f"{_T}.mlp.up_proj.{p}")) for p in ("weight", "bias")],
    *[Rule(f"{_L}.mlp.fc2.{p}", f"{_T}.mlp.down_proj.{p}") for p in ("weight", "bias")],
    Rule("norm.weight", "model.norm.weight"),
    Rule("lm_head.weight", "lm_head.weight"),
]


def _rope_params(hf: dict[str, Any]) -> tuple[float, dict | None]:
    """(rope_theta, scaling) from transformers 5's `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
    params = hf.get("rope_parameters") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or params or None
    return float(theta), (dict(scaling) if scaling else None)


def config_from_hf(hf: dict[str, Any]) -> LMConfig:
    """An HF Llama/Qwen2 config.json dict -> LMConfig."""
    mt = hf.get("model_type")
    if mt not in MODEL_TYPES:
        raise ValueError(f"expected a transformers causal LM of model_type {MODEL_TYPES}, got {mt!r}")
    if hf.get("use_sliding_window"):
        raise ValueError("Qwen2 sliding-window attention (use_sliding_window: true) is not supported")
    act = hf.get("hidden_act", "silu")
    if act not in _HF_ACT:
        raise ValueError(f"hidden_act {act!r} is not supported; known: {sorted(_HF_ACT)}")
    theta, scaling = _rope_params(hf)
    heads = hf["num_attention_heads"]
    attention_bias = bool(hf.get("attention_bias", False))
    eos = hf.get("eos_token_id")
    return LMConfig(
        vocab_size=hf["vocab_size"], width=hf["hidden_size"], layers=hf["num_hidden_layers"], heads=heads,
        kv_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        mlp_dim=hf["intermediate_size"], act=_HF_ACT[act], norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta, rope_scaling=scaling, max_seq_len=hf.get("max_position_embeddings", 2048),
        qkv_bias=True if mt == "qwen2" else attention_bias, out_bias=False if mt == "qwen2" else attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=eos,
    )


def config_to_hf(cfg: LMConfig) -> dict[str, Any]:
    """LMConfig -> a config.json transformers reads: Qwen2 when only q/k/v carry biases, else Llama."""
    qwen2 = cfg.qkv_bias and not cfg.out_bias
    if cfg.qkv_bias != cfg.out_bias and not qwen2:
        raise ValueError("an output-projection bias without q/k/v biases has no transformers form")
    if qwen2 and cfg.mlp_bias:
        raise ValueError("transformers' Qwen2 has no MLP biases: this model cannot export as Qwen2")
    rope = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}
    eos = cfg.eos_token_id
    out = {
        "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen2 else "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.width, "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.mlp_dim, "hidden_act": _ACT_HF[cfg.act], "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len, "rope_parameters": rope, "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling, "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": eos[0] if eos and len(eos) == 1 else eos,
        "torch_dtype": "float32", "dtype": "float32",
    }
    if not qwen2:
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    return out


def _split_sizes(cfg: LMConfig):
    def sizes(rule: Rule, t: torch.Tensor) -> list[int]:
        if ".attn.qkv." in rule.ours:
            kv = cfg.kv_heads * cfg.head_dim
            return [cfg.heads * cfg.head_dim, kv, kv]
        return [t.shape[0] // 2] * 2
    return sizes


def state_dict_from_hf(sd: dict[str, torch.Tensor], cfg: LMConfig, source: str = "hf") -> dict[str, torch.Tensor]:
    if cfg.tie_embeddings:  # some checkpoints store the tied head anyway
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    return rename(sd, RULES, "to_ours", source, ignore=lambda n: n.endswith("rotary_emb.inv_freq"))


def state_dict_to_hf(sd: dict[str, torch.Tensor], cfg: LMConfig) -> dict[str, torch.Tensor]:
    return rename(sd, RULES, "to_theirs", "mmlm", split_sizes=_split_sizes(cfg))
