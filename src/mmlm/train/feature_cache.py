"""Contrastive batches larger than memory: feature caching (Gao et al. 2021, "GradCache").

Plain gradient accumulation splits a batch of 1024 into 8 losses over 128 samples each, so every sample
sees 127 negatives instead of 1023: the objective silently changes. Here the loss is computed once over
the whole batch, and its gradient is pushed back through the towers one micro-batch at a time:

1. embed every micro-batch without a graph (cheap: no activations kept);
2. compute the loss on all embeddings at once and backpropagate it to the embeddings only;
3. re-embed each micro-batch with a graph and backpropagate the cached embedding gradients through it.

The gradients equal those of one big batch (up to float rounding) for any model without batch
statistics; a ResNet's BatchNorm sees per-micro-batch statistics, as with accumulation (under torchrun,
those of micro-batch i of every rank together: see docs/scaling.md).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Callable

import torch
from torch import nn

from ..devices import backward
from ..distributed import all_gather_objects

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: buf.clone() for mod_name, mod in model.named_modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)
            for name, buf in ((f"{mod_name}.{n}", b) for n, b in mod.named_buffers(recurse=False))}


def _restore(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for name, value in saved.items():
            buffers[name].copy_(value)


def contrastive_step(model: nn.Module, pixel_values: torch.Tensor, input_ids: torch.Tensor, loss_fn: LossFn,
                     micro_batch: int = 0, autocast: Callable[[], AbstractContextManager] = nullcontext,
                     encode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Forward + backward of a contrastive loss over the whole batch; returns the detached loss.

    `loss_fn(image_features, text_features)` sees raw (unnormalised) features of the full batch.
    `micro_batch` = 0 or >= the batch size runs one ordinary forward/backward. `encode` replaces
    model.encode_image (encode_video / encode_audio: `pixel_values` then holds videos or audio features).
    """
    encode = encode or model.encode_image
    n = pixel_values.shape[0]
    # Under torchrun every rank embeds the same number of micro-batches, whatever rows it lost: a SyncBatchNorm
    # (distributed.py) meets the other ranks in each forward.
    chunks = max(all_gather_objects(-(-n // micro_batch))) if micro_batch else 1
    if chunks == 1:
        with autocast():
            loss = loss_fn(encode(pixel_values), model.encode_text(input_ids))
        backward(loss, autocast)  # under fp16 (`autocast` a devices.Precision), the loss scaled first
        return loss.detach()

    px_chunks, id_chunks = pixel_values.tensor_split(chunks), input_ids.tensor_split(chunks)
    saved = _bn_buffers(model)  # the graph-free pass must not update BatchNorm running statistics twice
    with torch.no_grad(), autocast():
        image = torch.cat([encode(px) for px in px_chunks])
        text = torch.cat([model.encode_text(ids) for ids in id_chunks])
    _restore(model, saved)
    image = image.detach().requires_grad_()
    text = text.detach().requires_grad_()
    with autocast():
        loss = loss_fn(image, text)
    backward(loss, autocast)  # gradients reach logit_scale/logit_bias and the cached features (scaled under fp16)
    for px, ids, g_img, g_txt in zip(px_chunks, id_chunks, image.grad.tensor_split(chunks),
                                               text.grad.tensor_split(chunks)):
        with autocast():
            f_img, f_txt = encode(px), model.encode_text(ids)
        torch.autograd.backward([f_img, f_txt], [g_img.to(f_img.dtype), g_txt.to(f_txt.dtype)])
    return loss.detach()
