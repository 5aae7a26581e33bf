"""The one attention of every mmlm model: CLIP's towers, the ResNet attention pool and the decoder LLM (`Attention`);
the UNet's text and Flamingo's media reach their queries through `CrossAttention`, the same kernel."""

from __future__ import annotations

import torch
from torch import nn

from .kernels import apply_rope, attention, linear
from .positions import write_cache


class Attention(nn.Module):
    """Multi-head scaled-dot-product attention with a fused q/k/v projection (Vaswani et al. 2017).

    `n_kv_heads < n_heads` gives grouped-query attention (each k/v head serves n_heads // n_kv_heads
    query heads). The fused weight stacks [q; k; v] row-wise, the layout of OpenAI's `in_proj_weight`.
    `out_dim` lets the output projection change width (CLIP's ResNet attention pool projects to the
    embedding size). A decoder passes `rope` (cos, sin) to rotate q and k, and `cache` (the layer's
    k, v buffers (B, Hkv, S, hd) and the first free slot, see `positions.write_cache`) to attend over earlier
    tokens too.
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

    def heads(self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None):
        """The fused projection (B, T, (H + 2 Hkv) hd) -> q (B, H, T, hd), k and v (B, Hkv, T, hd); q and k
        rotated by `rope` (cos, sin)."""
        H, Hkv = self.n_heads, self.n_kv_heads
        qkv = qkv.unflatten(-1, (H + 2 * Hkv, self.head_dim))  # (B, T, H + 2 Hkv, hd): q, k, v heads
        # split, not slicing: its backward concatenates the gradients instead of filling a zero tensor per slice
        if rope is not None:  # q and k rotate by the same angles: one call for both heads' groups
            qk, v = qkv.split([H + Hkv, Hkv], dim=2)
            q, k = apply_rope(qk, *rope).split([H, Hkv], dim=2)
        else:
            q, k, v = qkv.split([H, Hkv, Hkv], dim=2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: tuple[torch.Tensor, torch.Tensor, int | torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, out_dim). attn_mask: bool (True = may attend) or additive float, broadcastable
        to (B, H, T, S); it already holds causality when given (is_causal then adds nothing)."""
        B, T, _ = x.shape
        q, k, v = self.heads(linear(self.qkv, x), rope)  # (B, H, T, hd), (B, Hkv, T, hd), (B, Hkv, T, hd)
        if cache is not None:
            k, v = write_cache(cache, k, v)  # (B, Hkv, S, hd): the earlier tokens' keys and values too
        y = attention(q, k, v, attn_mask, is_causal and attn_mask is None)  # softmax(q k^T / sqrt(hd) + mask) v
        return linear(self.proj, y.transpose(1, 2).reshape(B, T, self.q_dim))  # (B, T, H*hd) -> (B, T, out_dim)


class CrossAttention(nn.Module):
    """Queries from x (B, N, dim), keys and values from a context (B, S, context_dim): softmax(q k^T / sqrt(hd)) v
    per head, through the same attention kernel. k and v are one fused matmul. Stable Diffusion's UNet attends
    from image positions to the text states; Flamingo attends from text tokens to media latents, with a mask."""

    def __init__(self, dim: int, context_dim: int, heads: int, upcast: bool = False, out_bias: bool = True):
        super().__init__()
        self.heads, self.head_dim, self.upcast = heads, dim // heads, upcast
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=out_bias)

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """context (B, S, context_dim) -> k, v (B, H, S, hd): what a fixed context gives every query (computed
        once and passed as `kv` when the same context is read again, as Flamingo's media while decoding)."""
        return linear(self.kv, context).unflatten(-1, (2 * self.heads, self.head_dim)).transpose(1, 2).chunk(2, dim=1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, attn_mask: torch.Tensor | None = None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, N, dim), context (B, S, context_dim) (or its `keys_values`) -> (B, N, dim); attn_mask bool
        (True = may attend), broadcastable to (B, H, N, S)."""
        B, N, D = x.shape
        q = linear(self.q, x).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)  # (B, H, N, hd)
        k, v = self.keys_values(context) if kv is None else kv  # (B, H, S, hd)
        if self.upcast and q.dtype in (torch.float16, torch.bfloat16):
            y = attention(q.float(), k.float(), v.float(), attn_mask).to(q.dtype)
        else:
            y = attention(q, k, v, attn_mask)  # (B, H, N, hd)
        return linear(self.proj, y.transpose(1, 2).reshape(B, N, D))
