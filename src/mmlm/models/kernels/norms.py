"""RMSNorm: the formula (transformers' LlamaRMSNorm), and the fast inference and training paths."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import native
from .casts import matmul_dtype
from .switch import cpu_path, reference


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps), the normalisation in float32 (at least), cast back to x's dtype."""
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`rms_norm_reference`'s values. Training: one autograd function (PyTorch's CPU rms_norm is a chain of ops,
    each differentiated on its own), its output already in the dtype the next matmul casts it to under autocast.
    Inference, and training on a GPU: PyTorch's fused op (one kernel there, differentiated as one); inference in
    float32 on a CPU: the compiled loop of `native.py`."""
    if reference():
        return rms_norm_reference(x, weight, eps)
    if cpu_path(x) and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNormFn.apply(x, weight, eps, matmul_dtype(x, x.dtype))
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        if (cpu_path(x) and x.is_contiguous() and weight.is_contiguous() and not torch.compiler.is_compiling()
                and native.kernels() is not None):
            return native.rms_norm(x, weight, eps)  # one loop: PyTorch's CPU rms_norm is ~10 ops (~35 us a row)
        return F.rms_norm(x, (x.shape[-1],), weight, eps=eps)  # the same product, one op fewer
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class _RMSNormFn(torch.autograd.Function):
    """y = x r w with r = (mean(x^2) + eps)^-1/2 per row, computed in float32 and written in `out_dtype`.
    Backward, with n = x r and g = dy w: dx = r (g - n mean(g n)), dw = sum over rows of dy n. Three passes
    over the activations forward and six backward, where autograd through the op chain takes about twice that."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # float32 at least (float64 stays float64)
        r = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        torch.mul(xf * r, weight, out=y)
        ctx.save_for_backward(x, r, weight)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, r, weight = ctx.saved_tensors
        n = x * r  # float32 at least, by type promotion (no separate cast of x or dy)
        g = dy * weight.to(r.dtype)
        dot = torch.linalg.vecdot(g, n, dim=-1).unsqueeze(-1).div_(x.shape[-1])  # mean(g n) per row
        dx = torch.addcmul(g, n, dot, value=-1).mul_(r).to(x.dtype)
        dw = (dy * n).flatten(0, -2).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None
