"""The MLPs' activations: quick_gelu, CLIP's two-layer MLP with it, and SwiGLU's gate."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .switch import reference


def quick_gelu_reference(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU (the original checkpoints were trained with it): x sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """`quick_gelu_reference`'s values as silu(1.702 x) / 1.702, whose fused kernel and backward make three passes
    over the tensor each way instead of three and five (same values to float rounding; measured 1.5x faster)."""
    if reference():
        return quick_gelu_reference(x)
    return F.silu(x * 1.702) * (1 / 1.702)


def mlp(x: torch.Tensor, fc1: nn.Module, act, fc2: nn.Module) -> torch.Tensor:
    """fc2(act(fc1(x))). With quick_gelu between two plain biased linears, both 1.702 scalings ride inside the
    matmuls instead of making passes over the (..., hidden) activations: two fewer forward and two backward."""
    if reference() or act is not quick_gelu or not (_plain_with_bias(fc1) and _plain_with_bias(fc2)):
        return fc2(act(fc1(x)))
    x2 = x.flatten(0, -2)
    if torch.is_grad_enabled():  # on the weights: addmm's alpha and beta would scale whole gradients
        h = torch.addmm(fc1.bias * 1.702, x2, (fc1.weight * 1.702).t())
        y = torch.addmm(fc2.bias, F.silu(h), (fc2.weight * (1 / 1.702)).t())
    else:  # as addmm's alpha and beta: free in the matmul, no scaled copy of the weights per call
        h = torch.addmm(fc1.bias, x2, fc1.weight.t(), beta=1.702, alpha=1.702)
        y = torch.addmm(fc2.bias, F.silu(h, inplace=True), fc2.weight.t(), alpha=1 / 1.702)
    return y.view(*x.shape[:-1], y.shape[-1])


def _plain_with_bias(linear: nn.Module) -> bool:
    """An nn.Linear itself (not a LoRA or quantized replacement, whose forward does more) with a bias."""
    return type(linear) is nn.Linear and linear.bias is not None


def swiglu_reference(z: torch.Tensor, hidden: int, act) -> torch.Tensor:
    """act(gate) * up for z = [gate, up] (..., 2 hidden) -> (..., hidden)."""
    gate, up = z.split(hidden, dim=-1)
    return act(gate) * up


def swiglu(z: torch.Tensor, hidden: int, act) -> torch.Tensor:
    """`swiglu_reference`'s values; while training with silu, one autograd function (`_SiluGate`)."""
    if not reference() and act is F.silu and torch.is_grad_enabled() and z.requires_grad:
        return _SiluGate.apply(z, hidden)
    return swiglu_reference(z, hidden, act)


class _SiluGate(torch.autograd.Function):
    """silu(gate) * up of z = [gate, up], whose backward writes d gate and d up straight into one (..., 2 hidden)
    gradient: through `split`, autograd makes the two halves and then concatenates them (a copy of the MLP's
    widest activation per layer)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, hidden: int) -> torch.Tensor:
        gate, up = z.split(hidden, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(z, act)
        ctx.hidden = hidden
        return act * up

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        z, act = ctx.saved_tensors
        gate, up = z.split(ctx.hidden, dim=-1)
        dz = torch.empty_like(z)
        d_gate, d_up = dz.split(ctx.hidden, dim=-1)
        torch.mul(dy, act, out=d_up)
        torch.ops.aten.silu_backward.grad_input(dy * up, gate, grad_input=d_gate)
        return dz, None
