"""`mmlm train diffusion`: a text-to-image UNet trained from scratch (pixel space on the embedded shapes by default)
as a `Task` for the one training loop, plus its run config (read from a recipe by `train/recipes.py`).

Each step: images -> x0 in [-1, 1] (or scaled VAE latents), t ~ U{0..T-1}, noise ~ N(0, 1),
x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise; the UNet, reading the text tower's token states, predicts the noise (or
the velocity) and the loss is the mean squared error (Ho et al. 2020), optionally each sample's weighted by its
timestep's capped signal-to-noise ratio (`snr_gamma`, Min-SNR). A share of the captions (`caption_dropout`)
is replaced by the empty prompt, so that one model learns both the conditional and the unconditional prediction
that classifier-free guidance combines. The text tower comes from a trained CLIP (`text_from`) and stays frozen,
or is trained with the UNet when there is none. An exponential moving average of the UNet's weights (`ema_decay`)
is kept beside them: every checkpoint writes it to ema.safetensors, and `mmlm.load` of a checkpoint samples with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .. import distributed
from ..checkpoint import read_state_dict, save, save_tensors
from ..convert.diffusers_pipeline import load_vae
from ..config import TextConfig, to_dict
from ..data.sources import IMAGE_TEXT, DataConfig
from ..data.transforms import PreprocessConfig
from ..diffusion_config import DiffusionConfig, NoiseScheduleConfig, UNetConfig
from ..distributed import all_mean
from ..formats import load as load_model
from ..formats import load_tokenizer
from ..models.diffusion import TextToImage
from ..schedulers import add_noise, min_snr_weight, training_target
from .clip_task import TokenizerConfig
from .loop import TrainConfig, latest_checkpoint, run_training

EMA_NAME = "ema.safetensors"


def shapes_model() -> DiffusionConfig:
    """A small pixel-space model for 32 px shapes: three levels, cross-attention at the two lower ones, the pooled
    prompt added to the timestep embedding."""
    return DiffusionConfig(
        text=TextConfig(vocab_size=1024, eot_token_id=1023, context_length=40, width=128, layers=2, heads=4),
        unet=UNetConfig(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64, 128),
                        cross_attention=(False, True, True), layers_per_block=1, heads=4, cross_attention_dim=0,
                        norm_num_groups=8, addition_embed_type="text", addition_embed_type_num_heads=4),
        vae=None,
        scheduler=NoiseScheduleConfig(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, steps_offset=0,
                                      timestep_spacing="trailing", prediction_type="v_prediction", clip_sample=True),
        guidance=1.5)


@dataclass
class DiffusionRunConfig:
    model: DiffusionConfig = field(default_factory=shapes_model)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)  # used when there is no text_from
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=3e-4, weight_decay=0.0, betas=(0.9, 0.999)))
    text_from: str = ""  # a trained CLIP (anything mmlm.load opens): its text tower and tokenizer, frozen
    # latent diffusion: a trained autoencoder (`mmlm train vae`'s run, a diffusers AutoencoderKL folder, or a
    # latent pipeline), frozen; its config replaces model.vae. Empty: model.vae must be null (pixel space)
    vae_from: str = ""
    caption_dropout: float = 0.1  # share of captions replaced by "" (for classifier-free guidance)
    ema_decay: float = 0.999  # the UNet's weight average: ema = decay ema + (1 - decay) w after each step; 0 = off
    # Min-SNR-gamma loss weighting (Hang et al. 2023; diffusers' --snr_gamma; the paper's 5): 0 = the plain mean
    snr_gamma: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not (math.isfinite(self.snr_gamma) and self.snr_gamma >= 0):
            raise ValueError(f"snr_gamma must be a finite number >= 0 (0: off), got {self.snr_gamma}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def denoising_loss(pred: torch.Tensor, target: torch.Tensor, sched: NoiseScheduleConfig, t: torch.Tensor,
                   snr_gamma: float = 0.0) -> torch.Tensor:
    """The mean squared error of the UNet's prediction (B, C, H, W) against its target, in float32; with snr_gamma,
    each sample's mean first weighted by its timestep's capped signal-to-noise ratio (Min-SNR)."""
    per_sample = (pred.float() - target.float()).square().flatten(1).mean(1)  # (B,)
    if snr_gamma:
        per_sample = per_sample * min_snr_weight(sched, t, snr_gamma)
    return per_sample.mean()


class DiffusionTask:
    """Denoising training of a TextToImage's UNet on image-caption pairs."""

    def __init__(self, cfg: DiffusionRunConfig, model: TextToImage, tokenizer: Any, train_data: Dataset,
                 preprocess: PreprocessConfig, freeze_text: bool):
        self.cfg, self.model, self.tokenizer, self.preprocess, self.data = cfg, model, tokenizer, preprocess, train_data
        model.tokenizer = tokenizer
        self.freeze_text = freeze_text
        if freeze_text:
            model.text_encoder.requires_grad_(False)
        if model.vae is not None:
            model.vae.requires_grad_(False)  # latent diffusion trains the UNet alone
        self.generator = torch.Generator().manual_seed(cfg.train.seed + distributed.world().rank)
        self.empty_ids = tokenizer([""], context_length=cfg.model.text.context_length)  # (1, T)
        self.ema_steps = 0
        self.ema = ({k: v.detach().float().clone() for k, v in model.unet.state_dict().items()}
                    if cfg.ema_decay else None)

    def train_dataset(self) -> Dataset:
        return self.data

    def collate(self, samples):
        from ..data.image_text import ImageTextCollate

        if not hasattr(self, "_collate"):
            self._collate = ImageTextCollate(self.tokenizer, self.cfg.model.text.context_length, self.preprocess)
        return self._collate(samples)

    def step(self, batch: dict[str, Any], autocast) -> dict[str, float]:
        if batch["batch_size"] == 0:
            return {"loss": float("nan")}
        model, sched = self.model, self.cfg.model.scheduler
        if self.freeze_text:
            model.text_encoder.eval()
        x = batch["pixel_values"]  # (B, 3, S, S) in [-1, 1]: preprocessing's mean and std are 0.5
        B, device = x.shape[0], x.device
        ids = batch["input_ids"]  # (B, T') cut to the longest caption: padded back to what sampling feeds
        ids = F.pad(ids, (0, self.cfg.model.text.context_length - ids.shape[1]), value=self.tokenizer.pad_id)
        drop = torch.rand(B, generator=self.generator) < self.cfg.caption_dropout
        ids = torch.where(drop[:, None].to(device), self.empty_ids.to(device), ids)
        if model.vae is not None:  # latent diffusion: the frozen autoencoder's scaled latents (B, L, S/f, S/f)
            with torch.no_grad(), autocast():
                mean, logvar = model.vae.encode(x)
                x = model.vae.sample(mean.float(), logvar.float(), self.generator) * model.vae.scaling_factor
        t = torch.randint(0, sched.num_train_timesteps, (B,), generator=self.generator).to(device)
        noise = torch.randn(x.shape, generator=self.generator).to(device)
        with autocast():
            with torch.set_grad_enabled(not self.freeze_text):
                context = model.encode_prompt(ids)  # (B, T, D)
            pred = model.unet(add_noise(sched, x, noise, t), t, context)
            loss = denoising_loss(pred, training_target(sched, x, noise, t), sched, t, self.cfg.snr_gamma)
        loss.backward()
        return {"loss": all_mean(loss.item())}

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.ema is None:
            return
        self.ema_steps += 1
        decay = min(self.cfg.ema_decay, (1 + self.ema_steps) / (10 + self.ema_steps))  # short memory at first
        for k, v in self.model.unet.state_dict().items():
            ema = self.ema[k]
            if ema.device != v.device:
                self.ema[k] = ema = ema.to(v.device)
            ema.lerp_(v.float(), 1 - decay)

    def load_ema(self, path: Path) -> None:
        """The average a checkpoint holds (a resumed run continues it)."""
        sd = read_state_dict(path)
        self.ema = {k.removeprefix("unet."): v.float() for k, v in sd.items()}
        self.ema_steps = int(self._ema_meta(path).get("ema_steps", "0"))

    @staticmethod
    def _ema_meta(path: Path) -> dict[str, str]:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}

    def evaluate(self) -> dict[str, Any]:
        return {}

    def save_model(self, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        save(self.model, directory, tokenizer=self.tokenizer, preprocess=self.preprocess, state_dict=state_dict)
        if self.ema is not None:
            dtype = next(self.model.unet.parameters()).dtype
            save_tensors(Path(directory) / EMA_NAME, {f"unet.{k}": v.to(dtype) for k, v in self.ema.items()},
                         metadata={"format": "pt", "ema_steps": str(self.ema_steps)})


def build_task(cfg: DiffusionRunConfig, run: Path, resume: bool = True) -> DiffusionTask:
    """The run's data, tokenizer (a trained CLIP's, or a BPE fitted to the captions and written to `run`), model."""
    from ..tokenizer import Tokenizer

    vae = load_vae(cfg.vae_from) if cfg.vae_from else None
    if vae is not None:
        cfg.model.vae = vae.config
    elif cfg.model.vae is not None:
        raise ValueError("model.vae is set but vae_from is empty: latent diffusion trains on a trained autoencoder's "
                         "latents (mmlm train vae), or set model.vae to null for pixel space")
    size = cfg.model.image_size
    preprocess = PreprocessConfig(image_size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    data = IMAGE_TEXT[cfg.data.kind].train(cfg.data, preprocess)
    text_state = None
    if cfg.text_from:
        clip = load_model(cfg.text_from)
        if not hasattr(clip, "text"):
            raise ValueError(f"text_from: {cfg.text_from} is not a CLIP-style model with a text tower")
        tok = load_tokenizer(cfg.text_from)
        cfg.model.text = clip.config.text
        text_state = {k: v for k, v in clip.text.state_dict().items() if not k.startswith("proj.")}
    else:
        saved = run / "tokenizer"
        with distributed.main_first():
            if (saved / "tokenizer.json").is_file():
                tok = load_tokenizer(saved)
            else:
                captions = IMAGE_TEXT[cfg.data.kind].captions(cfg.data, data, min(20_000, max(len(data), 2_000)))
                tok = Tokenizer.train_bpe(captions, vocab_size=cfg.tokenizer.vocab_size,
                                          context_length=cfg.model.text.context_length)
                if distributed.world().is_main:
                    tok.save(saved)
        text = cfg.model.text
        text.vocab_size, text.eot_token_id = tok.vocab_size, tok.eot_id
        text.pool = "argmax" if tok.eot_id == tok.vocab_size - 1 else "eot"
    cfg.model.unet.cross_attention_dim = 0  # the text tower's width: one setting drives the rest
    cfg.model = DiffusionConfig.from_dict(to_dict(cfg.model))  # checked again with the text tower settled
    torch.manual_seed(cfg.train.seed)
    model = TextToImage(cfg.model)
    if vae is not None:
        model.vae.load_state_dict(vae.state_dict())
    if text_state is not None:
        model.text_encoder.load_state_dict(text_state)
    else:
        model.text_encoder.init_weights()
    task = DiffusionTask(cfg, model, tok, data, preprocess, freeze_text=text_state is not None)
    ckpt = latest_checkpoint(run) if resume else None
    if task.ema is not None and ckpt is not None and (ckpt / EMA_NAME).is_file():
        task.load_ema(ckpt / EMA_NAME)
    return task


def train_diffusion(cfg: DiffusionRunConfig, out: str | Path, resume: bool = True) -> dict[str, Any]:
    """Train a text-to-image model per `cfg` into run directory `out` (resuming from its latest checkpoint if any)."""
    return run_training(cfg, out, lambda run: build_task(cfg, run, resume), resume)
