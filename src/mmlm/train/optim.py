"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay weight matrices and embeddings; never norms, biases, class tokens, logit_scale or logit_bias.

    Every 0-d and 1-d tensor is one of the latter, so the rule is simply `ndim < 2` (open_clip's choice too).
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)


def lr_at(step: int, base_lr: float, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Linear warmup from ~0 to base_lr over `warmup_steps`, then cosine decay to `min_lr_ratio * base_lr`."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * cosine)
