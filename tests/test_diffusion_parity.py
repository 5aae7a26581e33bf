"""Text-to-image parity with diffusers (a test-only reference, like transformers): tiny random parts built here,
fp32. The UNet in an SD-1.x-like and an SD-2.x-like config, the KL autoencoder, the three samplers over whole
schedules, a whole guided DDIM run of a StableDiffusionPipeline saved to disk, and the export back."""

from __future__ import annotations

import math

import pytest
import torch

import mmlm
from mmlm.convert.diffusers_pipeline import (export_pipeline, rules_for, scheduler_config_from_diffusers,
                                             unet_config_from_diffusers, vae_config_from_diffusers)
from mmlm.convert.mapping import rename
from mmlm.models.unet import UNet2DConditionModel
from mmlm.models.vae import AutoencoderKL
from mmlm import schedulers

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("kernel_mode")

SD1 = dict(sample_size=8, block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=2, cross_attention_dim=24,
           norm_num_groups=8, attention_head_dim=4, use_linear_projection=False)
SD2 = dict(sample_size=8, block_out_channels=(16, 32, 32), layers_per_block=1, cross_attention_dim=24, norm_num_groups=8,
           down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
           attention_head_dim=[2, 4, 8], use_linear_projection=True, transformer_layers_per_block=2)
# the pooled prompt added to the timestep embedding (DeepFloyd IF's addition_embed_type "text")
POOLED = dict(SD1, addition_embed_type="text", addition_embed_type_num_heads=4)
VAE = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2, norm_num_groups=4,
           up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1, sample_size=16)


def _randomize(module: torch.nn.Module, std: float = 0.1) -> None:
    """Random weights everywhere (diffusers zero-initialises some output convs, which would hide errors)."""
    g = torch.Generator().manual_seed(0)
    for p in module.parameters():
        p.data = torch.randn(p.shape, generator=g) * std


def _unet_pair(kwargs):
    ref = diffusers.UNet2DConditionModel(**kwargs).eval()
    _randomize(ref)
    ours = UNet2DConditionModel(unet_config_from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(rename(ref.state_dict(), rules_for(ours), "to_ours", "test"))
    return ref, ours


@pytest.mark.parametrize("kwargs", [SD1, SD2, POOLED],
                         ids=["sd1-conv-proj-int-heads", "sd2-linear-proj-head-list", "pooled-text-in-timestep"])
def test_unet_matches_diffusers(kwargs):
    ref, ours = _unet_pair(kwargs)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 24)
    with torch.no_grad():
        for t in (torch.tensor(999), torch.tensor([3, 500]), 41.5):
            want = ref(x, t, encoder_hidden_states=ctx).sample
            torch.testing.assert_close(ours(x, t, ctx), want, atol=1e-4, rtol=0)
    # an odd size: the up path resizes to the skip's size, as diffusers' forward_upsample_size
    x = torch.randn(1, 4, 6, 10)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, 10, ctx[:1]), ref(x, 10, encoder_hidden_states=ctx[:1]).sample, atol=1e-4, rtol=0)


