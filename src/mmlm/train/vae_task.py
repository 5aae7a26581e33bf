"""`mmlm train vae`: Stable Diffusion's first stage, the KL autoencoder, trained on images alone as a `Task` for the
one training loop, plus its run config (read from a recipe by `train/recipes.py`).

Latent diffusion (Rombach et al. 2022) splits generation in two: an autoencoder squeezes images into a small latent
grid that keeps what the eye sees, then the UNet learns to generate latents, 1/f^2 as many positions as pixels.
Each step here:

    x (B, 3, H, W) in [-1, 1] --encode--> mean, logvar (B, L, H/f, W/f)
    z = mean + exp(logvar / 2) * noise                   a draw from the diagonal Gaussian
    x_hat = decode(z)                                    (B, 3, H, W)
    loss = ( sum |x - x_hat|  +  kl_weight * KL(N(mean, exp(logvar)) || N(0, 1)) ) / (3 H W), averaged over images
    KL = 1/2 sum over the latent of (mean^2 + exp(logvar) - 1 - logvar)

The small KL weight (the LDM paper's 1e-6) keeps the latents from drifting to huge values without blurring them.
Left out from the paper's recipe: the perceptual (LPIPS) and adversarial losses, which sharpen natural photos'
texture; on the flat-coloured shapes L1 alone gets colours and places right and rounds the corners of small
objects (docs/results.md). Every checkpoint writes the autoencoder with its
`scaling_factor`, 1 / the standard deviation of the latents of the first `scale_images` training images, so the
UNet trained on it sees latents of unit variance (Stable Diffusion's 0.18215 was found the same way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .. import distributed
from ..checkpoint import save
from ..config import to_dict
from ..data.sources import IMAGE_TEXT, DataConfig
from ..data.transforms import ImageProcessor, PreprocessConfig
from ..diffusion_config import VAEConfig
from ..distributed import all_mean
from ..models.vae import AutoencoderKL
from .loop import TrainConfig, run_training


def shapes_vae() -> VAEConfig:
    """A small autoencoder for 64 px shapes: three levels (64 -> 32 -> 16), 4 latent channels."""
    return VAEConfig(block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                     sample_size=64, scaling_factor=1.0)


@dataclass
class VAERunConfig:
    model: VAEConfig = field(default_factory=shapes_vae)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999)))
    kl_weight: float = 1e-6
    scale_images: int = 512  # training images whose latents set scaling_factor

    def __post_init__(self) -> None:
        if not (math.isfinite(self.kl_weight) and self.kl_weight >= 0):
            raise ValueError(f"kl_weight must be a finite number >= 0, got {self.kl_weight}")
        if self.scale_images < 1:
            raise ValueError(f"scale_images must be >= 1, got {self.scale_images}")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per image, summed over the latent: (B, L, h, w) -> (B,)."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


class VAETask:
    """Reconstruction training of an AutoencoderKL on a dataset's images (its captions are not read)."""

    def __init__(self, cfg: VAERunConfig, model: AutoencoderKL, train_data: Dataset, preprocess: PreprocessConfig):
        self.cfg, self.model, self.data, self.preprocess = cfg, model, train_data, preprocess
        self.processor = ImageProcessor(preprocess)
        self.generator = torch.Generator().manual_seed(cfg.train.seed + distributed.world().rank)
        self._eval_images: torch.Tensor | None = None

    def train_dataset(self) -> Dataset:
        return self.data

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        good = [s for s in samples if "bad" not in s]
        bad = [s["bad"] for s in samples if "bad" in s]
        if not good:
            return {"pixel_values": None, "bad": bad, "batch_size": 0}
        images = torch.from_numpy(np.stack([s["image"] for s in good]))  # (B, S, S, 3) uint8
        return {"pixel_values": self.processor.normalize(images, channels_last=True), "bad": bad,
                "batch_size": len(good)}

    def losses(self, x: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, 3, H, W) in [-1, 1] -> (loss, L1 per pixel, KL per image), each averaged over the images."""
        mean, logvar = self.model.encode(x)  # (B, L, h, w) each
        x_hat = self.model.decode(AutoencoderKL.sample(mean, logvar, generator))  # (B, 3, H, W)
        rec = (x - x_hat.float()).abs().flatten(1).sum(1)  # (B,)
        kl = kl_to_standard_normal(mean.float(), logvar.float())  # (B,)
        pixels = x[0].numel()
        loss = ((rec + self.cfg.kl_weight * kl) / pixels).mean()
        return loss, rec.mean() / pixels, kl.mean()

    def step(self, batch: dict[str, Any], autocast) -> dict[str, float]:
        if batch["batch_size"] == 0:
            return {"loss": float("nan")}
        x = batch["pixel_values"]
        with autocast():
            loss, l1, kl = self.losses(x, self.generator)
        loss.backward()
        return {"loss": all_mean(loss.item()), "l1": all_mean(l1.item()), "kl": all_mean(kl.item())}

    def after_optimizer_step(self) -> None:
        pass

    def _images(self, n: int, start: int = 0) -> torch.Tensor:
        """Images start..start+n-1 of the training set, normalised (N, 3, S, S)."""
        items = [self.data[i] for i in range(start, min(start + n, len(self.data)))]
        return self.processor.normalize(torch.from_numpy(np.stack([s["image"] for s in items if "bad" not in s])),
                                        channels_last=True)

    def evaluate(self) -> dict[str, Any]:
        """Reconstruction of held-out images (the mean latent decoded): L1 and PSNR in [0, 1] pixel units."""
        if self._eval_images is None:
            zeroshot, retrieval = IMAGE_TEXT[self.cfg.data.kind].evaluation(self.cfg.data, self.preprocess)
            sets = [r[1] for r in retrieval] or [z[1] for z in zeroshot]
            if not sets:
                return {}
            self._eval_images = self.processor.normalize(torch.from_numpy(sets[0]), channels_last=True)
        device = next(self.model.parameters()).device
        l1 = se = 0.0
        for chunk in self._eval_images.split(64):
            x = chunk.to(device)
            x_hat = self.model.decode(self.model.encode(x)[0]).float().clamp(-1, 1)
            l1 += float((x - x_hat).abs().mean((1, 2, 3)).sum()) / 2  # [-1, 1] -> [0, 1] units
            se += float(((x - x_hat) / 2).square().mean((1, 2, 3)).clamp_min(1e-10).log10().sum())
        n = len(self._eval_images)
        return {"l1": l1 / n, "psnr": -10.0 * se / n}

    @torch.no_grad()
    def scaling_factor(self) -> float:
        """1 / std of the latents (draws from the posterior) of the first `scale_images` training images."""
        device = next(self.model.parameters()).device
        generator = torch.Generator().manual_seed(self.cfg.train.seed)
        zs = []
        for start in range(0, min(self.cfg.scale_images, len(self.data)), 64):
            x = self._images(min(64, self.cfg.scale_images - start), start).to(device)
            mean, logvar = self.model.encode(x)
            zs.append(AutoencoderKL.sample(mean.float().cpu(), logvar.float().cpu(), generator))
        return 1.0 / float(torch.cat(zs).std())

    def save_model(self, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        self.model.cfg.scaling_factor = self.scaling_factor()
        save(self.model, directory, preprocess=self.preprocess, state_dict=state_dict)


def build_task(cfg: VAERunConfig) -> VAETask:
    preprocess = PreprocessConfig(image_size=cfg.model.sample_size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    data = IMAGE_TEXT[cfg.data.kind].train(cfg.data, preprocess)
    torch.manual_seed(cfg.train.seed)
    return VAETask(cfg, AutoencoderKL(cfg.model), data, preprocess)


def train_vae(cfg: VAERunConfig, out: str | Path, resume: bool = True) -> dict[str, Any]:
    """Train an autoencoder per `cfg` into run directory `out` (resuming from its latest checkpoint if any)."""
    return run_training(cfg, out, lambda run: build_task(cfg), resume)
