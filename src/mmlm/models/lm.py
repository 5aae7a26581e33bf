"""A Llama-family decoder-only language model (Llama 1-3, SmolLM2, Qwen2).

Reference: transformers' `LlamaForCausalLM` / `Qwen2ForCausalLM`; logits equal theirs (tests/test_lm_hf_parity.py).
Built from the shared layers: the same `Attention` and `Block` as CLIP, with RMSNorm, SwiGLU and rotary
positions plugged in.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import nn

from ..config import LMConfig
from .attention import Attention
from .blocks import Block, RMSNorm, SwiGLU
from .kernels import head_logits, next_token_loss
from .kernels.decode import decode_step as fused_decode_step
from .positions import KVCache, rope_cos_sin, rope_inv_freq


@dataclass
class LMOutput:
    logits: torch.Tensor | None  # (B, T, V) next-token logits (None when `token_loss` was asked for instead)
    token_loss: torch.Tensor | None = None  # (N,) cross-entropy of each target (`forward(targets=)`)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) 1 = real token -> (B, S) positions counted over real tokens only (left padding starts each row at 0).

    transformers' `generate` numbers positions the same way (padded slots get a dummy position).
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


class LM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.width)
        norm = partial(RMSNorm, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(
            Block(cfg.width,
                  Attention(cfg.width, cfg.heads, cfg.kv_heads, cfg.head_dim, qkv_bias=cfg.qkv_bias, out_bias=cfg.out_bias),
                  SwiGLU(cfg.width, cfg.mlp_dim, cfg.act, bias=cfg.mlp_bias), norm)
            for _ in range(cfg.layers)
        )
        self.norm = norm(cfg.width)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_state_dict_post_hook(self._drop_tied)
        self.register_load_state_dict_pre_hook(self._restore_tied)
        # Not a parameter and not saved: it follows from the config.
        self.register_buffer("inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), persistent=False)
        self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        """transformers' Llama init: N(0, 0.02) for every matrix, zero biases, unit norms."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    @staticmethod
    def _drop_tied(module: "LM", state_dict: dict, prefix: str, local_metadata: dict) -> None:
        """Tied embeddings are stored once, as `embed.weight` (as transformers does)."""
        if module.config.tie_embeddings:
            state_dict.pop(prefix + "lm_head.weight", None)

    @staticmethod
    def _restore_tied(module: "LM", state_dict: dict, prefix: str, *args) -> None:
        if module.config.tie_embeddings and prefix + "embed.weight" in state_dict:
            state_dict.setdefault(prefix + "lm_head.weight", state_dict[prefix + "embed.weight"])

    @property
    def max_seq_len(self) -> int:
        return self.config.max_seq_len

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty key/value cache for `batch` sequences of up to `max_len` tokens, in the model's dtype."""
        cfg, w = self.config, self.embed.weight
        return KVCache.empty(cfg.layers, batch, cfg.kv_heads, max_len, cfg.head_dim, w.dtype, w.device)

    def decode_step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, key_mask: torch.Tensor,
                    cache: KVCache, slot: int | torch.Tensor,
                    before_block: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """One generation step: the same computation as `forward` for one new token per row, without its checks.

        input_ids, position_ids (B, 1); key_mask (B, S) bool over every cache slot, True for the real tokens
        (this one included); slot: where this token's keys/values go. Returns logits (B, V); `cache.pos` is
        left to the caller. With slot an int, attention reads the filled slots only (fastest eagerly); with
        slot a (1,) LongTensor it reads the whole preallocated cache with the empty slots masked, so no shape
        changes between steps and `torch.compile` traces the step once. `before_block` as in `forward`.
        """
        if before_block is None and not torch.compiler.is_compiling():  # a quantized LM: each block one compiled call
            logits = fused_decode_step(self, input_ids, position_ids, key_mask, cache, slot)
            if logits is not None:
                return logits
        x = self.embed(input_ids)  # (B, 1, C)
        rope = rope_cos_sin(self.inv_freq, position_ids, x.dtype)
        if not isinstance(slot, torch.Tensor):
            key_mask = key_mask[:, : slot + 1]
        mask = key_mask[:, None, None, :]  # (B, 1, 1, S)
        for i, block in enumerate(self.blocks):
            if before_block is not None:
                x = before_block(i, x)
            x = block(x, attn_mask=mask, rope=rope, cache=(cache.k[i], cache.v[i], slot))
        return self.lm_head(self.norm(x))[:, -1]

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                cache: KVCache | None = None, only_last: bool = False,
                logits_at: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                before_block: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> LMOutput:
        """input_ids (B, T) (or inputs_embeds (B, T, C)) -> logits (B, T, V).

        attention_mask (B, S), 1 = real token, covers the cached tokens too (S = cache.pos + T); padding
        may be on either side. Without position_ids, positions count real tokens only. With `cache`, the
        new keys/values are written at cache.pos and cache.pos advances by T. `only_last` computes the
        logits of the last position only (B, 1, V): all that generation needs after a prefill. `logits_at`
        (B, T) bool computes them only where it is True, (N, V) in row-major order: training needs them only
        where a learned token is predicted, and the vocabulary projection is the costliest matmul of a small LM.
        With `targets` (N,) beside `logits_at`, no logits come back but each target's cross-entropy, `token_loss`
        (N,), computed without materialising float32 logits (see `kernels.next_token_loss`). `before_block(i, x)`
        may change the states before block i (Flamingo's gated cross-attention, models/flamingo.py).
        """
        if targets is not None and (logits_at is None or only_last):
            raise ValueError("targets need logits_at (the positions they are predicted from), without only_last")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        B, T, _ = x.shape
        start = cache.pos if cache is not None else 0
        S = start + T
        if cache is not None and S > cache.max_len:
            raise ValueError(f"{S} tokens do not fit the key/value cache of {cache.max_len}")
        if attention_mask is not None and attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, S)} "
                             f"(cached + new tokens)")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = position_ids_from_mask(attention_mask)[:, start:]
            else:
                position_ids = torch.arange(start, S, device=x.device).expand(B, T)
        rope = rope_cos_sin(self.inv_freq, position_ids, x.dtype)

        mask, is_causal = None, cache is None or start == 0
        if T == 1 and attention_mask is not None and not bool(attention_mask.all()) and bool(attention_mask[:, -1].all()):
            # the decoding step: one new real token per row after cached ones; it sees every real key (B, 1, 1, S)
            mask = attention_mask.bool()[:, None, None, :]
        elif attention_mask is not None and not bool(attention_mask.all()):
            # (B, 1, T, S): causal, padded keys hidden; a padded query still sees itself (no empty softmax rows).
            q_pos = torch.arange(start, S, device=x.device)[:, None]
            k_pos = torch.arange(S, device=x.device)[None, :]
            mask = (k_pos <= q_pos) & attention_mask.bool()[:, None, None, :]
            mask = mask | (k_pos == q_pos)
        elif not is_causal and T > 1:  # new tokens after cached ones: causal with an offset
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(start)
        for i, block in enumerate(self.blocks):
            if before_block is not None:
                x = before_block(i, x)
            layer_cache = (cache.k[i], cache.v[i], start) if cache is not None else None
            x = block(x, attn_mask=mask, is_causal=is_causal, rope=rope, cache=layer_cache)
        if cache is not None:
            cache.pos = S
        if only_last:
            x = x[:, -1:]
        elif logits_at is not None:
            x = x[logits_at]  # (N, C): only the positions where a token is predicted
            if targets is not None:  # (N,) cross-entropy of each target, no float32 logits kept
                return LMOutput(logits=None, token_loss=next_token_loss(self.norm, self.lm_head, x, targets))
            return LMOutput(logits=head_logits(self.norm, self.lm_head, x))  # (N, V)
        return LMOutput(logits=self.lm_head(self.norm(x)))
