"""Activation checkpointing's one call: run a block's computation so that its backward recomputes it.

`models/checkpointing.py` marks the blocks (`grad_checkpointing(model)`); every path that runs a marked block
(its own forward, and the fast paths of `pooled` that run a block's parts) goes through `recompute`.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


@contextmanager
def _batch_norm_kept(module: nn.Module) -> Iterator[None]:
    """The recomputation of a block must not move its BatchNorms' running statistics a second time."""
    saved = [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, mean, var, n in saved:
                m.running_mean.copy_(mean), m.running_var.copy_(var), m.num_batches_tracked.copy_(n)


def recompute(module: nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs); when `module` is marked for activation checkpointing and a graph is being built, only
    the inputs are kept and the backward runs `fn` again (torch.utils.checkpoint, non-reentrant)."""
    if not (getattr(module, "grad_checkpointing", False) and torch.is_grad_enabled()):
        return fn(*args, **kwargs)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        return checkpoint(fn, *args, use_reentrant=False, context_fn=lambda: (nullcontext(), _batch_norm_kept(module)),
                          **kwargs)
    return checkpoint(fn, *args, use_reentrant=False, **kwargs)  # (torch.compile traces this form)
