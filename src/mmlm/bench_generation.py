"""`mmlm bench generation`: text-to-image sampling speed of mmlm next to diffusers, in one process.

A guided DDIM run (50 steps, guidance 7.5, a batch of 8 prompts: the UNet sees 16 rows a step) on the same
weights and the same initial noise, A/B alternated, median of the repeats with the spread, images/s and the
ratio mmlm / diffusers. Two models:

- `shapes`: the pixel-space model of `configs/diffusion-shapes.yaml` (32 px, three levels), random weights.
  diffusers has no pipeline for a pixel-space text-conditioned UNet, so its side is `UNet2DConditionModel` and
  `DDIMScheduler` in the loop `StableDiffusionPipeline.__call__` runs, on mmlm's text states.
- `tiny-sd`: an SD-1.x-like pipeline (CLIPTextModel, a UNet with cross-attention at two levels, AutoencoderKL,
  64 px images from 16 x 16 latents), random weights, saved with `save_pretrained`: diffusers runs its
  `StableDiffusionPipeline`, mmlm `mmlm.load`s the same directory and runs `mmlm.generate_image`.

Before timing, both runs' images are compared (`generation_parity`): a wrong comparison shows there first.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from .bench_common import Emit, print_row, rates, time_ab

TARGET = 1.5  # images/s, mmlm / diffusers
GUIDANCE = 7.5
WORDS = ["<|startoftext|>", "<|endoftext|>", "a", "red", "blue", "green", "circle", "square", "star", "large", "small",
         "in", "the", "top", "left", "right", "bottom", "centre"]


def require_diffusers():
    try:
        import diffusers
        import transformers
    except ImportError:
        raise NotImplementedError("`mmlm bench generation` compares against diffusers, which is not installed: "
                                  "pip install 'mmlm[interop]' (or pip install diffusers transformers)") from None
    diffusers.utils.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    return diffusers, transformers


def _prompts(batch: int) -> list[str]:
    colours, shapes, places = ["red", "blue", "green"], ["circle", "square", "star"], ["top left", "bottom right"]
    return [f"a {'large' if i % 2 else 'small'} {colours[i % 3]} {shapes[i // 3 % 3]} in the {places[i % 2]}"
            for i in range(batch)]


def _randomize(module: torch.nn.Module, std: float) -> None:
    """Random weights everywhere (diffusers zero-initialises some output convs: a bench must not run on zeros)."""
    g = torch.Generator().manual_seed(0)
    for p in module.parameters():
        p.data = torch.randn(p.shape, generator=g) * std


def _diffusers_loop(unet, scheduler, text: torch.Tensor, latents: torch.Tensor, steps: int,
                    decode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """StableDiffusionPipeline.__call__'s denoising loop, for a model it has no pipeline for."""
    scheduler.set_timesteps(steps)
    x = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = unet(scheduler.scale_model_input(torch.cat([x, x]), t), t, encoder_hidden_states=text).sample
        uncond, cond = eps.chunk(2)
        x = scheduler.step(uncond + GUIDANCE * (cond - uncond), t, x).prev_sample
    return decode(x)


def shapes_pair(workdir: Path, batch: int, steps: int) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(mmlm run, diffusers run) for the shapes recipe's model, random weights."""
    import mmlm
    from .convert.diffusers_pipeline import rules_for, scheduler_config_to_diffusers, unet_config_to_diffusers
    from .convert.mapping import rename
    from .models.diffusion import TextToImage
    from .tokenizer import Tokenizer
    from .train.diffusion_task import shapes_model

    diffusers, _ = require_diffusers()
    torch.manual_seed(0)
    cfg = shapes_model()
    tok = Tokenizer.train_bpe(_prompts(64), vocab_size=cfg.text.vocab_size, context_length=cfg.text.context_length)
    cfg.text.vocab_size, cfg.text.eot_token_id = tok.vocab_size, tok.eot_id
    ours = TextToImage(cfg).eval()
    _randomize(ours, 0.05)
    ours.tokenizer = tok
    theirs = diffusers.UNet2DConditionModel(**unet_config_to_diffusers(cfg.unet)).eval()
    theirs.load_state_dict(rename(ours.unet.state_dict(), rules_for(ours.unet), "to_theirs", "bench"))
    scheduler = diffusers.DDIMScheduler(**scheduler_config_to_diffusers(cfg.scheduler))
    prompts = _prompts(batch)
    latents = torch.randn(batch, 3, cfg.unet.sample_size, cfg.unet.sample_size, generator=torch.Generator().manual_seed(1))
    ids = ours.tokenizer(prompts, context_length=cfg.text.context_length)
    empty = ours.tokenizer([""] * batch, context_length=cfg.text.context_length)
    with torch.no_grad():
        text = torch.cat([ours.encode_prompt(empty), ours.encode_prompt(ids)])

    def run_ours():
        return mmlm.generate_image(ours, prompts, steps=steps, guidance=GUIDANCE, latents=latents)

    @torch.no_grad()
    def run_theirs():
        return _diffusers_loop(theirs, scheduler, text, latents, steps, lambda x: (x / 2 + 0.5).clamp(0, 1))

    return run_ours, run_theirs


