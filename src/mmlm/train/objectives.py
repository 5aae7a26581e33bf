"""Contrastive objectives: CLIP's symmetric InfoNCE and SigLIP's pairwise sigmoid loss.

Both take L2-normalised features and are free of distributed plumbing: a caller that holds features
gathered from other ranks passes them as `image_all`/`text_all` with its rows' `offset` into them
(each rank then computes its rows against every column: "local loss"); by default the batch is its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
              image_all: torch.Tensor | None = None, text_all: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """Symmetric cross-entropy over scaled cosine similarities; sample i's positive is text i.

    image, text: (B, E) normalised rows; image_all, text_all: (N, E) columns (default: the rows).
    Returns the mean of the image->text and text->image losses over the B rows.
    """
    image_all = image if image_all is None else image_all
    text_all = text if text_all is None else text_all
    scale = logit_scale.exp()
    labels = torch.arange(image.shape[0], device=image.device) + offset
    logits_i2t = scale * image @ text_all.t()  # (B, N)
    logits_t2i = scale * text @ image_all.t()  # (B, N)
    return (F.cross_entropy(logits_i2t.float(), labels) + F.cross_entropy(logits_t2i.float(), labels)) / 2


def siglip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
                text_all: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """Sigmoid loss (Zhai et al. 2023): every (image, text) pair is an independent binary problem.

    Normalised by the number of rows, as in the paper (sum over columns, mean over images).
    """
    text_all = text if text_all is None else text_all
    logits = (logit_scale.exp() * image @ text_all.t() + logit_bias).float()  # (B, N)
    signs = -torch.ones_like(logits)
    rows = torch.arange(image.shape[0], device=image.device)
    signs[rows, rows + offset] = 1.0
    return -F.logsigmoid(signs * logits).sum() / image.shape[0]


def contrastive_loss(kind: str, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
                     logit_bias: torch.Tensor | None = None, gather: str = "local") -> torch.Tensor:
    """Dispatch on the configured loss; features are normalised here.

    Under torch.distributed the features of every rank are gathered (with gradients) and `gather` picks
    "local" (this rank's rows against all columns, scaled so that averaging the ranks' gradients gives the
    global-batch gradient) or "global" (every rank computes the whole global loss). In one process both are
    the plain batch loss.
    """
    if gather not in ("local", "global"):
        raise ValueError(f"contrastive gather mode must be 'local' or 'global', got {gather!r}")
    if kind not in ("clip", "siglip"):
        raise ValueError(f"unknown contrastive loss {kind!r}; expected 'clip' or 'siglip'")
    if kind == "siglip" and logit_bias is None:
        raise ValueError("the siglip loss needs a model with a logit_bias (set model.logit_bias_init, e.g. -10)")
    from ..distributed import gather_rows, global_mean_factor

    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    image_all, offset = gather_rows(image)
    text_all, _ = gather_rows(text)
    if gather == "global":  # identical on every rank: the rank-average of its gradients is its gradient
        image, text, offset = image_all, text_all, 0
        factor = 1.0
    else:
        factor = global_mean_factor(image.shape[0])[1]
    if kind == "clip":
        loss = clip_loss(image, text, logit_scale, image_all, text_all, offset)
    else:
        loss = siglip_loss(image, text, logit_scale, logit_bias, text_all, offset)
    return loss if factor == 1.0 else loss * factor


def next_token_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """labels (B, T), unshifted -> (at (B, T) bool: the positions whose logits predict a learned token,
    targets (N,): those tokens), both in row-major order, so `cross_entropy(logits[at], targets)` equals
    `next_token_loss` while the logits are computed only where they count (`LM.forward(logits_at=at)`)."""
    learned = labels[:, 1:] != -100
    at = torch.zeros_like(labels, dtype=torch.bool)
    at[:, :-1] = learned
    return at, labels[:, 1:][learned]


def reply_weights(labels: torch.Tensor) -> torch.Tensor:
    """labels (B, T), unshifted -> (N,) weights of `next_token_targets`' targets such that each reply (a maximal
    run of learned tokens: an answer and its end token) weighs 1 in all: a yes/no answer counts as much as a
    twenty-token description, where a mean over tokens would let the long replies set the gradient."""
    learned = (labels[:, 1:] != -100).flatten()
    starts = learned & ~torch.cat([learned.new_zeros(1), learned[:-1]])  # a learned token after an unlearned one
    starts = starts.view(len(labels), -1)
    starts[:, 0] = learned.view(len(labels), -1)[:, 0]  # each row starts afresh
    run = starts.flatten().cumsum(0)[learned]  # the reply index of each target, 1..R
    return 1.0 / torch.bincount(run)[run].float()


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of token t+1 given tokens <= t, over labels that are not -100 (masked prompt, padding):
    their mean, or with reduction="sum" their sum (a distributed caller divides by the global count).

    logits (B, T, V); labels (B, T), unshifted (label t is the id at position t), as transformers takes them.
    """
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
                           reduction=reduction)
