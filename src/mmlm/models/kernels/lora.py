"""A LoRA linear layer's forward: the formula, and a training path in one output buffer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .casts import matmul_dtype, weight_in
from .switch import reference


def lora_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                          b: torch.Tensor, scale: float) -> torch.Tensor:
    """x W^T + b + s (x A^T) B^T: the frozen layer plus its low-rank update (A (r, in), B (out, r))."""
    return F.linear(x, weight, bias) + F.linear(F.linear(x, a), b * scale)


def lora_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`lora_linear_reference` of a LoRALinear `layer`'s tensors, as one autograd function (`_LoRAFn`) with the
    frozen weight cast once for autocast and reused (`weight_in`)."""
    if reference():
        return lora_linear_reference(x, layer.weight, layer.bias, layer.lora_a, layer.lora_b, layer.scale)
    dtype = matmul_dtype(x, x.dtype)
    return _LoRAFn.apply(x, weight_in(layer, layer.weight, dtype), layer.bias, layer.lora_a, layer.lora_b, layer.scale)


class _LoRAFn(torch.autograd.Function):
    """y = x W^T + b + (x A^T)(s B)^T in the dtype of W (autocast's: W arrives cast), written into one buffer.

    Autograd through the same expression copies the layer's whole output once more (addmm's result) and adds
    two full-width gradients of x (the base path's and the update's); here dx = dy W, then += (dy s B) A in
    place, and y likewise. A frozen W (the usual case) gets no gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scale: float) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(weight.dtype)
        y, xa, a_t, sb_t = lora_forward(x2, weight, bias, a, b, scale)
        ctx.save_for_backward(x2, xa, weight, a_t, sb_t)
        ctx.scale, ctx.dtypes = scale, (x.dtype, None if bias is None else bias.dtype, a.dtype, b.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, xa, weight, a_t, sb_t = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).to(weight.dtype)
        x_dtype, bias_dtype, a_dtype, b_dtype = ctx.dtypes
        dx, da, db, dbias = lora_backward(dy2, x2, xa, weight, a_t, sb_t, ctx.scale, (bias_dtype, a_dtype, b_dtype),
                                          ctx.needs_input_grad[2])
        dw = dy2.t() @ x2 if ctx.needs_input_grad[1] else None
        return dx.view(*dy.shape[:-1], dx.shape[-1]).to(x_dtype), dw, dbias, da, db, None


def lora_forward(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
                 scale: float) -> tuple[torch.Tensor, ...]:
    """x2 (N, in) in W's dtype -> y = x2 W^T + b + (x2 A^T)(s B)^T (N, out) in one buffer, and what the backward
    needs besides x2: x2 A^T (N, r), A and s B in W's dtype."""
    dtype = weight.dtype
    a_t, sb_t = a.to(dtype), (b * scale).to(dtype)
    xa = x2 @ a_t.t()  # (N, r)
    y = x2 @ weight.t() if bias is None else torch.addmm(bias.to(dtype), x2, weight.t())
    y.addmm_(xa, sb_t.t())
    return y, xa, a_t, sb_t


def lora_backward(dy2: torch.Tensor, x2: torch.Tensor, xa: torch.Tensor, weight: torch.Tensor, a_t: torch.Tensor,
                  sb_t: torch.Tensor, scale: float, dtypes: tuple, bias_grad: bool) -> tuple[torch.Tensor | None, ...]:
    """dy2 (N, out) -> dx2 = dy W + (dy s B) A (in place), dA, dB and (when `bias_grad`) d bias, in `dtypes`
    (bias, A, B); W's own gradient is the caller's."""
    bias_dtype, a_dtype, b_dtype = dtypes
    dxa = dy2 @ sb_t  # (N, r)
    dx = dy2 @ weight
    dx.addmm_(dxa, a_t)
    da = (dxa.t() @ x2).to(a_dtype)
    db = (dy2.t() @ xa).to(b_dtype).mul_(scale)
    dbias = dy2.sum(0, dtype=bias_dtype) if bias_grad else None
    return dx, da, db, dbias