def test_autoencoder_matches_diffusers():
    ref = diffusers.AutoencoderKL(**VAE).eval()
    _randomize(ref)
    ours = AutoencoderKL(vae_config_from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(rename(ref.state_dict(), rules_for(ours), "to_ours", "test"))
    x, z = torch.randn(2, 3, 16, 16), torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        mean, logvar = ours.encode(x)
        torch.testing.assert_close(mean, dist.mean, atol=1e-4, rtol=0)
        torch.testing.assert_close(logvar, dist.logvar, atol=1e-4, rtol=0)
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kwargs", [SD2, POOLED], ids=["sd2", "pooled-text"])
def test_gradients_reach_every_unet_parameter(kwargs):
    _, ours = _unet_pair(kwargs)
    ours.train()
    out = ours(torch.randn(2, 4, 8, 8), torch.tensor([5, 700]), torch.randn(2, 3, 24))
    out.square().mean().backward()
    missing = [n for n, p in ours.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"


# ----------------------------------------------------------------------------- schedulers, step for step

def _fake_model(x: torch.Tensor, t) -> torch.Tensor:
    """A smooth stand-in for a network's output, different at each step."""
    return 0.3 * torch.tanh(x) + 0.05 * math.sin(float(t) / 37.0)


SCHEDULES = [
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, timestep_spacing="leading",
         prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False),
    dict(beta_schedule="linear", timestep_spacing="trailing", prediction_type="v_prediction", clip_sample=True),
    dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace", prediction_type="epsilon", clip_sample=False),
]


@pytest.mark.parametrize("kind", ["ddim", "ddpm", "euler"])
@pytest.mark.parametrize("sched", SCHEDULES, ids=["sd-leading-eps", "trailing-v", "cosine-linspace"])
def test_sampler_steps_match_diffusers(kind, sched):
    cls = {"ddim": diffusers.DDIMScheduler, "ddpm": diffusers.DDPMScheduler, "euler": diffusers.EulerDiscreteScheduler}[kind]
    kwargs = {k: v for k, v in sched.items() if k in cls.__init__.__code__.co_varnames}
    ref = cls(**kwargs)
    cfg = scheduler_config_from_diffusers({"_class_name": cls.__name__, **dict(ref.config)})
    steps = 25
    ref.set_timesteps(steps)
    plan = schedulers.sampler(cfg, kind, steps)
    torch.testing.assert_close(plan.timesteps.to(ref.timesteps.dtype), ref.timesteps, atol=0, rtol=0)
    assert plan.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-7)
    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * plan.init_noise_sigma
    x_ref, x_ours = x0.clone(), x0.clone()
    g_ref, g_ours = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for i, t in enumerate(ref.timesteps):
        out_ref = _fake_model(ref.scale_model_input(x_ref, t), t)
        x_ref = ref.step(out_ref, t, x_ref, generator=g_ref).prev_sample
        out = _fake_model(plan.scale_input(x_ours, i), plan.timesteps[i])
        x_ours = plan.step(out, i, x_ours, g_ours)
        torch.testing.assert_close(x_ours, x_ref, atol=1e-6, rtol=0, msg=lambda m: f"step {i} (t={int(t)}): {m}")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_noise_matches_ddpm(prediction_type):
    ref = diffusers.DDPMScheduler(prediction_type=prediction_type)
    cfg = scheduler_config_from_diffusers({"_class_name": "DDPMScheduler", **dict(ref.config)})
    x0, noise, t = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(schedulers.add_noise(cfg, x0, noise, t), ref.add_noise(x0, noise, t), atol=1e-6, rtol=0)
    want = noise if prediction_type == "epsilon" else ref.get_velocity(x0, noise, t)
    torch.testing.assert_close(schedulers.training_target(cfg, x0, noise, t), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_weights_match_diffusers_training_script(prediction_type):
    """diffusers' train_text_to_image with --snr_gamma: min(SNR, gamma), then / SNR (eps) or / (SNR + 1) (v)."""
    from diffusers.training_utils import compute_snr

    ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type)
    cfg = scheduler_config_from_diffusers({"_class_name": "DDPMScheduler", **dict(ref.config)})
    t = torch.tensor([0, 1, 50, 200, 500, 999])
    snr = compute_snr(ref, t)
    want = torch.stack([snr, 5.0 * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    want = want / snr if prediction_type == "epsilon" else want / (snr + 1) if prediction_type == "v_prediction" else want
    got = schedulers.min_snr_weight(cfg, t, 5.0)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert float(got.max()) <= {"epsilon": 1.0, "v_prediction": 1.0, "sample": 5.0}[prediction_type] + 1e-6
    assert float(got[0]) < 0.01 if prediction_type != "sample" else float(got[0]) == 5.0  # the cap bites at t = 0


# ----------------------------------------------------------------------------- whole pipelines

VOCAB = ["l", "o", "w", "e", "r", "s", "t", "i", "d", "n", "lo", "l</w>", "w</w>", "r</w>", "t</w>", "low</w>", "er</w>",
         "lowest</w>", "newer</w>", "wider", "<unk>", "<|startoftext|>", "<|endoftext|>"]
PROMPTS = ["lower newer", "lowest wider"]


def _save_pipeline(path, unet_kwargs, **scheduler_kwargs):
    """A tiny random StableDiffusionPipeline (CLIPTextModel + UNet + VAE + DDIM) saved with save_pretrained."""
    torch.manual_seed(0)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=64, hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=21, eos_token_id=22, pad_token_id=22)).eval()
    tok = transformers.CLIPTokenizer(vocab={t: i for i, t in enumerate(VOCAB)},
                                     merges=[("l", "o"), ("lo", "w</w>"), ("e", "r</w>")], model_max_length=16)
    unet = diffusers.UNet2DConditionModel(**unet_kwargs)
    vae = diffusers.AutoencoderKL(**VAE)
    for m in (unet, vae):
        _randomize(m, 0.05)
    sched = diffusers.DDIMScheduler(**{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                                       "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False,
                                       **scheduler_kwargs})
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    """SD-1.x-like: conv projections, one head count, epsilon prediction."""
    return _save_pipeline(tmp_path_factory.mktemp("sd"), {**SD1, "layers_per_block": 1})


