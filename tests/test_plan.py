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


def test_mmlm_plan_prints_the_table(capsys):
    from mmlm.cli import main

    assert main(["plan", "--config", "clip-shapes-vit", "--gpus", "2", "--gpu-memory", "24GB"]) == 0
    out = capsys.readouterr().out
    for row in ("| weights |", "| activations per sample (MiB) |", "| largest global batch |",
                "| step time at that batch (s) |", "| one epoch of 3.3 M pairs (h) |"):
        assert row in out, row
    assert "DDP + ckpt" in out and "FSDP2 + ckpt" in out
    assert "measured on the CPU" in out
