"""Image ops: the ViT's patch embedding, a ResNet's convolutions (their layout, BatchNorm folded in), and a UNet's
3x3 convolutions with what is added to them (Winograd's F(4x4, 3x3) where it is faster)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ... import native
from .casts import kept, matmul_dtype
from .mlp import compiled_matmul, packed_linear
from .switch import avx2_inference, reference


def patch_embed_reference(pixel_values: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, width): a p x p convolution with stride p (one vector per patch), flattened."""
    return conv(pixel_values.to(conv.weight.dtype)).flatten(2).transpose(1, 2)


def patch_embed(pixel_values: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """`patch_embed_reference` computed as what it is, one matmul of the flattened patches (rows in the conv
    weight's (C, p, p) order): faster than the convolution kernel. Without a gradient on an AVX2 CPU, the
    compiled matmul of the linear layers (`native.linear`)."""
    if reference():
        return patch_embed_reference(pixel_values, conv)
    B, C, H, W = pixel_values.shape
    p = conv.stride[0]
    # in the matmul's dtype before the patches are gathered: under autocast that moves half the bytes
    pixel_values = pixel_values.to(matmul_dtype(pixel_values, conv.weight.dtype))
    patches = pixel_values.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * p * p)
    if compiled_matmul(patches, conv):
        w, b = packed_linear(conv)  # as the linear layers' (`kernels.linear`)
        y = native.linear(patches.reshape(-1, patches.shape[-1]), w, conv.out_channels, b)
        return y.view(B, -1, conv.out_channels)
    return F.linear(patches, conv.weight.flatten(1), conv.bias)


def conv_layout(x: torch.Tensor) -> torch.Tensor:
    """x itself (NCHW) under the reference switch, else its channels-last copy (the same values, stored NHWC):
    oneDNN's convolutions run ~1.4x faster on NHWC activations, and GroupNorm, SiLU and the other pointwise ops
    keep the layout, so one conversion at a model's entry serves every layer after it."""
    if reference():
        return x
    return x.contiguous(memory_format=torch.channels_last)


