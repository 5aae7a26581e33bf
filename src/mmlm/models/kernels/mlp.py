"""The MLPs' activations: quick_gelu, CLIP's two-layer MLP with it, SwiGLU's gate and its down projection, GEGLU's gate;
and, for inference on AVX2, a linear layer as a compiled register-tiled matmul (the activations in its registers)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ... import native
from .casts import kept, matmul_dtype, weight_in
from .lora import lora_backward, lora_forward
from .switch import avx2_inference, reference


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
    matmuls instead of making passes over the (..., hidden) activations: two fewer forward and two backward.
    Without a gradient on an AVX2 CPU (embedding images and text), GELU or quick_gelu: two compiled matmuls
    (`native.linear`), the activation applied to fc1's sums in registers (no pass over the (..., hidden) product)."""
    if act in _FUSED_ACTS and compiled_matmul(x, fc1, fc2):
        (w1, b1), (w2, b2) = packed_linear(fc1), packed_linear(fc2)
        h = native.linear(x.reshape(-1, x.shape[-1]), w1, fc1.out_features, b1, act=_FUSED_ACTS[act])
        return native.linear(h, w2, fc2.out_features, b2).view(*x.shape[:-1], fc2.out_features)
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


_FUSED_ACTS = {F.gelu: "gelu", quick_gelu: "quick_gelu"}


def _plain_with_bias(linear: nn.Module) -> bool:
    """An nn.Linear itself (not a LoRA or quantized replacement, whose forward does more) with a bias."""
    return type(linear) is nn.Linear and linear.bias is not None


def geglu_reference(z: torch.Tensor) -> torch.Tensor:
    """h * GELU(gate) for z = [h, gate] (..., 2 n) -> (..., n): a diffusion UNet's feed-forward gate."""
    h, gate = z.chunk(2, dim=-1)
    return h * F.gelu(gate)


def geglu(z: torch.Tensor) -> torch.Tensor:
    """`geglu_reference`'s values. While sampling on an AVX2 CPU, one C pass (`native.geglu`: erf by a rational
    approximation, |error| < 1.5e-7) where PyTorch makes two and allocates between them: ~1.8x at a UNet's
    shapes."""
    if z.is_contiguous() and not torch.is_autocast_enabled("cpu") and avx2_inference(z):
        return native.geglu(z)
    return geglu_reference(z)


