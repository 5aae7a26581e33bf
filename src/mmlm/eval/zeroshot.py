"""Zero-shot classification: class names -> prompt-ensembled text classifier -> top-k accuracy."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F

from ..distributed import map_shards


def _device(model) -> torch.device:
    """Where the model's weights are (`mmlm.load(..., device=)`): inputs go there, results come back to the CPU."""
    return next(model.parameters()).device


@torch.no_grad()
def text_classifier(model, tokenizer, class_names: Sequence[str], templates: Sequence[str],
                    batch_size: int = 256) -> torch.Tensor:
    """(C, E) unit vectors: for each class, the renormalised mean of its normalised prompt embeddings.

    Averaging over templates ("a photo of a {}.", "a drawing of a {}." ...) is CLIP's prompt ensembling.
    """
    if not class_names or not templates:
        raise ValueError("zero-shot needs at least one class name and one template")
    prompts = [t.format(c) for c in class_names for t in templates]
    ctx = model.config.text.context_length

    def embed(start: int) -> torch.Tensor:
        ids = tokenizer(prompts[start:start + batch_size], context_length=ctx).to(_device(model))
        return F.normalize(model.encode_text(ids).float(), dim=-1).cpu()

    per_prompt = torch.cat(map_shards(embed, range(0, len(prompts), batch_size))).view(len(class_names), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


@torch.no_grad()
def image_embeddings(model, batches: Iterable[torch.Tensor], encode=None) -> torch.Tensor:
    """Normalised image embeddings of an iterable of (B, C, H, W) pixel batches, concatenated.

    Under torch.distributed each rank embeds every W-th batch and all ranks get every embedding. `encode` replaces
    model.encode_image (a video or audio CLIP's encode_video / encode_audio: the batches then hold those)."""
    encode = encode or model.encode_image
    return torch.cat(map_shards(lambda px: F.normalize(encode(px.to(_device(model))).float(), dim=-1).cpu(),
                                batches))


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
                           with_confusion: bool = True) -> dict[str, Any]:
    """top-1 / top-5 accuracy, per-class accuracy and the confusion matrix (rows: true, columns: predicted)."""
    n, c = logits.shape
    topk = logits.topk(min(5, c), dim=-1).indices
    pred = topk[:, 0]
    correct1 = pred == labels
    correct5 = (topk == labels[:, None]).any(dim=-1)
    confusion = torch.zeros(c, c, dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    per_class = {}
    for k, name in enumerate(class_names):
        total = int(confusion[k].sum())
        if total:
            per_class[name] = round(int(confusion[k, k]) / total, 4)
    out: dict[str, Any] = {"n": n, "classes": c, "top1": round(correct1.float().mean().item(), 4),
                           "top5": round(correct5.float().mean().item(), 4), "per_class": per_class}
    if with_confusion:
        out["confusion"] = confusion.tolist()
    return out


@torch.no_grad()
def zeroshot(model, tokenizer, batches: Iterable[torch.Tensor], labels: torch.Tensor, class_names: Sequence[str],
             templates: Sequence[str], with_confusion: bool = True, encode=None) -> dict[str, Any]:
    """Classify images (or, with `encode`, videos or audio clips) by their nearest class prompt-ensemble; labels
    index `class_names`."""
    classifier = text_classifier(model, tokenizer, class_names, templates)
    images = image_embeddings(model, batches, encode)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    return classification_metrics(images @ classifier.t(), labels, class_names, with_confusion)
