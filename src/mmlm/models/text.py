"""CLIP's text Transformer (matches OpenAI `CLIP.encode_text` and transformers' `CLIPTextTransformer`)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import TextConfig
from .blocks import Transformer
from .kernels import pooled


class TextTransformer(nn.Module):
    """`embed_dim` None: no projection, the token states (`forward_tokens`) are the output (a text-to-image
    model's encoder, transformers' CLIPTextModel)."""

    def __init__(self, cfg: TextConfig, embed_dim: int | None):
        super().__init__()
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_dim, cfg.act, cfg.norm_eps)
        self.norm_final = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False) if embed_dim is not None else None

    def init_weights(self) -> None:
        """OpenAI's init for the text side."""
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        self.transformer.init_openai()
        if self.proj is not None:
            nn.init.normal_(self.proj.weight, std=self.cfg.width**-0.5)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, width): token embeddings plus learned positions."""
        T = input_ids.shape[1]
        if T > self.cfg.context_length:
            raise ValueError(f"input_ids have {T} tokens, more than the context length {self.cfg.context_length}")
        return self.token_embed(input_ids) + self.pos_embed[:T]

    @staticmethod
    def causal_mask(attention_mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
        """None (plain causal attention), or with a padding mask (B, T) (1 = real token) the (B, 1, T, T) mask:
        causal, padded keys hidden as transformers does, and a padded query still sees itself."""
        if attention_mask is None:
            return None
        device = attention_mask.device
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        mask = causal & attention_mask.bool()[:, None, None, :]  # (B, 1, T, T)
        return mask | torch.eye(T, dtype=torch.bool, device=device)

    def forward_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, width) after the final LayerNorm.

        Attention is causal, so right padding never changes the tokens before it; `attention_mask`
        (B, T, 1 = real token) additionally hides padded keys, as transformers does.
        """
        mask = self.causal_mask(attention_mask, input_ids.shape[1])
        x = self.transformer(self.embed(input_ids), attn_mask=mask, is_causal=mask is None)  # (B, T, w)
        return self.norm_final(x)

    def pool_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B,) position of each row's end-of-text token."""
        if self.cfg.pool == "argmax":
            return input_ids.argmax(dim=-1)
        is_eot = input_ids == self.cfg.eot_token_id
        missing = ~is_eot.any(dim=-1)
        if missing.any():
            rows = missing.nonzero().flatten().tolist()
            raise ValueError(f"input_ids rows {rows[:10]} contain no end-of-text token (id {self.cfg.eot_token_id})")
        return is_eot.int().argmax(dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) -> (B, embed_dim): the end-of-text token's features after the last block, normalised, projected.

        (The tokens after a row's end-of-text token reach no pooled feature, attention being causal: the fast
        path of `pooled` skips them, and packs the rest when the captions leave much padding.)
        """
        if self.proj is None:
            raise ValueError("this text tower has no projection (embed_dim None): read its token states with forward_tokens")
        eot = self.pool_index(input_ids)  # (B,)
        mask = self.causal_mask(attention_mask, input_ids.shape[1])
        x = pooled(self.transformer, self.embed(input_ids), rows=eot, attn_mask=mask, is_causal=mask is None,
                   causal_model=True)  # (B, w)
        return self.proj(self.norm_final(x))
