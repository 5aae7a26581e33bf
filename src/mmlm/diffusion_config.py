"""Typed configs of the generation family: the conditional UNet, the KL autoencoder, the noise schedule, and the
text-to-image model that holds them with a CLIP text tower.

As in config.py: an explicit `kind` per part, derived sizes filled in `__post_init__`, every config round-trips
through plain dicts (config.json). The field names follow diffusers' where they mean the same thing, so a reader
of a diffusers `config.json` finds them here; `heads` is the one rename (diffusers calls the per-block head count
`attention_head_dim` in Stable Diffusion's UNets).
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .config import TextConfig, from_dict, to_dict

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _per_level(value: Any, n: int, name: str) -> tuple:
    """An int (the same for every level) or one value per level -> a tuple of n."""
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * n
    _check(len(values) == n, f"{name} lists {len(values)} values for {n} resolution levels")
    return values


@dataclass
class UNetConfig:
    """Stable Diffusion 1.x / 2.x's conditional UNet (diffusers' `UNet2DConditionModel` with CrossAttnDownBlock2D,
    DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D and CrossAttnUpBlock2D).

    One entry of `block_out_channels` per resolution level; `cross_attention[i]` says whether level i's down
    block (and its mirror up block) holds Transformer2D blocks. `heads` is the number of attention heads (an
    int, or one per level; the mid block uses the last), each head `channels // heads` wide."""

    kind: str = "unet2d_condition"
    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280, 1280)
    cross_attention: tuple = (True, True, True, False)
    layers_per_block: int = 2
    transformer_layers_per_block: int = 1
    heads: Union[int, list] = 8
    cross_attention_dim: int = 768  # the text states' width; 0 = the text tower's (DiffusionConfig fills it in)
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    upcast_attention: bool = False  # softmax(q k^T) in float32 when running in half precision
    # "text": the prompt, attention-pooled from its token states, is added to the timestep embedding, so every
    # resnet at every resolution sees it (DeepFloyd IF's; diffusers' addition_embed_type "text"). None: SD's
    # UNet, where the prompt reaches the picture only through cross-attention.
    addition_embed_type: Optional[str] = None
    addition_embed_type_num_heads: int = 64

    def __post_init__(self) -> None:
        _check(self.kind == "unet2d_condition", f"UNetConfig.kind must be 'unet2d_condition', got {self.kind!r}")
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        n = len(self.block_out_channels)
        _check(n >= 1, "unet.block_out_channels must list at least one level")
        self.cross_attention = tuple(bool(c) for c in _per_level(self.cross_attention, n, "unet.cross_attention"))
        heads = _per_level(self.heads, n, "unet.heads")
        for i, (c, h) in enumerate(zip(self.block_out_channels, heads)):
            _check(c % self.norm_num_groups == 0,
                   f"unet.block_out_channels[{i}] = {c} is not a multiple of unet.norm_num_groups {self.norm_num_groups}")
            _check(h > 0 and c % h == 0, f"unet.heads[{i}] = {h} does not divide unet.block_out_channels[{i}] = {c}")
        self.heads = list(heads) if isinstance(self.heads, (list, tuple)) else int(self.heads)
        _check(self.layers_per_block >= 1, f"unet.layers_per_block must be >= 1, got {self.layers_per_block}")
        _check(self.addition_embed_type in (None, "text"),
               f"unet.addition_embed_type must be null or 'text', got {self.addition_embed_type!r}")
        if self.addition_embed_type == "text" and self.cross_attention_dim:
            _check(self.cross_attention_dim % self.addition_embed_type_num_heads == 0,
                   f"unet.addition_embed_type_num_heads = {self.addition_embed_type_num_heads} does not divide "
                   f"unet.cross_attention_dim = {self.cross_attention_dim}")
        _check(self.transformer_layers_per_block >= 1,
               f"unet.transformer_layers_per_block must be >= 1, got {self.transformer_layers_per_block}")

    @property
    def level_heads(self) -> tuple:
        return _per_level(self.heads, len(self.block_out_channels), "unet.heads")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]


@dataclass
class VAEConfig:
    """Stable Diffusion's KL autoencoder (diffusers' `AutoencoderKL`): images <-> latents of `latent_channels`
    at 1 / 2^(levels - 1) the resolution; `scaling_factor` brings the latents to about unit variance."""

    kind: str = "autoencoder_kl"
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        _check(self.kind == "autoencoder_kl", f"VAEConfig.kind must be 'autoencoder_kl', got {self.kind!r}")
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        for i, c in enumerate(self.block_out_channels):
            _check(c % self.norm_num_groups == 0,
                   f"vae.block_out_channels[{i}] = {c} is not a multiple of vae.norm_num_groups {self.norm_num_groups}")

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass
class NoiseScheduleConfig:
    """The forward (noising) process a model was trained with, which every sampler shares: the betas, what the
    UNet predicts, and how sampling picks its timesteps (diffusers' scheduler_config.json fields)."""

    kind: str = "noise_schedule"
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = False

    def __post_init__(self) -> None:
        _check(self.kind == "noise_schedule", f"NoiseScheduleConfig.kind must be 'noise_schedule', got {self.kind!r}")
        _check(self.beta_schedule in BETA_SCHEDULES,
               f"scheduler.beta_schedule {self.beta_schedule!r} is not one of {BETA_SCHEDULES}")
        _check(self.prediction_type in PREDICTION_TYPES,
               f"scheduler.prediction_type {self.prediction_type!r} is not one of {PREDICTION_TYPES}")
        _check(self.timestep_spacing in TIMESTEP_SPACINGS,
               f"scheduler.timestep_spacing {self.timestep_spacing!r} is not one of {TIMESTEP_SPACINGS}")
        _check(self.num_train_timesteps >= 1,
               f"scheduler.num_train_timesteps must be >= 1, got {self.num_train_timesteps}")


@dataclass
class DiffusionConfig:
    """A latent (or pixel-space, `vae` None) text-to-image diffusion model: a CLIP text tower whose token states
    (B, T, D) condition the UNet through cross-attention, and the noise schedule its sampler runs."""

    kind: str = "diffusion"
    text: TextConfig = field(default_factory=TextConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: Optional[VAEConfig] = field(default_factory=VAEConfig)
    scheduler: NoiseScheduleConfig = field(default_factory=NoiseScheduleConfig)
    # the classifier-free guidance scale sampling uses when none is asked for: diffusers' 7.5 for Stable Diffusion;
    # a recipe sets what suits its model (the shapes model: 1.5)
    guidance: float = 7.5

    def __post_init__(self) -> None:
        _check(self.kind == "diffusion", f"DiffusionConfig.kind must be 'diffusion', got {self.kind!r}")
        if isinstance(self.text, dict):
            self.text = from_dict(TextConfig, self.text, ".text")
        if isinstance(self.unet, dict):
            self.unet = from_dict(UNetConfig, self.unet, ".unet")
        if isinstance(self.vae, dict):
            self.vae = from_dict(VAEConfig, self.vae, ".vae")
        if isinstance(self.scheduler, dict):
            self.scheduler = from_dict(NoiseScheduleConfig, self.scheduler, ".scheduler")
        _check(isinstance(self.guidance, (int, float)) and not isinstance(self.guidance, bool)
               and math.isfinite(self.guidance) and self.guidance >= 0,
               f"DiffusionConfig.guidance must be a finite number >= 0, got {self.guidance!r}")
        if not self.unet.cross_attention_dim:
            self.unet.cross_attention_dim = self.text.width
        _check(self.unet.cross_attention_dim == self.text.width,
               f"unet.cross_attention_dim {self.unet.cross_attention_dim} must equal text.width {self.text.width}")
        image_channels = self.vae.latent_channels if self.vae is not None else 3
        _check(self.unet.in_channels == image_channels,
               f"unet.in_channels {self.unet.in_channels} must be {image_channels} "
               f"({'vae.latent_channels' if self.vae is not None else 'RGB pixels: no vae'})")

    @property
    def image_size(self) -> int:
        """The default output size in pixels."""
        return self.unet.sample_size * (self.vae.downscale if self.vae is not None else 1)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DiffusionConfig":
        return from_dict(cls, d)