@contextmanager
def conv_weights_layout(*modules: nn.Module | None) -> Iterator[None]:
    """While inside, the 4-D (convolution) weights of `modules` are stored channels-last too (when the fast paths
    are on): with NHWC activations that saves oneDNN a weight reorder per call, ~10% of a sampling run. Sampling
    calls the same convolutions hundreds of times, so it converts once around the loop; on exit the weights are
    contiguous (NCHW) again, so the model a caller holds is unchanged."""
    params = [] if reference() else [p for m in modules if m is not None for p in m.parameters() if p.dim() == 4]
    for p in params:
        p.data = p.data.contiguous(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for p in params:
            p.data = p.data.contiguous()


def conv_bn_reference(x: torch.Tensor, conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """bn(conv(x)): a convolution, then BatchNorm (batch statistics while training, running ones in eval)."""
    return bn(conv(x))


def conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """`conv_bn_reference`'s values. A BatchNorm in eval mode is an affine map per channel,
    y = (z - mean) / sqrt(var + eps) * gamma + beta, so it folds into the convolution before it: weights scaled
    by s = gamma / sqrt(var + eps) per output channel, bias beta - mean s (+ the conv's own bias times s). One
    pass over the feature map instead of two: a frozen ResNet tower (LLaVA's, a video's frames) reads its
    inputs ~1.4x faster. While training, BatchNorm's batch statistics are not known before the convolution."""
    if reference() or bn.training or bn.running_var is None:
        return conv_bn_reference(x, conv, bn)
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()  # (C_out,)
    bias = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return F.conv2d(x, conv.weight * scale[:, None, None, None], bias, conv.stride, conv.padding, conv.dilation,
                    conv.groups)


def conv_add_reference(conv: nn.Conv2d, x: torch.Tensor, shift: torch.Tensor | None = None,
                       residual: torch.Tensor | None = None) -> torch.Tensor:
    """conv(x) + shift[:, :, None, None] + residual: a convolution, then a shift per image and channel (B, C_out)
    (a UNet's timestep) and a skip connection (B, C_out, H, W), each optional."""
    y = conv(x)
    if shift is not None:
        y = y + shift[:, :, None, None]
    return y if residual is None else residual + y


# Where Winograd beat oneDNN's direct convolution (AVX2 Zen 1, fp32, 2 threads): at batch 16 1.2x at 32 -> 32
# channels on 32x32 maps, 1.5-1.9x from 64 channels there, 1.9-2.5x on 8x8 and 16x16 maps, 1.3x at 64 channels on
# 64x64; at batch 2 an SD UNet's 320 and 640 channels on 16x16 to 64x64 maps 2.8-3.3x, 128 channels on 128x128 2.4x;
# one image through an SD VAE's upper levels (128-512 channels, 128x128 to 512x512) 1.9-3.0x. Larger maps were not
# measured (the transformed patches take 2.25x the input's memory: 300 MB for 128 channels at 512x512).
WINOGRAD_MIN_CHANNELS = 32
WINOGRAD_MAX_PIXELS = 512 * 512
# The one-pass form (`native.winograd_conv`: six tiles' transforms and products in the core's cache) reads every
# transformed kernel once per six tiles: 1.1-1.9x the three passes around PyTorch's batched GEMM while they stay in
# the cache (C_in x C_out up to 192 x 128 here), 1.1-3x slower above (an SD UNet's 320-1280 channels).
WINOGRAD_FUSED_MAX_WEIGHTS = 192 * 128
WINOGRAD_FUSED_TILES = 6
# Winograd's F(4x4, 3x3): Y = A^T [(G g G^T) . (B^T d B)] A per 4x4 tile of outputs (csrc/weight_only.c has B, A)
_G = torch.tensor([[1 / 4, 0.0, 0.0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6], [1 / 24, 1 / 12, 1 / 6],
                   [1 / 24, -1 / 12, 1 / 6], [0.0, 0.0, 1.0]], dtype=torch.float64)


def conv_add(conv: nn.Conv2d, x: torch.Tensor, shift: torch.Tensor | None = None,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """`conv_add_reference`'s values. A 3x3 convolution of 32 channels or more (a UNet's and a VAE's) runs as
    Winograd's F(4x4, 3x3) on a CPU while sampling: each 4x4 tile of outputs from its 6x6 patch of inputs with 36
    multiplies per channel pair instead of 144. The patches' and kernels' transforms make it 36 matmuls
    (tiles, C_in) x (C_in, C_out), and the output transform adds the bias, the shift and the skip in the same pass
    (C loops, `native.py`): for up to 192 x 128 channels all in one pass over six tiles at a time, above that as
    three passes around PyTorch's batched GEMM. Float32 error ~1e-5 of outputs of ~1 (the direct form's: ~2e-6).
    A 1x1 convolution (a UNet's shortcuts and projections) runs as the matmul it is (`native.linear`), the skip
    added in its registers."""
    if _pointwise(conv, x, shift, residual):
        N, C, H, W = x.shape
        w, b = packed_linear(conv)
        x = x.permute(0, 2, 3, 1).contiguous().view(-1, C)  # (N H W, C): one row per position
        if residual is not None:
            residual = residual.permute(0, 2, 3, 1).contiguous().view(-1, conv.out_channels)
        return native.linear(x, w, conv.out_channels, b, residual).view(N, H, W, -1).permute(0, 3, 1, 2)
    if not _winograd(conv, x, shift, residual):
        return conv_add_reference(conv, x, shift, residual)
    N, C, H, W = x.shape
    fused = conv.in_channels * conv.out_channels <= WINOGRAD_FUSED_MAX_WEIGHTS
    u = _winograd_weight(conv, fused)  # (36, C_in, C_out)
    x = x.permute(0, 2, 3, 1).contiguous()  # (N, H, W, C_in); a view when stored channels-last
    if residual is not None:
        residual = residual.permute(0, 2, 3, 1).contiguous()
    shift = None if shift is None else shift.contiguous()
    if fused:
        y = native.winograd_conv(x, u, conv.out_channels, WINOGRAD_FUSED_TILES, conv.bias, shift, residual)
    else:
        v = native.winograd_input(x)  # (36, tiles, C_in)
        m = torch.bmm(v, u)  # (36, tiles, C_out)
        y = native.winograd_output(m, (N, H, W), conv.bias, shift, residual)
    return y.permute(0, 3, 1, 2)  # (N, C_out, H, W), stored channels-last


def _pointwise(conv: nn.Conv2d, x: torch.Tensor, shift: torch.Tensor | None, residual: torch.Tensor | None) -> bool:
    """Whether `conv` is a 1x1 convolution (stride 1, no padding) taken as the matmul it is, over the channels-last
    positions (`native.linear`, the skip added in its registers): float32 on a CPU without a gradient or autocast,
    no shift, the AVX2 build of the C loops. 1.05-1.27x oneDNN's convolution and the add at a UNet's shapes (fewer
    than 4 channels out: oneDNN's)."""
    return (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0) and conv.groups == 1
            and x.dim() == 4 and shift is None and conv.out_channels >= 4 and not torch.is_autocast_enabled("cpu")
            and avx2_inference(x, *conv.parameters(), *([] if residual is None else [residual])))


def _winograd(conv: nn.Conv2d, x: torch.Tensor, shift: torch.Tensor | None, residual: torch.Tensor | None) -> bool:
    """Whether `conv` takes the Winograd path: a 3x3, stride 1, padding 1 convolution of C_in >= 32 channels over at
    most 512x512 positions, sides multiples of 4, float32 on a CPU without a gradient or autocast, the AVX2 build of the
    C loops (where it was measured)."""
    H, W = x.shape[-2:]
    extras = [t for t in (shift, residual) if t is not None]
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1) and conv.dilation == (1, 1)
            and conv.groups == 1 and conv.padding_mode == "zeros" and x.dim() == 4
            and conv.in_channels >= WINOGRAD_MIN_CHANNELS and H * W <= WINOGRAD_MAX_PIXELS and H % 4 == 0 and W % 4 == 0
            and not torch.is_autocast_enabled("cpu") and avx2_inference(x, *conv.parameters(), *extras))