def _diffusers_images(path, latents, steps=4, guidance=7.5):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, latents=latents.clone(),
                    output_type="pt").images


def test_guided_ddim_run_matches_diffusers(sd_dir):
    pipe = mmlm.load(sd_dir)
    assert pipe.vae is not None and pipe.tokenizer is not None and pipe.scheduler.steps_offset == 1
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    ours = mmlm.generate_image(pipe, PROMPTS, steps=4, guidance=7.5, latents=latents)
    assert ours.shape == (2, 3, 16, 16) and 0 <= ours.min() and ours.max() <= 1
    torch.testing.assert_close(ours, _diffusers_images(sd_dir, latents), atol=1e-4, rtol=0)
    # the text tower's token states are transformers' last_hidden_state
    text = transformers.CLIPTextModel.from_pretrained(sd_dir / "text_encoder").eval()
    ids = pipe.tokenizer(PROMPTS, context_length=16)
    with torch.no_grad():
        torch.testing.assert_close(pipe.encode_prompt(ids), text(ids).last_hidden_state, atol=1e-5, rtol=0)


def test_an_autoencoder_opens_alone_from_its_folder_or_its_pipeline(sd_dir):
    """A pipeline's vae/ folder (diffusers' AutoencoderKL) opens with mmlm.load as the autoencoder; load_vae takes
    the folder or the whole pipeline (what a latent recipe's vae_from accepts)."""
    from mmlm.convert.diffusers_pipeline import load_vae
    from mmlm.models.vae import AutoencoderKL

    ref = diffusers.AutoencoderKL.from_pretrained(sd_dir / "vae").eval()
    alone = mmlm.load(sd_dir / "vae")
    assert isinstance(alone, AutoencoderKL) and alone.scaling_factor == ref.config.scaling_factor
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(alone.encode(x)[0], ref.encode(x).latent_dist.mean, atol=1e-4, rtol=0)
    whole = load_vae(sd_dir)
    for name, tensor in alone.state_dict().items():
        torch.testing.assert_close(whole.state_dict()[name], tensor, atol=0, rtol=0)
    with pytest.raises(ValueError, match="not an autoencoder"):
        load_vae(sd_dir / "unet")


def test_sd2_like_v_prediction_pipeline_matches_diffusers_and_exports(tmp_path):
    """SD-2.x-like: linear projections, a head count per level, v-prediction, trailing timesteps; with the pooled
    prompt in the timestep embedding, which StableDiffusionPipeline runs unchanged (the UNet pools it itself)."""
    path = _save_pipeline(tmp_path / "sd2", {**SD2, "transformer_layers_per_block": 1, "addition_embed_type": "text",
                                             "addition_embed_type_num_heads": 4},
                          prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=0)
    pipe = mmlm.load(path)
    assert pipe.scheduler.prediction_type == "v_prediction" and pipe.config.unet.use_linear_projection
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    ours = mmlm.generate_image(pipe, PROMPTS, steps=3, guidance=5.0, latents=latents)
    torch.testing.assert_close(ours, _diffusers_images(path, latents, steps=3, guidance=5.0), atol=1e-4, rtol=0)
    export_pipeline(pipe, tmp_path / "exported")
    torch.testing.assert_close(_diffusers_images(tmp_path / "exported", latents, steps=3, guidance=5.0), ours,
                               atol=1e-4, rtol=0)


