"""LoRA (Hu et al. 2021): a frozen linear layer plus a trainable low-rank update, W + (alpha / r) * B A.

`LoRALinear` is an `nn.Linear` (same `weight`/`bias` names, so a checkpoint's other tensors keep their
names) with two extra parameters `lora_a` (r, in) and `lora_b` (out, r). B starts at zero, so adding
LoRA leaves the model's outputs unchanged. `merge_lora` folds the update into the weights (for export).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers import matmul_dtype, weight_in


class LoRALinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int, alpha: float):
        super().__init__(in_features, out_features, bias=bias)
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = matmul_dtype(x, x.dtype)
        return _LoRAFn.apply(x, weight_in(self, self.weight, dtype), self.bias, self.lora_a, self.lora_b, self.scale)

    def merged_weight(self) -> torch.Tensor:
        return self.weight + self.scale * (self.lora_b @ self.lora_a)


class _LoRAFn(torch.autograd.Function):
    """y = x W^T + b + (x A^T)(s B)^T in the dtype of W (autocast's: W arrives cast), written into one buffer.

    Autograd through the same expression copies the layer's whole output once more (addmm's result) and adds
    two full-width gradients of x (the base path's and the update's); here dx = dy W, then += (dy s B) A in
    place, and y likewise. A frozen W (the usual case) gets no gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scale: float) -> torch.Tensor:
        dtype = weight.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        a_t, sb_t = a.to(dtype), (b * scale).to(dtype)
        xa = x2 @ a_t.t()  # (N, r)
        y = x2 @ weight.t() if bias is None else torch.addmm(bias.to(dtype), x2, weight.t())
        y.addmm_(xa, sb_t.t())
        ctx.save_for_backward(x2, xa, weight, a_t, sb_t)
        ctx.scale, ctx.dtypes = scale, (x.dtype, None if bias is None else bias.dtype, a.dtype, b.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, xa, weight, a_t, sb_t = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).to(weight.dtype)
        dxa = dy2 @ sb_t  # (N, r)
        dx = dy2 @ weight
        dx.addmm_(dxa, a_t)
        x_dtype, bias_dtype, a_dtype, b_dtype = ctx.dtypes
        da = (dxa.t() @ x2).to(a_dtype)
        db = (dy2.t() @ xa).to(b_dtype).mul_(ctx.scale)
        dw = dy2.t() @ x2 if ctx.needs_input_grad[1] else None
        dbias = dy2.sum(0, dtype=bias_dtype) if ctx.needs_input_grad[2] else None
        return dx.view(*dy.shape[:-1], dx.shape[-1]).to(x_dtype), dw, dbias, da, db, None


def add_lora(module: nn.Module, rank: int, alpha: float) -> None:
    """Replace every nn.Linear under `module` by a LoRALinear holding the same weights (in place)."""
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            lora = LoRALinear(child.in_features, child.out_features, child.bias is not None, rank, alpha)
            lora.to(child.weight.device, child.weight.dtype)
            with torch.no_grad():
                lora.weight.copy_(child.weight)
                if child.bias is not None:
                    lora.bias.copy_(child.bias)
            setattr(module, name, lora)
        else:
            add_lora(child, rank, alpha)


def merge_lora(state_dict: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A state dict with each `X.lora_a`/`X.lora_b` pair folded into `X.weight` and removed."""
    out = {k: v for k, v in state_dict.items() if not k.endswith((".lora_a", ".lora_b"))}
    for k, a in state_dict.items():
        if k.endswith(".lora_a"):
            prefix = k[: -len(".lora_a")]
            b = state_dict[prefix + ".lora_b"]
            out[prefix + ".weight"] = state_dict[prefix + ".weight"] + scale * (b.float() @ a.float()).to(a.dtype)
    return out
