"""Activation checkpointing per block: trade compute for memory while training.

A training step keeps every block's intermediate activations for the backward: for a ViT-L that is most of the
memory at any useful batch. With `grad_checkpointing(model)` each transformer `Block` (and each ResNet
`Bottleneck`) keeps only its input; the backward runs the block's forward again to get the rest (about a third
more compute, as one more forward). Gradients are the same (the same ops run on the same inputs).

    grad_checkpointing(model)          # train.grad_checkpointing: true does this in the loop
    grad_checkpointing(model, False)   # back to keeping everything

The model files know nothing of it: this marks the blocks and routes their forward through `kernels.recompute`
(which the fast paths of `pooled` use too). Names, state dicts, FSDP2 units and LoRA are unchanged; a BatchNorm's
running statistics move once per forward, not again in the recomputation.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .blocks import Block
from .kernels.recompute import recompute
from .resnet import Bottleneck

UNITS = (Block, Bottleneck)  # the blocks that are recomputed as a whole


def _forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    return recompute(self, type(self).forward, self, *args, **kwargs)


def grad_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """Mark (or unmark) every block of `model` for activation checkpointing; returns how many blocks."""
    units = [m for m in model.modules() if isinstance(m, UNITS)]
    for m in units:
        m.grad_checkpointing = enabled
        if enabled:
            m.forward = _forward.__get__(m)  # this instance's forward; the class's stays the plain one
        else:
            vars(m).pop("forward", None)
    return len(units)