def _winograd_weight(conv: nn.Conv2d, padded: bool = False) -> torch.Tensor:
    """G g G^T for every kernel g of `conv`, as (36, C_in, C_out) (computed in float64), C_out rounded up to 16 with
    zero columns when `padded` (the one-pass form's layout); kept on the module until its weight changes."""
    w = conv.weight

    def make() -> torch.Tensor:
        u = (_G @ w.detach().double() @ _G.T).float()  # (C_out, C_in, 6, 6)
        u = u.reshape(w.shape[0], w.shape[1], 36).permute(2, 1, 0)
        return F.pad(u, (0, -w.shape[0] % 16)).contiguous() if padded else u.contiguous()

    return kept(conv, "_winograd_weight", (w,), make, padded)


def group_norm_silu_reference(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """silu(GroupNorm(x)): the normalisation and activation before each of a UNet's (and a VAE's) convolutions."""
    return F.silu(norm(x))


def group_norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """`group_norm_silu_reference`'s values. On a channels-last map without a gradient (sampling) one C loop
    (`native.group_norm_silu`) computes each group's statistics eight channels at a time and writes
    silu(z) in one pass, where PyTorch makes two passes with a GroupNorm ~3x slower on channels-last maps than
    on NCHW ones: 1.2-3x per call at a UNet's shapes (AVX2)."""
    if not (x.dim() == 4 and x.shape[1] == norm.num_channels and x.is_contiguous(memory_format=torch.channels_last)
            and all(p.is_contiguous() for p in norm.parameters()) and not torch.is_autocast_enabled("cpu")
            and avx2_inference(x, *norm.parameters())):
        return group_norm_silu_reference(norm, x)
    return native.group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
