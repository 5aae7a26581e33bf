"""The one reference switch: every kernel in this package runs its plain formula while it is on.

    with mmlm.reference_mode():      # or MMLM_REFERENCE=1 in the environment
        out = model(...)             # the textbook formulas, op by op, autograd doing the backward

Tests run the models in both modes and assert the same outputs and gradients; a reader who wants to follow
the maths reads the `*_reference` functions (and the model files), never the fast paths.

Some fast paths were measured and written for a CPU (oneDNN's kernels, PyTorch's CPU autograd): `cpu_path(x)`
says whether one applies. On a GPU they step aside for PyTorch's own fused kernels (SDPA's flash and
memory-efficient attention, the fused RMSNorm); the device-neutral ones (one autograd function where autograd
would run a chain of ops) run everywhere. Nothing here touches CUDA until a tensor on it arrives.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch

_override: bool | None = None  # set by reference_mode(); None: the environment decides


def reference() -> bool:
    """True when the plain formulas must run (inside `reference_mode()`, or MMLM_REFERENCE set to a true value)."""
    if _override is not None:
        return _override
    return os.environ.get("MMLM_REFERENCE", "").strip().lower() not in ("", "0", "false", "no", "off")


def cpu_path(x: torch.Tensor) -> bool:
    """Whether the CPU-specific fast paths apply to `x`: the fast paths are on and `x` is on a CPU."""
    return not reference() and x.device.type == "cpu"


def avx2_inference(*tensors: torch.Tensor) -> bool:
    """Whether mmlm's AVX2 C loops for inference (a UNet's attention, convolutions and norms, the matmuls of an
    embedding MLP) may take a call on `tensors`: the fast paths on, all float32 on a CPU, no gradient wanted from
    any of them, not being traced by torch.compile nor seen by a dispatch mode (FlopCounterMode, fake tensors: a
    ctypes call is invisible to them), and this process's build of the loops the AVX2 one (where they were
    measured; elsewhere PyTorch's kernels run)."""
    from ... import native  # its first use builds the loops: not at import

    return (not reference() and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            and not torch.compiler.is_compiling() and not torch._C._len_torch_dispatch_stack()
            and native.simd() == 1)


@contextmanager
def reference_mode(enabled: bool = True) -> Iterator[None]:
    """Run every model on the plain reference formulas (`enabled=False` forces the fast paths, whatever
    MMLM_REFERENCE says). Process-wide, not per thread: switch it around whole runs, not inside a served model."""
    global _override
    before, _override = _override, bool(enabled)
    try:
        yield
    finally:
        _override = before
