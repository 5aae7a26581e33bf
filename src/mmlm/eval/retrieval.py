"""Image-text retrieval: Recall@K in both directions, several captions per image, bounded memory."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from ..distributed import map_shards


@torch.no_grad()
def retrieval_metrics(image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_image: torch.Tensor,
                      ks: Sequence[int] = (1, 5, 10), chunk: int = 1024) -> dict[str, float]:
    """Recall@K for image->text and text->image.

    image_embeds (N, E) and text_embeds (M, E) are normalised; text_image (M,) gives each caption's image.
    An image counts as retrieved at K when any of its captions ranks within the top K. Similarities are
    computed `chunk` rows at a time, so memory stays O(chunk * max(N, M)) for any N, M.
    """
    n, m = len(image_embeds), len(text_embeds)
    if len(text_image) != m:
        raise ValueError(f"{m} captions but {len(text_image)} caption->image indices")
    text_image = text_image.long()
    # text -> image: rank of the caption's own image among all images.
    t2i_rank = torch.empty(m, dtype=torch.long)
    for s in range(0, m, chunk):
        sims = text_embeds[s:s + chunk] @ image_embeds.t()  # (c, N)
        own = sims.gather(1, text_image[s:s + chunk, None])
        t2i_rank[s:s + chunk] = (sims > own).sum(dim=1)
    # image -> text: rank of the best-ranked of the image's captions among all captions.
    i2t_rank = torch.empty(n, dtype=torch.long)
    for s in range(0, n, chunk):
        sims = image_embeds[s:s + chunk] @ text_embeds.t()  # (c, M)
        is_own = text_image[None, :] == torch.arange(s, min(s + chunk, n))[:, None]
        if not is_own.any(dim=1).all():
            raise ValueError("every image needs at least one caption for image->text retrieval")
        best_own = sims.masked_fill(~is_own, float("-inf")).max(dim=1, keepdim=True).values
        i2t_rank[s:s + chunk] = (sims > best_own).sum(dim=1)
    out = {"images": n, "texts": m}
    for k in ks:
        out[f"i2t_R@{k}"] = round((i2t_rank < k).float().mean().item(), 4)
        out[f"t2i_R@{k}"] = round((t2i_rank < k).float().mean().item(), 4)
    return out


@torch.no_grad()
def evaluate_retrieval(model, tokenizer, image_batches: Iterable[torch.Tensor], captions: Sequence[str],
                       text_image: Sequence[int], batch_size: int = 256, encode=None) -> dict[str, float]:
    """Embed images (an iterable of pixel batches) and captions with a CLIP, then `retrieval_metrics`. `encode`
    replaces model.encode_image (a video or audio CLIP's encode_video / encode_audio: the batches hold those).

    Under torch.distributed the ranks share the embedding work and every rank scores all of it."""
    ctx = model.config.text.context_length
    dev = next(model.parameters()).device  # inputs go where the weights are, embeddings come back to the CPU
    encode = encode or model.encode_image
    img = F.normalize(torch.cat(map_shards(lambda px: encode(px.to(dev)).float().cpu(), image_batches)), dim=-1)
    txt = F.normalize(torch.cat(map_shards(
        lambda i: model.encode_text(tokenizer(list(captions[i:i + batch_size]), context_length=ctx).to(dev)).float().cpu(),
        range(0, len(captions), batch_size))), dim=-1)
    return retrieval_metrics(img, txt, torch.as_tensor(text_image))