def tiny_sd_pair(workdir: Path, batch: int, steps: int) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(mmlm run, diffusers run) of one SD-1.x-like StableDiffusionPipeline directory, random weights."""
    import mmlm

    diffusers, transformers = require_diffusers()
    torch.manual_seed(0)
    chars = sorted({c for w in WORDS[2:] for c in w})
    vocab = {w: i for i, w in enumerate(WORDS[:2] + [w + "</w>" for w in WORDS[2:]] + chars + [c + "</w>" for c in chars])}
    (workdir / "vocab.json").write_text(json.dumps(vocab))
    (workdir / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(workdir / "vocab.json"), str(workdir / "merges.txt"), model_max_length=16)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=64, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8)
    vae = diffusers.AutoencoderKL(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                                  up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, layers_per_block=1,
                                  norm_num_groups=8, sample_size=64)
    for m in (unet, vae):
        _randomize(m, 0.05)
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                    clip_sample=False, set_alpha_to_one=False)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(workdir / "tiny-sd", safe_serialization=True)
    pipe.set_progress_bar_config(disable=True)
    ours = mmlm.load(workdir / "tiny-sd")
    prompts = _prompts(batch)
    latents = torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(1))

    def run_ours():
        return mmlm.generate_image(ours, prompts, steps=steps, guidance=GUIDANCE, latents=latents)

    @torch.no_grad()
    def run_theirs():
        return pipe(prompts, num_inference_steps=steps, guidance_scale=GUIDANCE, latents=latents.clone(),
                    output_type="pt").images

    return run_ours, run_theirs


MODELS = {"shapes": shapes_pair, "tiny-sd": tiny_sd_pair}


def bench_generation(quick: bool = False, batch: int = 8, steps: int = 50, models: tuple[str, ...] = tuple(MODELS),
                     emit: Emit = print_row) -> list[dict]:
    """Guided DDIM sampling, mmlm vs diffusers on the same weights and noise (CPU, fp32); JSON rows."""
    repeats = 3 if quick else 5
    rows: list[dict] = []

    def out(row: dict) -> None:
        row = {**row, "batch": batch, "steps": steps, "threads": torch.get_num_threads(), "repeats": repeats}
        rows.append(row)
        emit(row)

    for name in models:
        with tempfile.TemporaryDirectory() as tmp:
            run_ours, run_theirs = MODELS[name](Path(tmp), batch, steps)
            diff = (run_ours() - run_theirs()).abs().max().item()
            out({"bench": "generation_parity", "model": name, "image_max_abs_diff": diff})
            times = time_ab({"mmlm": run_ours, "diffusers": run_theirs}, repeats)
        med = {}
        for lib, secs in times.items():
            r = rates(batch, secs, "images_per_s")
            med[lib] = r["images_per_s_median"]
            out({"bench": "generation", "model": name, "library": lib, "unit": "images/s", **r})
        ratio = med["mmlm"] / med["diffusers"]
        out({"bench": "generation", "model": name, "library": "mmlm/diffusers", "ratio": round(ratio, 2),
             "target": TARGET, "met": ratio >= TARGET})
    return rows
