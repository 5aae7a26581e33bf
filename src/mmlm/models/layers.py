"""The building blocks every mmlm model shares: one attention, one MLP, one pre-norm residual block.

CLIP's vision and text towers, the ResNet attention pool and the decoder LLM all use these; there is
no second attention anywhere in the package.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU (the original checkpoints were trained with it)."""
    return x * torch.sigmoid(1.702 * x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACT_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,
    "gelu_tanh": gelu_tanh,
    "silu": F.silu,
}


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
           is_causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v for (B, H, T, d) tensors.

    PyTorch's fused CPU kernel is fast forward but its backward is slow at CLIP-sized sequences (measured:
    a small CLIP trained ~2x faster with plain matmuls), so while training on a CPU the same maths runs
    as three plain ops; everywhere else (inference, GPUs) the fused kernel does.
    """
    if not (q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, T, S)
    if is_causal:
        T, S = scores.shape[-2:]
        attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return scores.softmax(dim=-1).to(v.dtype) @ v


class Attention(nn.Module):
    """Multi-head scaled-dot-product attention with a fused q/k/v projection.

    `n_kv_heads < n_heads` gives grouped-query attention (each k/v head serves n_heads // n_kv_heads
    query heads). The fused weight stacks [q; k; v] row-wise, the layout of OpenAI's `in_proj_weight`.
    `out_dim` lets the output projection change width (CLIP's ResNet attention pool projects to the
    embedding size).
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None = None, head_dim: int | None = None,
                 qkv_bias: bool = True, out_bias: bool = True, out_dim: int | None = None):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        if n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        self.head_dim = head_dim or dim // n_heads
        self.q_dim = n_heads * self.head_dim
        self.kv_dim = self.n_kv_heads * self.head_dim
        self.qkv = nn.Linear(dim, self.q_dim + 2 * self.kv_dim, bias=qkv_bias)
        self.proj = nn.Linear(self.q_dim, out_dim or dim, bias=out_bias)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """x: (B, T, C); attn_mask: bool (True = may attend) or additive float, broadcastable to (B, H, T, T)."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.q_dim, self.kv_dim, self.kv_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = attend(q, k, v, attn_mask, is_causal and attn_mask is None)
        y = y.transpose(1, 2).reshape(B, T, self.q_dim)  # (B, T, H*hd)
        return self.proj(y)


class MLP(nn.Module):
    """Two linear layers with an activation between (CLIP's c_fc / c_proj)."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu", bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = ACT_FNS[act]
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, attn: Attention, mlp: nn.Module, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.norm1 = norm(dim)
        self.attn = attn
        self.norm2 = norm(dim)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of LayerNorm/GELU-MLP blocks: the trunk of both CLIP towers."""

    def __init__(self, width: int, layers: int, heads: int, mlp_dim: int, act: str, norm_eps: float):
        super().__init__()
        self.width = width
        self.blocks = nn.ModuleList(
            Block(width, Attention(width, heads), MLP(width, mlp_dim, act), lambda d: nn.LayerNorm(d, eps=norm_eps))
            for _ in range(layers)
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                hidden_states: list[torch.Tensor] | None = None) -> torch.Tensor:
        """x: (B, T, C). When `hidden_states` is a list, the input and each block's output are appended."""
        if hidden_states is not None:
            hidden_states.append(x)
        for block in self.blocks:
            x = block(x, attn_mask=attn_mask, is_causal=is_causal)
            if hidden_states is not None:
                hidden_states.append(x)
        return x

    def init_openai(self) -> None:
        """OpenAI CLIP's text-transformer init: std shrinks with depth for the residual projections."""
        proj_std = self.width**-0.5 * (2 * len(self.blocks)) ** -0.5
        attn_std = self.width**-0.5
        fc_std = (2 * self.width) ** -0.5
        for b in self.blocks:
            nn.init.normal_(b.attn.qkv.weight, std=attn_std)
            nn.init.normal_(b.attn.proj.weight, std=proj_std)
            nn.init.normal_(b.mlp.fc1.weight, std=fc_std)
            nn.init.normal_(b.mlp.fc2.weight, std=proj_std)

    def init_torch_mha(self) -> None:
        """The init nn.MultiheadAttention gives (OpenAI's vision transformer is left at it)."""
        for b in self.blocks:
            nn.init.xavier_uniform_(b.attn.qkv.weight)
            nn.init.zeros_(b.attn.qkv.bias)
            nn.init.zeros_(b.attn.proj.bias)