def test_export_and_mmlm_checkpoint_round_trip(sd_dir, tmp_path):
    pipe = mmlm.load(sd_dir)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    want = mmlm.generate_image(pipe, PROMPTS, steps=3, guidance=3.0, latents=latents)
    export_pipeline(pipe, tmp_path / "exported")
    torch.testing.assert_close(_diffusers_images(tmp_path / "exported", latents, steps=3, guidance=3.0), want,
                               atol=1e-4, rtol=0)
    mmlm.save(pipe, tmp_path / "native")
    again = mmlm.load(tmp_path / "native")
    torch.testing.assert_close(mmlm.generate_image(again, PROMPTS, steps=3, guidance=3.0, latents=latents), want,
                               atol=0, rtol=0)


def test_seeded_noise_and_bad_input(sd_dir):
    pipe = mmlm.load(sd_dir)
    a = mmlm.generate_image(pipe, "lower", steps=2, seed=5, scheduler="euler")
    b = mmlm.generate_image(pipe, "lower", steps=2, seed=5, scheduler="euler")
    assert torch.equal(a, b)
    for kwargs, field in [({"steps": 0}, "steps"), ({"steps": 10_000}, "steps"), ({"guidance": float("nan")}, "guidance"),
                          ({"scheduler": "pndm"}, "scheduler")]:
        with pytest.raises(ValueError, match=field):
            mmlm.generate_image(pipe, "lower", **kwargs)
    with pytest.raises(ValueError, match="prompts"):
        mmlm.generate_image(pipe, [])


def test_unsupported_unet_config_names_the_field():
    with pytest.raises(ValueError, match="class_embed_type"):
        unet_config_from_diffusers({**SD1, "class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="addition_embed_type"):
        unet_config_from_diffusers({**SD1, "addition_embed_type": "text_time"})
    with pytest.raises(ValueError, match="addition_embed_type_num_heads"):
        unet_config_from_diffusers({**SD1, "addition_embed_type": "text", "addition_embed_type_num_heads": 5})
    with pytest.raises(ValueError, match="down_block_types"):
        unet_config_from_diffusers({**SD1, "down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]})
    with pytest.raises(ValueError, match="sample_size"):
        unet_config_from_diffusers({**SD1, "sample_size": "64"})
    assert unet_config_from_diffusers({**SD1, "sample_size": None}).sample_size == 64  # diffusers' default: null


def test_cli_export_and_generate(sd_dir, tmp_path, capsys):
    from PIL import Image

    from mmlm.cli import main

    assert main(["export", "diffusers", str(sd_dir), "--out", str(tmp_path / "sd")]) == 0
    assert (tmp_path / "sd" / "model_index.json").is_file()
    assert main(["generate", "--model", str(tmp_path / "sd"), "--prompt", "lower", "--out", str(tmp_path / "img.png"),
                 "--n", "2", "--steps", "2", "--scheduler", "euler"]) == 0
    assert Image.open(tmp_path / "img-1.png").size == (16, 16)
    capsys.readouterr()
    assert main(["generate", "--model", str(sd_dir), "--prompt", "lower", "--out", str(tmp_path / "x.png"),
                 "--steps", "0"]) == 2
    assert "steps" in capsys.readouterr().err
    for prompt in ["  ", "lower " * 40]:
        assert main(["generate", "--model", str(sd_dir), "--prompt", prompt, "--out", str(tmp_path / "x.png")]) == 2
        assert "--prompt" in capsys.readouterr().err
