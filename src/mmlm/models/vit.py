"""CLIP's Vision Transformer (matches OpenAI `VisionTransformer` and transformers' `CLIPVisionTransformer`)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import ViTConfig
from .blocks import Transformer
from .kernels import patch_embed, pooled


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig, embed_dim: int | None):
        """embed_dim None builds the tower without CLIP's output projection (LLaVA reads patch tokens only)."""
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.patch_embed = nn.Conv2d(cfg.in_channels, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(w))
        self.pos_embed = nn.Parameter(torch.zeros(cfg.num_patches + 1, w))
        self.norm_pre = nn.LayerNorm(w, eps=cfg.norm_eps)
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_dim, cfg.act, cfg.norm_eps)
        self.norm_post = nn.LayerNorm(w, eps=cfg.norm_eps)
        self.proj = nn.Linear(w, embed_dim, bias=False) if embed_dim is not None else None

    def init_weights(self) -> None:
        """OpenAI's init: embeddings and projection ~ N(0, width^-1/2) (positions: `pos_init_std` when set); blocks as
        nn.MultiheadAttention leaves them."""
        scale = self.cfg.width**-0.5
        nn.init.normal_(self.class_embedding, std=scale)
        nn.init.normal_(self.pos_embed, std=self.cfg.pos_init_std or scale)
        if self.proj is not None:
            nn.init.normal_(self.proj.weight, std=scale)
        self.transformer.init_torch_mha()

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1 + L, width): a class token, then one token per p x p patch, plus positions, ln_pre."""
        if pixel_values.shape[-2:] != (self.cfg.image_size, self.cfg.image_size):
            raise ValueError(f"pixel_values are {tuple(pixel_values.shape[-2:])}, the model expects "
                             f"{self.cfg.image_size}x{self.cfg.image_size}")
        x = patch_embed(pixel_values, self.patch_embed)  # (B, L, w): a stride-p convolution
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed.to(x.dtype)  # (B, 1 + L, w)
        return self.norm_pre(x)

    def forward_tokens(self, pixel_values: torch.Tensor, hidden_states: list[torch.Tensor] | None = None,
                       upto: int | None = None) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1 + L, width): every token after the last block (before norm_post).

        Pass a list as `hidden_states` to collect the input of the first block (after ln_pre) and each
        block's output, like transformers' `output_hidden_states` (LLaVA reads layer -2 from it); `upto`
        stops after that many blocks.
        """
        return self.transformer(self.embed(pixel_values), hidden_states=hidden_states, upto=upto)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, embed_dim): the class token after the last block, normalised and projected."""
        x = self.embed(pixel_values)  # (B, 1 + L, w)
        cls = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # the class token is token 0 of each row
        x = self.norm_post(pooled(self.transformer, x, rows=cls))  # (B, w)
        return x if self.proj is None else self.proj(x)