def linear_geglu_reference(proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """h * GELU(gate) of proj(x) = [h, gate] (..., 2 n) -> (..., n): GEGLU's projection and its gate."""
    return geglu(proj(x))


def linear_geglu(proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`linear_geglu_reference`'s values. While sampling on an AVX2 CPU, one C pass (`native.linear`): its matmul
    takes eight columns of h with their eight gates at a time and writes h GELU(gate) straight from the registers, so
    the (..., 2 n) product is never stored nor read again; the weight is packed for it once (`packed_linear`)."""
    if not compiled_matmul(x, proj):
        return linear_geglu_reference(proj, x)
    w, b = packed_linear(proj, geglu=True)
    n = proj.out_features // 2
    return native.linear(x.reshape(-1, x.shape[-1]), w, n, b, act="geglu").view(*x.shape[:-1], n)


def linear_reference(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """x W^T + b: a linear layer."""
    return layer(x)


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`linear_reference`'s values. Without a gradient on an AVX2 CPU, for 64 rows or more (a prompt, a batch of
    images: not a decoding step's row, which PyTorch's matrix-vector product serves better), the compiled
    register-tiled matmul (`native.linear`): 1.0-1.2x PyTorch's GEMM at a CLIP tower's and a UNet's shapes, the
    bias added in its registers."""
    if not compiled_matmul(x, layer):
        return linear_reference(layer, x)
    w, b = packed_linear(layer)
    return native.linear(x.reshape(-1, x.shape[-1]), w, layer.out_features, b).view(*x.shape[:-1], layer.out_features)


def compiled_matmul(x: torch.Tensor, *layers: nn.Module) -> bool:
    """Whether `native.linear` takes x (..., K) through `layers`: plain nn.Linear layers (not LoRA or quantized
    ones; or a convolution taken as its matmul, K = C p p, as the patch embedding) of K at most 4096 inputs each
    (at 11008 its row chunks leave the cache: 0.91x PyTorch's GEMM, where up to 4096 it measured 0.98-1.17x), x
    contiguous with 64 rows or more (a decoding step's one row is PyTorch's matrix-vector product's job; the kernel
    computes six rows at a time), no autocast, and `avx2_inference` (no gradient, float32, AVX2 build)."""
    return (all(type(layer) in (nn.Linear, nn.Conv2d) and 0 < layer.weight.shape[1:].numel() <= 4096
                for layer in layers) and x.dim() >= 2 and x.is_contiguous() and x.numel() >= 64 * x.shape[-1] > 0 and not torch.is_autocast_enabled("cpu")
            and avx2_inference(x, *(p for layer in layers for p in layer.parameters())))


def packed_linear(layer: nn.Linear | nn.Conv2d, geglu: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """layer's weight (N, K) (a convolution's (N, C, p, p), K = C p p: a 1x1 one's, a patch embedding's) as
    `native.linear` reads it, (P, K, 16): panel j sixteen columns of w^T (columns 16 j .. 16 j + 15; with `geglu`,
    h's 8 j .. 8 j + 7 then their gates', h and gate the two halves of the N outputs), zeros past the last; the
    bias (16 P,) in the same order. Kept on the module until a weight changes."""
    w, b = layer.weight, layer.bias

    def make() -> tuple[torch.Tensor, torch.Tensor | None]:
        w2 = w.detach().flatten(1)
        cols = torch.cat([w2, b.detach()[:, None]], 1) if b is not None else w2  # (N, K [+ 1])
        if geglu:  # (n, ...) twice, padded to 8 rows a group, then interleaved eight and eight
            h, gate = (F.pad(half, (0, 0, 0, -half.shape[0] % 8)).unflatten(0, (-1, 8)) for half in cols.chunk(2))
            cols = torch.stack([h, gate], 1).flatten(0, 2)  # (P * 16, K [+ 1])
        else:
            cols = F.pad(cols, (0, 0, 0, -cols.shape[0] % 16))
        K = w2.shape[1]
        panels = cols[:, :K].unflatten(0, (-1, 16)).transpose(1, 2).contiguous()  # (P, K, 16)
        return panels, cols[:, K].contiguous() if b is not None else None

    return kept(layer, "_packed_linear", (w, b), make, geglu)


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
    widest activation per layer). Only z is kept for the backward, which computes silu(gate) again (one pass
    over half of z, where keeping it held another (..., hidden) tensor per layer until the backward)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, hidden: int) -> torch.Tensor:
        gate, up = z.split(hidden, dim=-1)
        ctx.save_for_backward(z)
        ctx.hidden = hidden
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (z,) = ctx.saved_tensors
        gate, up = z.split(ctx.hidden, dim=-1)
        return _silu_gate_backward(dy, z, F.silu(gate), ctx.hidden), None


def _silu_gate_backward(dy: torch.Tensor, z: torch.Tensor, act: torch.Tensor, hidden: int) -> torch.Tensor:
    """d z of silu(gate) * up for z = [gate, up] (act = silu(gate)), both halves written into one buffer."""
    gate, up = z.split(hidden, dim=-1)
    dz = torch.empty_like(z)
    d_gate, d_up = dz.split(hidden, dim=-1)
    torch.mul(dy, act, out=d_up)
    torch.ops.aten.silu_backward.grad_input(dy * up, gate, grad_input=d_gate)
    return dz


def swiglu_down(z: torch.Tensor, hidden: int, act, fc2: nn.Module) -> torch.Tensor:
    """fc2(swiglu(z)): SwiGLU's gate and its down projection. Training with silu and a LoRA down projection whose
    weight is frozen (LoRA fine-tuning): one autograd function (`_SiluGateLoRADown`) that keeps only z and
    computes silu(gate) * up again in the backward. Apart, the LoRA layer keeps its input (the gate's output,
    the MLP's (..., hidden) activation) from forward to backward for its A gradient: one such tensor per layer."""
    if (reference() or act is not F.silu or not (torch.is_grad_enabled() and z.requires_grad)
            or not hasattr(fc2, "lora_a") or fc2.weight.requires_grad):
        return fc2(swiglu(z, hidden, act))
    w = weight_in(fc2, fc2.weight, matmul_dtype(z, z.dtype))
    return _SiluGateLoRADown.apply(z, hidden, w, fc2.bias, fc2.lora_a, fc2.lora_b, fc2.scale)


class _SiluGateLoRADown(torch.autograd.Function):
    """y = h W^T + b + (h A^T)(s B)^T with h = silu(gate) * up of z = [gate, up], W frozen; saves z (not h) and
    the (N, r) product h A^T. The same operations as `_SiluGate` then `kernels.lora._LoRAFn` (their shared
    `_silu_gate_backward`, `lora_forward`, `lora_backward`), so the same values and gradients, bit for bit."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, hidden: int, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scale: float) -> torch.Tensor:
        gate, up = z.split(hidden, dim=-1)
        h = F.silu(gate).mul_(up).reshape(-1, hidden).to(weight.dtype)  # (N, hidden)
        y, xa, a_t, sb_t = lora_forward(h, weight, bias, a, b, scale)
        ctx.save_for_backward(z, xa, weight, a_t, sb_t)
        ctx.hidden, ctx.scale = hidden, scale
        ctx.dtypes = (None if bias is None else bias.dtype, a.dtype, b.dtype)
        return y.view(*z.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        z, xa, weight, a_t, sb_t = ctx.saved_tensors
        gate, up = z.split(ctx.hidden, dim=-1)
        act = F.silu(gate)
        h = (act * up).reshape(-1, ctx.hidden).to(weight.dtype)  # the forward's h, again
        dy2 = dy.reshape(-1, dy.shape[-1]).to(weight.dtype)
        dh, da, db, dbias = lora_backward(dy2, h, xa, weight, a_t, sb_t, ctx.scale, ctx.dtypes, ctx.needs_input_grad[3])
        dh = dh.view(*z.shape[:-1], ctx.hidden).to(z.dtype)
        return _silu_gate_backward(dh, z, act, ctx.hidden), None, None, dbias, da, db, None
