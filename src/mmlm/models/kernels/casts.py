"""Dtype helpers of the fast paths: which dtype a matmul computes in, a cast cache for frozen weights, and the one
way a fast path keeps a tensor derived from a module's weights (`kept`)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn


def kept(module: nn.Module, name: str, tensors: tuple[torch.Tensor | None, ...], make: Callable[[], Any], *extra) -> Any:
    """make()'s result, kept on `module` as the plain attribute `name` (not a buffer: never saved) and reused until
    one of `tensors` changes, in place or replaced, or `extra` differs. Tensors made under inference_mode keep no
    version counter, so for them make() runs at every call."""
    present = [t for t in tensors if t is not None]
    if any(t.is_inference() for t in present):
        return make()
    key = (*((id(t), t.data_ptr(), t._version, tuple(t.shape)) for t in present), *extra)
    cached = module.__dict__.get(name)
    if cached is None or cached[0] != key:
        cached = (key, make())
        module.__dict__[name] = cached
    return cached[1]


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
    if weight.requires_grad:  # trained: cast as it changes
        return weight.to(dtype)
    return kept(module, "_weight_cast", (weight,), lambda: weight.detach().to(dtype), dtype)
