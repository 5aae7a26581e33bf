"""Text-to-image sampling with classifier-free guidance: `mmlm.generate_image`.

    ids = tokenizer(prompts), tokenizer(negative prompts)   -> token states (B, T, D) each, the text encoder's
    x = noise (B, C, h, w) * the sampler's initial sigma     (seeded: the same seed gives the same images)
    for t in the sampler's timesteps:
        eps_uncond, eps_text = unet([x, x], t, [uncond states, text states])       one batch of 2B
        eps = eps_uncond + guidance * (eps_text - eps_uncond)                     (Ho & Salimans 2022)
        x = sampler step(eps, t, x)
    image = decode(x) in [0, 1]

The same loop, the same order of operations and the same random draws as diffusers' StableDiffusionPipeline.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .models.diffusion import TextToImage
from .models.kernels import conv_weights_layout
from .schedulers import SAMPLERS, sampler

MAX_STEPS = 1000


def _check_request(prompts: Sequence[str], steps: int, guidance: float, scheduler: str) -> None:
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty string or list of strings")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps must be an integer from 1 to {MAX_STEPS}, got {steps!r}")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number, got {guidance!r}")
    if scheduler not in SAMPLERS:
        raise ValueError(f"scheduler must be one of {SAMPLERS}, got {scheduler!r}")


@torch.no_grad()
def generate_image(pipe: TextToImage, prompts: str | Sequence[str], steps: int = 50, guidance: float | None = None, seed: int = 0,
                   scheduler: str = "ddim", latents: torch.Tensor | None = None, negative_prompt: str = "",
                   height: int | None = None, width: int | None = None,
                   on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] for `prompts`; guidance > 1 applies classifier-free guidance against
    `negative_prompt`. `latents` (B, C, h, w) given: no noise is drawn (they are scaled by the sampler's initial
    sigma, as diffusers does); else they are drawn from `seed`. H, W default to the model's image size.
    `on_step(i)` is called after each sampling step; an exception it raises stops sampling (the server stops a
    request its client abandoned this way)."""
    if not isinstance(pipe, TextToImage):
        raise ValueError(f"generate_image needs a text-to-image model (mmlm.load of a diffusers pipeline dir or an "
                         f"mmlm diffusion run), got {type(pipe).__name__}")
    if isinstance(prompts, str):
        prompts = [prompts]
    if guidance is None:  # the model's own scale (its config's `guidance`)
        guidance = pipe.config.guidance
    _check_request(prompts, steps, guidance, scheduler)
    if pipe.tokenizer is None:
        raise ValueError("the model has no tokenizer (load it with mmlm.load, or set pipe.tokenizer)")
    cfg = pipe.config
    param = next(pipe.unet.parameters())
    device, dtype = param.device, param.dtype
    factor = cfg.vae.downscale if cfg.vae is not None else 1
    height, width = height or cfg.image_size, width or cfg.image_size
    for name, size in (("height", height), ("width", width)):
        if size % (factor * 2 ** (len(cfg.unet.block_out_channels) - 1)):
            raise ValueError(f"{name} {size} must be a multiple of {factor * 2 ** (len(cfg.unet.block_out_channels) - 1)}")
    B = len(prompts)
    context_length = min(pipe.tokenizer.context_length, cfg.text.context_length)
    text = pipe.encode_prompt(pipe.tokenizer(list(prompts), context_length=context_length).to(device))  # (B, T, D)
    guided = guidance > 1
    if guided:
        uncond = pipe.encode_prompt(pipe.tokenizer([negative_prompt] * B, context_length=context_length).to(device))
        text = torch.cat([uncond, text])  # (2B, T, D): unconditional rows first
    plan = sampler(cfg.scheduler, scheduler, steps)
    generator = torch.Generator().manual_seed(seed)
    shape = (B, cfg.unet.in_channels, height // factor, width // factor)
    if latents is None:
        latents = torch.randn(shape, generator=generator, dtype=dtype)
    elif tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
    x = latents.to(device=device, dtype=dtype) * plan.init_noise_sigma
    with conv_weights_layout(pipe.unet, pipe.vae):  # the convolutions' weights as their inputs: channels-last
        for i, t in enumerate(plan.timesteps):
            x_in = plan.scale_input(torch.cat([x, x]) if guided else x, i)
            out = pipe.unet(x_in, t.to(device), text)
            if guided:
                out_uncond, out_text = out.chunk(2)
                out = out_uncond + guidance * (out_text - out_uncond)
            x = plan.step(out, i, x, generator)
            if on_step is not None:
                on_step(i)
        return pipe.to_image(x).contiguous()  # (B, 3, H, W), NCHW whatever layout the kernels chose


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) images in [0, 1] -> (B, H, W, 3) uint8 pixels, as image files hold them."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_images(images: torch.Tensor, out: str | Path) -> list[Path]:
    """Write (B, 3, H, W) images in [0, 1] as PNGs: `out` itself for one image, else `out`'s stem + -0, -1, ..."""
    from PIL import Image

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(len(images))]
    for p, a in zip(paths, to_uint8(images)):
        Image.fromarray(a).save(p)
    return paths
