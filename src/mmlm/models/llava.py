"""LLaVA: a CLIP vision tower, a projector, and a decoder LM reading image features as if they were tokens.

The tower is a ViT (patch tokens, as LLaVA) or CLIP's ModifiedResNet (one token per cell of a stage's
feature map: a convolutional tower for small data, see `LlavaConfig`).

Reference: Liu et al. 2023/2024 (LLaVA, LLaVA-1.5); logits equal transformers' `LlavaForConditionalGeneration`
(tests/test_llava.py). The splice follows transformers' convention: input_ids already hold one
`image_token_id` per image feature (the conversation encoder expands each `<image>`), and the features of
all images of the batch, in order, replace the embeddings at those positions in one `masked_scatter`, so a
batch may mix text-only samples, one-image samples and several-image samples with no per-sample loop.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..config import LlavaConfig, ModifiedResNetConfig
from .positions import KVCache
from .lm import LM, LMOutput
from .lora import add_lora, merge_lora
from .projector import Projector
from .resnet import ModifiedResNet
from .vit import VisionTransformer


class Llava(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.config = cfg
        # The tower's tokens only: no CLIP projection (nor a ResNet's attention pool).
        resnet = isinstance(cfg.vision, ModifiedResNetConfig)
        self.vision = ModifiedResNet(cfg.vision, embed_dim=None) if resnet else VisionTransformer(cfg.vision, embed_dim=None)
        self.projector = Projector(cfg.projector, cfg.vision_feature_dim, cfg.lm.width, bias=cfg.projector_bias,
                                   tokens=cfg.image_tokens if cfg.image_pos_embed else 0)
        self.lm = LM(cfg.lm)
        self.vision.init_weights()
        if cfg.lora_rank:
            add_lora(self.lm.blocks, cfg.lora_rank, cfg.lora_alpha)

    def add_lora(self, rank: int, alpha: float) -> None:
        """Give the LM's block linears a LoRA update (stage 2 after a stage 1 without one); the config records it."""
        if self.config.lora_rank:
            raise ValueError(f"this model already has LoRA (rank {self.config.lora_rank})")
        add_lora(self.lm.blocks, rank, alpha)
        self.config.lora_rank, self.config.lora_alpha = rank, alpha

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict with any LoRA update folded into the weights: a plain LLaVA's tensors."""
        sd = self.state_dict()
        return merge_lora(sd, self.config.lora_alpha / self.config.lora_rank) if self.config.lora_rank else sd

    @property
    def max_seq_len(self) -> int:
        return self.lm.max_seq_len

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return self.lm.new_cache(batch, max_len)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, image_tokens, lm.width): the chosen layers' tokens, projected.

        A frozen tower (no parameter needing a gradient) runs without building a graph.
        """
        cfg = self.config
        frozen = not any(p.requires_grad for p in self.vision.parameters())
        with torch.no_grad() if frozen else contextlib.nullcontext():
            if isinstance(self.vision, ModifiedResNet):
                # the stem's and each stage's feature maps (N, C_i, H_i, W_i) -> one token per cell (N, H_i * W_i, C_i)
                n = len(cfg.vision.layers) + 1
                stages = self.vision.forward_stages(pixel_values, upto=max(i % n for i in cfg.vision_layers))
                feats = torch.cat([stages[i % n].flatten(2).transpose(1, 2) for i in cfg.vision_layers], dim=-1)
            else:
                hidden: list[torch.Tensor] = []  # the first block's input, then each block's output: (N, 1 + P, Dv)
                n = cfg.vision.layers + 1
                layers = [i % n for i in cfg.vision_layers]  # blocks after the last one read are never run
                self.vision.forward_tokens(pixel_values, hidden_states=hidden, upto=max(layers))
                feats = torch.cat([hidden[i] for i in layers], dim=-1)  # (N, 1 + P, Dv * n_layers)
                if cfg.drop_cls:
                    feats = feats[:, 1:]
        return self.projector(feats.to(self.projector.fc1.weight.dtype))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, decoding: bool = False) -> torch.Tensor:
        """input_ids (B, T) -> (B, T, D) LM inputs with image features at the image-token positions.

        The k-th image-token position of the batch (row-major order) receives the k-th feature row of the
        flattened (N_images * image_tokens, D) features: images belong to rows in the order they appear.
        `decoding` (a cached generation step) embeds a generated image-token id as an ordinary token.
        """
        if decoding and pixel_values is None:
            return self.lm.embed(input_ids)
        image_mask = input_ids == self.config.image_token_id  # (B, T)
        # image_token_id may lie outside the vocabulary (LLaVA's -200): those slots are overwritten anyway.
        x = self.lm.embed(input_ids.masked_fill(image_mask, 0))  # (B, T, D)
        n_tokens = int(image_mask.sum())
        if pixel_values is None:
            if n_tokens:
                raise ValueError(f"input_ids hold {n_tokens} image tokens (id {self.config.image_token_id}) "
                                 "but no pixel_values were given")
            return x
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be (N_images, C, H, W), got shape {tuple(pixel_values.shape)}")
        feats = self.encode_images(pixel_values)  # (N, L, D)
        n_images, per_image = feats.shape[:2]
        if n_tokens != n_images * per_image:
            raise ValueError(f"input_ids hold {n_tokens} image tokens (id {self.config.image_token_id}) but the "
                             f"{n_images} image(s) give {n_images * per_image} features ({per_image} per image): "
                             f"each <image> must expand to exactly {per_image} image tokens")
        return x.masked_scatter(image_mask[..., None], feats.to(x.dtype))

    def decode_step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, key_mask: torch.Tensor,
                    cache: KVCache, slot: int | torch.Tensor) -> torch.Tensor:
        """The LM's generation step (LM.decode_step): a generated token is an ordinary token."""
        return self.lm.decode_step(input_ids, position_ids, key_mask, cache, slot)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                only_last: bool = False, logits_at: torch.Tensor | None = None,
                targets: torch.Tensor | None = None) -> LMOutput:
        """input_ids (B, T) with image tokens, pixel_values (N_images, C, H, W) or None -> logits (B, T, V).

        Everything else is the LM's forward (padding on either side, cache, only_last, logits_at, targets).
        """
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            decoding = cache is not None and cache.pos > 0
            inputs_embeds = self.embed(input_ids, pixel_values, decoding=decoding)
        elif pixel_values is not None:
            raise ValueError("pass pixel_values with input_ids (image tokens mark where they go), not with inputs_embeds")
        return self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                       cache=cache, only_last=only_last, logits_at=logits_at, targets=targets)
