"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd.graph import increment_version


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay weight matrices and embeddings; never norms, biases, class tokens, logit_scale or logit_bias.

    Every 0-d and 1-d tensor is one of the latter, so the rule is simply `ndim < 2` (open_clip's choice too).
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def can_fuse(params: list[torch.Tensor]) -> bool:
    """PyTorch's fused AdamW kernel takes plain floating-point CPU/CUDA parameters (not sharded DTensors)."""
    return bool(params) and all(type(p) is nn.Parameter and p.device.type in ("cpu", "cuda") and p.is_floating_point()
                                for p in params)


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float) -> torch.optim.AdamW:
    """AdamW, fused where it can be: one kernel over every tensor instead of a Python loop of small ops per
    tensor (measured: a bench-vit CLIP train step on CPU 1.5x faster in fp32, 1.8x with bf16 autocast)."""
    groups = param_groups(model, weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = can_fuse(params) or None
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
    if fused:
        # The fused kernel writes the weights without bumping their version counters, which is how the fast paths
        # see a weight change (kernels.casts.kept: Winograd transforms, packed layers): without this, an evaluation
        # during training computes with the weights of the first evaluation.
        opt.register_step_post_hook(lambda *_: increment_version(params))
    return opt


def lr_at(step: int, base_lr: float, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Linear warmup from ~0 to base_lr over `warmup_steps`, then cosine decay to `min_lr_ratio * base_lr`."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * cosine)
