"""CLIP: an image tower and a text tower projected into one space, compared by cosine similarity.

Reference: Radford et al. 2021 and OpenAI's `clip/model.py`; outputs equal transformers' `CLIPModel`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CLIPConfig, ModifiedResNetConfig, ViTConfig
from .resnet import ModifiedResNet
from .text import TextTransformer
from .vit import VisionTransformer


@dataclass
class CLIPOutput:
    logits_per_image: torch.Tensor  # (N_images, N_texts) = scale * cos + bias
    logits_per_text: torch.Tensor  # (N_texts, N_images), the transpose
    image_embeds: torch.Tensor  # (N_images, E), L2-normalised
    text_embeds: torch.Tensor  # (N_texts, E), L2-normalised


def build_vision_tower(cfg: ViTConfig | ModifiedResNetConfig, embed_dim: int) -> nn.Module:
    if isinstance(cfg, ViTConfig):
        return VisionTransformer(cfg, embed_dim)
    if isinstance(cfg, ModifiedResNetConfig):
        return ModifiedResNet(cfg, embed_dim)
    raise TypeError(f"no vision tower for {type(cfg).__name__}")


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        self.visual = build_vision_tower(cfg.vision, cfg.embed_dim)
        self.text = TextTransformer(cfg.text, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        self.logit_bias = None if cfg.logit_bias_init is None else nn.Parameter(torch.tensor(float(cfg.logit_bias_init)))
        self.init_weights()

    def init_weights(self) -> None:
        """OpenAI's initialisation (it matters when training from scratch)."""
        self.visual.init_weights()
        self.text.init_weights()

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, E), projected, not normalised (== transformers' get_image_features)."""
        return self.visual(pixel_values)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(N, T) -> (N, E), projected, not normalised (== transformers' get_text_features)."""
        return self.text(input_ids, attention_mask)

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Normalised (N_img, E), (N_txt, E) -> (N_img, N_txt) scaled cosine similarities (+ bias)."""
        logits = self.logit_scale.exp() * image_embeds @ text_embeds.t()
        return logits if self.logit_bias is None else logits + self.logit_bias

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> CLIPOutput:
        image_embeds = F.normalize(self.encode_image(pixel_values), dim=-1)
        text_embeds = F.normalize(self.encode_text(input_ids, attention_mask), dim=-1)
        logits_per_image = self.logits(image_embeds, text_embeds)
        return CLIPOutput(logits_per_image, logits_per_image.t(), image_embeds, text_embeds)
