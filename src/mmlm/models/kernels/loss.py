"""The LM head at selected positions: logits, or each target's cross-entropy without float32 logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .casts import matmul_dtype, weight_in
from .packing import round_rows
from .switch import reference


def head_logits(norm: nn.Module, lm_head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, C) hidden states -> (N, V) logits lm_head(norm(x)); the row count rounded for the matmuls (`round_rows`)."""
    if reference():
        return lm_head(norm(x))
    return lm_head(norm(round_rows(x)))[: len(x)]


def next_token_loss_reference(norm: nn.Module, lm_head: nn.Module, x: torch.Tensor,
                              targets: torch.Tensor) -> torch.Tensor:
    """(N, C) hidden states, (N,) target ids -> (N,) cross-entropy -log softmax(lm_head(norm(x)))[target]."""
    logits = lm_head(norm(x))
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="none")


def next_token_loss(norm: nn.Module, lm_head: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`next_token_loss_reference`'s values, with the projection and the cross-entropy in one function
    (`_LinearCrossEntropy`), the frozen head weight cast once, and the row count rounded (`round_rows`)."""
    if reference():
        return next_token_loss_reference(norm, lm_head, x, targets)
    h = norm(round_rows(x))
    dtype = matmul_dtype(h, h.dtype)
    w = weight_in(lm_head, lm_head.weight, dtype)
    t = torch.cat([targets, targets.new_zeros(len(h) - len(x))])
    return _LinearCrossEntropy.apply(h.to(dtype), w, t)[: len(x)]


class _LinearCrossEntropy(torch.autograd.Function):
    """loss_n = logsumexp(h_n W^T) - (h_n W^T)[t_n]: the vocabulary projection and its cross-entropy in one step.

    The logits stay in the matmul's dtype (bf16 under autocast: the same values `lm_head` gives); the softmax is
    taken in float32 a block of rows at a time, and backward turns the saved logits into their gradient in place,
    (softmax - onehot) x dloss. F.cross_entropy on float32 logits makes a float32 copy of them, a zero-filled
    float32 gradient and a cast back, each (N, V): for SmolLM2 (V = 49153) that was ~0.5 s of a 5 s LoRA step."""

    BLOCK = 1 << 21  # elements of float32 scratch per block of rows (8 MB)

    @staticmethod
    def _scratch(logits: torch.Tensor) -> torch.Tensor:
        """One reused float32 (or float64) block of rows: a fresh allocation per block costs its page faults."""
        rows = min(len(logits), max(1, _LinearCrossEntropy.BLOCK // logits.shape[1]))
        return logits.new_empty(rows, logits.shape[1], dtype=torch.promote_types(logits.dtype, torch.float32))

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = h @ weight.t()  # (N, V)
        scratch = _LinearCrossEntropy._scratch(logits)
        lse = torch.empty(len(logits), dtype=scratch.dtype, device=logits.device)
        for s in range(0, len(logits), len(scratch)):
            block = logits[s : s + len(scratch)]
            torch.logsumexp(scratch[: len(block)].copy_(block), dim=-1, out=lse[s : s + len(block)])
        picked = logits.gather(1, targets[:, None]).squeeze(1).to(lse.dtype)
        ctx.save_for_backward(h, weight, targets, logits, lse)
        return lse - picked

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dloss: torch.Tensor):
        h, weight, targets, logits, lse = ctx.saved_tensors
        scratch = _LinearCrossEntropy._scratch(logits)
        dloss = dloss.to(lse.dtype)
        for s in range(0, len(logits), len(scratch)):
            block = logits[s : s + len(scratch)]
            rows = slice(s, s + len(block))
            p = scratch[: len(block)].copy_(block).sub_(lse[rows, None]).exp_().mul_(dloss[rows, None])
            p.scatter_add_(1, targets[rows, None], -dloss[rows, None])
            block.copy_(p)  # the logits are not needed again: their buffer takes the gradient
        dh = logits @ weight if ctx.needs_input_grad[0] else None
        dw = logits.t() @ h if ctx.needs_input_grad[1] else None
        return dh, dw, None
