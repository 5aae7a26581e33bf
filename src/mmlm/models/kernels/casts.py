"""Dtype helpers of the fast paths: which dtype a matmul computes in, and a cast cache for frozen weights."""

from __future__ import annotations

import torch
from torch import nn


def matmul_dtype(x: torch.Tensor, default: torch.dtype) -> torch.dtype:
    """The dtype a matmul on x's device computes in: autocast's where it is on, else `default`."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else default


def weight_in(module: nn.Module, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` (a parameter of `module`) in `dtype`. A frozen weight's cast is kept on the module and reused until
    the weight changes (in place or replaced): autocast casts every weight at every call, which for a frozen LM
    under LoRA (SmolLM2: 135M weights, 106M in its blocks) re-reads and re-writes them all at every step."""
    if weight.dtype == dtype:
        return weight
    if weight.requires_grad or weight.is_inference():  # trained, or made under inference_mode (no version counter)
        return weight.to(dtype)
    key = (id(weight), weight.data_ptr(), weight._version, dtype)
    cached = module.__dict__.get("_weight_cast")
    if cached is None or cached[0] != key:
        cached = (key, weight.detach().to(dtype))
        module.__dict__["_weight_cast"] = cached  # a plain attribute: not a buffer, never saved
    return cached[1]
