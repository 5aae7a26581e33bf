"""`mmlm plan`: measured activations grow linearly with the batch, checkpointing keeps fewer of them, and the table
prints for a recipe."""

from __future__ import annotations

import pytest

from mmlm.assets import recipe_path
from mmlm.plan import activation_bytes, parameter_counts, parse_bytes
from mmlm.train.recipes import load_recipe


def _cfg():
    return load_recipe("clip", recipe_path("clip-shapes-vit"))


def test_parse_bytes():
    assert parse_bytes("24GB") == parse_bytes("24GiB") == parse_bytes("24 G") == 24 * 2**30
    assert parse_bytes("512MB") == 512 * 2**20
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes("lots")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_measured_activations_scale_with_the_batch(checkpointing):
    cfg = _cfg()
    a2, a4, a8 = (activation_bytes(cfg, n, checkpointing) for n in (2, 4, 8))
    per_sample = (a4 - a2) / 2
    assert per_sample > 0
    assert abs((a8 - a4) / 4 - per_sample) <= 0.05 * per_sample  # linear: each sample adds the same bytes
    assert 1.6 <= a8 / a4 <= 2.0  # twice the batch, about twice the bytes (a few weight copies do not grow)


def test_checkpointing_keeps_fewer_activations():
    cfg = _cfg()
    assert activation_bytes(cfg, 8, True) < 0.6 * activation_bytes(cfg, 8, False)


def test_parameter_counts_from_the_meta_device():
    from mmlm.models.clip import CLIP

    cfg = _cfg()
    cfg.model.text.vocab_size = cfg.tokenizer.vocab_size
    counts = parameter_counts(cfg)
    assert counts["total"] == sum(p.numel() for p in CLIP(cfg.model).parameters())
    assert counts["vision"] + counts["text"] + 1 == counts["total"]  # + the logit scale
    assert counts["largest_unit"] >= counts["second_unit"] > 0


def test_mmlm_plan_prints_the_table(capsys):
    from mmlm.cli import main

    assert main(["plan", "--config", "clip-shapes-vit", "--gpus", "2", "--gpu-memory", "24GB"]) == 0
    out = capsys.readouterr().out
    for row in ("| weights |", "| activations per sample (MiB) |", "| largest global batch |",
                "| step time at that batch (s) |", "| one epoch of 3.3 M pairs (h) |"):
        assert row in out, row
    assert "DDP + ckpt" in out and "FSDP2 + ckpt" in out
    assert "measured on the CPU" in out


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_two_block_copy_scaled_by_depth_gives_the_whole_models_figures(checkpointing):
    """The 4-block vision tower, measured whole and from its 2-block copy: activations and FLOPs agree."""
    from mmlm.plan import _step_flops

    cfg = _cfg()
    assert cfg.model.vision.layers == 4
    whole, scaled = activation_bytes(cfg, 4, checkpointing, layers=None), activation_bytes(cfg, 4, checkpointing)
    assert abs(scaled - whole) <= 0.03 * whole, (scaled, whole)
    whole, scaled = _step_flops(cfg, 4, checkpointing, layers=None), _step_flops(cfg, 4, checkpointing)
    assert abs(scaled - whole) <= 0.02 * whole, (scaled, whole)


def test_the_chapters_clip_recipe_is_a_vit_l14_of_428m_parameters():
    cfg = load_recipe("clip", recipe_path("clip-vit-l14"))
    v, t = cfg.model.vision, cfg.model.text
    assert (v.image_size, v.patch_size, v.width, v.layers, t.width, t.layers, t.vocab_size) == \
        (224, 14, 1024, 24, 768, 12, 49408)
    assert cfg.train.precision == "bf16" and cfg.train.grad_checkpointing and cfg.tokenizer.kind == "clip"
    assert 425e6 < parameter_counts(cfg)["total"] < 430e6


def test_a_resnet_recipe_is_refused_with_a_reason(capsys):
    from mmlm.cli import main

    assert main(["plan", "--config", "clip-shapes"]) == 2
    assert "ViT-tower" in capsys.readouterr().err
