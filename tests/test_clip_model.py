"""Model-level properties: gradients reach every parameter, strict loading names offenders, init, config io."""

from __future__ import annotations

import math

import pytest
import torch

import mmlm
from mmlm.checkpoint import load_state_dict_strict
from mmlm.config import CLIPConfig, apply_overrides, clip_preset, to_dict
from mmlm.models.clip import CLIP


def _batch(cfg: CLIPConfig, n: int = 3):
    g = torch.Generator().manual_seed(0)
    s = cfg.vision.image_size
    pixels = torch.randn(n, 3, s, s, generator=g)
    ids = torch.randint(1, cfg.text.eot_token_id, (n, cfg.text.context_length), generator=g)
    for row in range(n):
        length = 3 + row
        ids[row, length - 1] = cfg.text.eot_token_id
        ids[row, length:] = 0
    return pixels, ids


@pytest.mark.parametrize("preset", ["tiny-vit", "tiny-rn"])
def test_every_parameter_gets_a_gradient(preset):
    cfg = clip_preset(preset)
    cfg.logit_bias_init = -10.0
    model = CLIP(cfg).train()
    # OpenAI's init zeroes each bottleneck's last BN weight, which blocks gradients to the convs before it
    # at step 0; perturb so the test sees every path.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    pixels, ids = _batch(cfg)
    # SigLIP's loss: with softmax cross-entropy a shared logit_bias has an exactly zero gradient.
    from mmlm.train.objectives import contrastive_loss

    loss = contrastive_loss("siglip", model.encode_image(pixels), model.encode_text(ids), model.logit_scale,
                            model.logit_bias)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().sum() == 0]
    assert no_grad == []


def test_openai_init():
    model = CLIP(clip_preset("tiny-vit"))
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert model.logit_bias is None
    w = model.config.text.width
    assert model.text.token_embed.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.text.transformer.blocks[0].attn.qkv.weight.std().item() == pytest.approx(w**-0.5, rel=0.1)
    rn = CLIP(clip_preset("tiny-rn"))
    assert all(b.bn3.weight.abs().sum() == 0 for b in rn.visual.layer1)


def test_save_load_round_trip(tmp_path):
    model = CLIP(clip_preset("tiny-rn")).eval()
    pixels, ids = _batch(model.config)
    mmlm.save(model, tmp_path / "ck")
    again = mmlm.load(tmp_path / "ck")
    with torch.no_grad():
        torch.testing.assert_close(again(pixels, ids).logits_per_image, model(pixels, ids).logits_per_image, atol=0, rtol=0)


def test_strict_loading_names_the_offending_key(tmp_path):
    model = CLIP(clip_preset("tiny-vit"))
    sd = model.state_dict()
    missing = {k: v for k, v in sd.items() if k != "text.norm_final.bias"}
    with pytest.raises(ValueError, match=r"missing tensor\(s\) \['text.norm_final.bias'\]"):
        load_state_dict_strict(CLIP(clip_preset("tiny-vit")), missing, "x.safetensors")
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) \['visual.extra'\]"):
        load_state_dict_strict(CLIP(clip_preset("tiny-vit")), {**sd, "visual.extra": torch.zeros(1)}, "x")
    bad = dict(sd, **{"visual.proj.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"mis-shaped.*visual.proj.weight"):
        load_state_dict_strict(CLIP(clip_preset("tiny-vit")), bad, "x")
    # Through the public loader too: the error names the file.
    mmlm.save(model, tmp_path / "ck")
    from mmlm.checkpoint import save_tensors

    save_tensors(tmp_path / "ck" / "model.safetensors", missing)
    with pytest.raises(ValueError, match=r"model.safetensors.*text.norm_final.bias"):
        mmlm.load(tmp_path / "ck")


def test_config_round_trip_and_overrides():
    for name in ["RN50", "ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14-336", "tiny-vit", "tiny-rn"]:
        cfg = clip_preset(name)
        assert CLIPConfig.from_dict(to_dict(cfg)) == cfg
    assert clip_preset("ViT-L/14-336").vision.grid == 24
    assert clip_preset("RN50").vision.heads == 32 and clip_preset("RN50").vision.feature_dim == 2048
    d = apply_overrides(to_dict(clip_preset("tiny-vit")), ["vision.width=128", "text.act=gelu"])
    cfg = CLIPConfig.from_dict(d)
    assert cfg.vision.width == 128 and cfg.vision.mlp_dim == 256 and cfg.text.act == "gelu"
    with pytest.raises(ValueError, match="no such field"):
        apply_overrides(to_dict(clip_preset("tiny-vit")), ["vision.widht=3"])
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['colour'\]"):
        CLIPConfig.from_dict({**to_dict(clip_preset("tiny-vit")), "colour": 1})
    with pytest.raises(ValueError, match="'kind' must be one of"):
        CLIPConfig.from_dict({**to_dict(clip_preset("tiny-vit")), "vision": {"kind": "swin"}})
    with pytest.raises(ValueError, match="not a multiple"):
        CLIPConfig.from_dict(apply_overrides(to_dict(clip_preset("tiny-vit")), {"vision.patch_size": 7}))


def test_vit_hidden_states_and_text_pooling_errors():
    model = CLIP(clip_preset("tiny-vit")).eval()
    pixels, ids = _batch(model.config)
    hidden: list[torch.Tensor] = []
    tokens = model.visual.forward_tokens(pixels, hidden_states=hidden)
    assert len(hidden) == model.config.vision.layers + 1 and hidden[-1] is tokens
    assert tokens.shape == (3, 1 + model.config.vision.num_patches, model.config.vision.width)
    model.text.cfg.pool = "eot"
    with pytest.raises(ValueError, match="no end-of-text token"):
        model.encode_text(torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="expects 32x32"):
        model.encode_image(torch.zeros(1, 3, 30, 30))


def test_vision_tower_pools_the_class_token_of_every_token():
    """The ViT's pooled output (last block on the class token alone) == every token computed, token 0 read."""
    model = CLIP(clip_preset("tiny-vit")).train()
    pixels, _ = _batch(model.config)
    pooled = model.encode_image(pixels)
    full = model.visual.proj(model.visual.norm_post(model.visual.forward_tokens(pixels)[:, 0]))
    torch.testing.assert_close(pooled, full, atol=1e-6, rtol=1e-5)
    params = list(model.visual.parameters())
    w = torch.randn_like(full)
    for a, b in zip(torch.autograd.grad((full * w).sum(), params), torch.autograd.grad((pooled * w).sum(), params)):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)

