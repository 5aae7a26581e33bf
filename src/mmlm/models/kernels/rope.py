"""Rotary position embedding applied to q and k: the formula, and a training path with its own backward."""

from __future__ import annotations

import torch

from .switch import reference


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i+d/2}) pair by its angle (the half-split layout of transformers' Llama):
    x cos + rotate_half(x) sin, rotate_half(x) = [-x2, x1]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope_reference`'s values; while training, one autograd function (`_Rotate`)."""
    if not reference() and torch.is_grad_enabled() and x.requires_grad:
        return _Rotate.apply(x, cos, sin)
    return apply_rope_reference(x, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotation in three passes over x (a product, then one fused multiply-add per half), in x's dtype."""
    h = x.shape[-1] // 2
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    out = x * cos
    out[..., :h].addcmul_(x[..., h:], sin[..., :h], value=-1)
    out[..., h:].addcmul_(x[..., :h], sin[..., h:])
    return out


class _Rotate(torch.autograd.Function):
    """Rotary embedding with its own backward: a rotation's gradient is the inverse rotation (sin negated), one
    more `_rotate`, where autograd would replay the negation, concatenation, products and sum op by op
    (measured: rotary positions took ~1/8 of a SmolLM2 LLaVA training step; q and k stay in the projection's
    dtype instead of being promoted to float32 by the float32 cos/sin)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None
