"""`mmlm train diffusion`: the shapes recipe through the one training loop, tiny, on the CPU: it trains, writes a
checkpoint that `mmlm.load` opens as a text-to-image model that generates, and resumes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import mmlm
from mmlm.assets import recipe_path
from mmlm.train.recipes import KINDS, load_recipe

TINY = ["train.batch_size=4", "train.num_workers=0", "train.precision=fp32", "train.progress=false",
        "train.log_every=1", "train.warmup_steps=1", "data.train_size=32", "tokenizer.vocab_size=600",
        "model.text.width=32", "model.text.layers=1", "model.text.heads=2", "model.text.context_length=24",
        "model.unet.block_out_channels=[16,32]", "model.unet.cross_attention=[false,true]", "model.unet.heads=2",
        "model.unet.sample_size=24"]


@pytest.mark.slow
def test_shapes_recipe_trains_saves_generates_and_resumes(tmp_path):
    run = tmp_path / "run"
    cfg = load_recipe("diffusion", recipe_path("diffusion-shapes"), TINY + ["train.steps=2", "train.ckpt_every=2"])
    summary = KINDS["diffusion"].train(cfg, run)
    assert summary["step"] == 2 and summary["bad_steps"] == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) and 0.2 < v < 5 for v in losses)
    pipe = mmlm.load(run / "final")
    assert pipe.vae is None and pipe.tokenizer is not None
    images = mmlm.generate_image(pipe, ["a red circle", "a blue star"], steps=2, guidance=2.0)
    assert images.shape == (2, 3, 24, 24) and 0 <= images.min() and images.max() <= 1
    # no guidance asked for: the recipe's own scale, saved with the model
    assert pipe.config.guidance == 1.5
    torch.testing.assert_close(mmlm.generate_image(pipe, ["a red circle"], steps=2),
                               mmlm.generate_image(pipe, ["a red circle"], steps=2, guidance=1.5), atol=0, rtol=0)
    assert not torch.equal(mmlm.generate_image(pipe, ["a red circle"], steps=2),
                           mmlm.generate_image(pipe, ["a red circle"], steps=2, guidance=7.5))
    # sampling uses the average of the UNet's weights, which differs from the last weights
    ema = load_file(run / "final" / "ema.safetensors")
    last = load_file(run / "final" / "model.safetensors")
    name = "unet.conv_out.weight"
    torch.testing.assert_close(pipe.unet.conv_out.weight, ema[name], atol=0, rtol=0)
    assert not torch.equal(ema[name], last[name])
    cfg = load_recipe("diffusion", recipe_path("diffusion-shapes"), TINY + ["train.steps=3"])
    assert KINDS["diffusion"].train(cfg, run)["step"] == 3  # resumed from step 2, its average too
    with safe_open(str(run / "final" / "ema.safetensors"), "pt") as f:
        assert f.metadata()["ema_steps"] == "3"


def test_recipe_reads_and_bad_field_is_named():
    cfg = load_recipe("diffusion", recipe_path("diffusion-shapes"))
    assert cfg.model.vae is None and cfg.model.image_size == 32
    with pytest.raises(ValueError, match="caption_dropout"):
        load_recipe("diffusion", recipe_path("diffusion-shapes"), ["caption_dropout=1.5"])
    for bad in ("nan", "-1"):
        with pytest.raises(ValueError, match="snr_gamma"):
            load_recipe("diffusion", recipe_path("diffusion-shapes"), [f"snr_gamma={bad}"])
    with pytest.raises(ValueError, match="guidance"):
        load_recipe("diffusion", recipe_path("diffusion-shapes"), ["model.guidance=nan"])
    with pytest.raises(ValueError, match="in_channels"):
        load_recipe("diffusion", recipe_path("diffusion-shapes"), ["model.unet.in_channels=4"])


def test_the_denoising_loss_is_the_mean_squared_error_or_its_min_snr_weighting():
    from mmlm.schedulers import alphas_cumprod
    from mmlm.train.diffusion_task import denoising_loss

    sched = load_recipe("diffusion", recipe_path("diffusion-shapes")).model.scheduler  # v-prediction
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(denoising_loss(pred, target, sched, t), torch.nn.functional.mse_loss(pred, target))
    a = alphas_cumprod(sched)[t]
    snr = a / (1 - a)
    by_hand = sum(min(float(snr[i]), 5.0) / (float(snr[i]) + 1) * float((pred[i] - target[i]).square().mean())
                  for i in range(4)) / 4
    assert float(denoising_loss(pred, target, sched, t, snr_gamma=5.0)) == pytest.approx(by_hand, rel=1e-5)
