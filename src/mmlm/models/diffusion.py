"""A text-to-image diffusion model as the chapter draws it: encoder -> cross-modal interaction -> generative decoder.

    prompt ids (B, T) --text_encoder (CLIP text tower)--> token states (B, T, D)      the encoder
    noisy latents (B, C, h, w) + t + token states --unet (cross-attention)--> noise  the cross-modal interaction
    noise -> scheduler step, repeated from pure noise --> latents --vae.decode--> image  the generative decoder

`mmlm.generate_image` runs the loop (image_generation.py); `schedulers.py` holds the steps. In pixel space
(`vae` None) the UNet works on the RGB pixels themselves.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..diffusion_config import DiffusionConfig
from .text import TextTransformer
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL


class TextToImage(nn.Module):
    """The parts of a Stable-Diffusion-architecture model: `.text_encoder`, `.unet`, `.vae` (None in pixel
    space), `.scheduler` (the noise schedule's config) and `.tokenizer` (attached by the loader; None when the
    model was built bare)."""

    def __init__(self, cfg: DiffusionConfig):
        super().__init__()
        self.config = cfg
        self.text_encoder = TextTransformer(cfg.text, None)
        self.unet = UNet2DConditionModel(cfg.unet)
        self.vae = AutoencoderKL(cfg.vae) if cfg.vae is not None else None
        self.tokenizer: Any = None

    @property
    def scheduler(self):
        return self.config.scheduler

    def encode_prompt(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, D): the text tower's token states after its final LayerNorm (no pooling: the UNet
        attends to every token)."""
        return self.text_encoder.forward_tokens(input_ids)

    def to_image(self, latents: torch.Tensor) -> torch.Tensor:
        """The sampler's result -> pixels in [0, 1] (B, 3, H, W)."""
        x = latents if self.vae is None else self.vae.decode(latents / self.vae.scaling_factor)
        return (x / 2 + 0.5).clamp(0, 1)

    def to_latents(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [0, 1] (B, 3, H, W) -> what the UNet is trained on: [-1, 1] pixels, or scaled VAE latents."""
        x = images * 2 - 1
        if self.vae is None:
            return x
        mean, logvar = self.vae.encode(x)
        return self.vae.sample(mean, logvar, generator) * self.vae.scaling_factor
