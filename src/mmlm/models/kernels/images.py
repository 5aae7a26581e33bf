"""Image-tower ops: the ViT's patch embedding, and a ResNet's convolutions (their layout, BatchNorm folded in)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .casts import matmul_dtype
from .switch import reference


def patch_embed_reference(pixel_values: torch.Tensor, weight: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, width): a p x p convolution with stride p (one vector per patch), flattened."""
    return F.conv2d(pixel_values.to(weight.dtype), weight, stride=patch).flatten(2).transpose(1, 2)


def patch_embed(pixel_values: torch.Tensor, weight: torch.Tensor, patch: int) -> torch.Tensor:
    """`patch_embed_reference` computed as what it is, one matmul of the flattened patches (rows in the conv
    weight's (C, p, p) order): faster than the convolution kernel."""
    if reference():
        return patch_embed_reference(pixel_values, weight, patch)
    B, C, H, W = pixel_values.shape
    p = patch
    # in the matmul's dtype before the patches are gathered: under autocast that moves half the bytes
    pixel_values = pixel_values.to(matmul_dtype(pixel_values, weight.dtype))
    patches = pixel_values.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * p * p)
    return F.linear(patches, weight.flatten(1))


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
