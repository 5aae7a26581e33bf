"""`mmlm train vae` (Stable Diffusion's first stage) through the one training loop, tiny, on the CPU, and latent
diffusion on what it trains (`vae_from`): the loss is the formula's, gradients reach every parameter, the saved
autoencoder opens with `mmlm.load` carrying the scaling factor that gives its latents unit variance, a run resumes,
and a latent UNet trains on the frozen autoencoder and samples images at the autoencoder's resolution."""

from __future__ import annotations

import json
import math

import pytest
import torch

import mmlm
from mmlm.assets import recipe_path
from mmlm.models.vae import AutoencoderKL
from mmlm.train.recipes import KINDS, load_recipe
from mmlm.train.vae_task import build_task, kl_to_standard_normal

TINY = ["train.batch_size=4", "train.num_workers=0", "train.precision=fp32", "train.progress=false",
        "train.log_every=1", "train.warmup_steps=1", "data.train_size=32", "data.eval_size=8", "scale_images=16",
        "model.block_out_channels=[8,16]", "model.norm_num_groups=4", "model.sample_size=24"]
# a latent UNet on the tiny autoencoder's 12 x 12 x 4 latents (24 px images)
TINY_LATENT = ["train.batch_size=4", "train.num_workers=0", "train.precision=fp32", "train.progress=false",
               "train.log_every=1", "train.warmup_steps=1", "data.train_size=32", "tokenizer.vocab_size=600",
               "model.text.width=32", "model.text.layers=1", "model.text.heads=2", "model.text.context_length=24",
               "model.unet.block_out_channels=[16,32]", "model.unet.cross_attention=[true,true]", "model.unet.heads=2",
               "model.unet.sample_size=12"]


def test_loss_is_l1_plus_weighted_kl_and_gradients_reach_every_parameter():
    cfg = load_recipe("vae", recipe_path("vae-shapes"), TINY + ["kl_weight=0.01"])
    task = build_task(cfg)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    loss, l1, kl = task.losses(x, torch.Generator().manual_seed(0))
    # the same draw by hand: the formula
    mean, logvar = task.model.encode(x)
    z = AutoencoderKL.sample(mean, logvar, torch.Generator().manual_seed(0))
    rec = (x - task.model.decode(z)).abs().flatten(1).sum(1)
    want_kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).flatten(1).sum(1)
    torch.testing.assert_close(kl_to_standard_normal(mean, logvar), want_kl)
    torch.testing.assert_close(loss, ((rec + 0.01 * want_kl) / (3 * 16 * 16)).mean())
    torch.testing.assert_close(l1, rec.mean() / (3 * 16 * 16))
    assert kl > 0
    loss.backward()
    missing = [n for n, p in task.model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"


@pytest.mark.slow
def test_vae_recipe_trains_saves_with_scaling_factor_resumes_and_feeds_latent_diffusion(tmp_path):
    run = tmp_path / "vae"
    cfg = load_recipe("vae", recipe_path("vae-shapes"), TINY + ["train.steps=2", "train.ckpt_every=2"])
    summary = KINDS["vae"].train(cfg, run)
    assert summary["step"] == 2 and summary["bad_steps"] == 0
    assert summary["eval"]["psnr"] > 0 and 0 < summary["eval"]["l1"] < 1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(v) and 0 < v < 3 for v in losses)
    vae = mmlm.load(run / "final")
    assert isinstance(vae, AutoencoderKL) and vae.config.sample_size == 24
    # the scaling factor: 1 / std of the posterior draws of the first `scale_images` training images
    task = build_task(cfg)
    task.model.load_state_dict(vae.state_dict())
    assert vae.scaling_factor == pytest.approx(task.scaling_factor(), rel=1e-6)
    images = torch.stack([torch.from_numpy(task.data[i]["image"]) for i in range(16)])
    x = task.processor.normalize(images, channels_last=True)
    with torch.no_grad():
        z = AutoencoderKL.sample(*vae.encode(x), torch.Generator().manual_seed(cfg.train.seed))
    assert float(z.std()) * vae.scaling_factor == pytest.approx(1.0, rel=1e-5)
    cfg = load_recipe("vae", recipe_path("vae-shapes"), TINY + ["train.steps=3"])
    assert KINDS["vae"].train(cfg, run)["step"] == 3  # resumed from step 2

    # latent diffusion on it: the autoencoder frozen, its config and weights in the saved model
    lat = tmp_path / "latent"
    cfg = load_recipe("diffusion", recipe_path("diffusion-shapes-latent"),
                      TINY_LATENT + ["train.steps=2", f"vae_from={run / 'final'}"])
    assert KINDS["diffusion"].train(cfg, lat)["step"] == 2
    pipe = mmlm.load(lat / "final")
    trained = mmlm.load(run / "final")
    assert pipe.vae is not None and pipe.config.vae == trained.config and pipe.config.image_size == 24
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(pipe.vae.state_dict()[name], tensor, atol=0, rtol=0)
    images = mmlm.generate_image(pipe, ["a red circle", "a blue star"], steps=2)
    assert images.shape == (2, 3, 24, 24) and 0 <= images.min() and images.max() <= 1
    # judged: beside the rendered scenes, the same scenes through the autoencoder (a latent generator's ceiling)
    from mmlm.eval.generation import ATTRIBUTES, eval_generation
    from mmlm.serve.tiny import tiny_clip

    result = eval_generation(lat / "final", tiny_clip(tmp_path / "judge"), per_group=2, steps=1)
    assert set(result["autoencoded_attributes"]) == set(ATTRIBUTES)
    assert all(0 <= v <= 1 for g in result["groups"].values() for v in g["autoencoded"].values())


def test_latent_recipe_without_an_autoencoder_is_refused(tmp_path):
    cfg = load_recipe("diffusion", recipe_path("diffusion-shapes-latent"), TINY_LATENT + ["train.steps=1"])
    with pytest.raises(ValueError, match="vae_from"):
        KINDS["diffusion"].train(cfg, tmp_path / "run")
    cfg = load_recipe("diffusion", recipe_path("diffusion-shapes-latent"),
                      TINY_LATENT + ["train.steps=1", f"vae_from={tmp_path / 'missing'}"])
    with pytest.raises(FileNotFoundError, match="missing"):
        KINDS["diffusion"].train(cfg, tmp_path / "run")


def test_bad_vae_recipe_field_is_named():
    with pytest.raises(ValueError, match="kl_weight"):
        load_recipe("vae", recipe_path("vae-shapes"), ["kl_weight=nan"])
    with pytest.raises(ValueError, match="norm_num_groups"):
        load_recipe("vae", recipe_path("vae-shapes"), ["model.norm_num_groups=5"])
