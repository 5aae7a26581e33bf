"""The training loop's guards, schedule and locking, on tiny stand-in tasks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mmlm.train.loop import TrainConfig, TrainingError, train
from mmlm.train.optim import lr_at, param_groups


class _Task:
    """A linear regression whose loss turns NaN on the steps listed in `nan_steps`."""

    def __init__(self, nan_steps=()):
        torch.manual_seed(0)
        self.model = nn.Linear(4, 1)
        self.model.config = None
        self.nan_steps, self.calls = set(nan_steps), 0
        self.x = torch.randn(64, 4)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1

    def train_dataset(self):
        return list(range(64))

    def collate(self, idx):
        return {"i": torch.tensor(idx), "batch_size": len(idx)}

    def step(self, batch, autocast):
        loss = ((self.model(self.x[batch["i"]]).squeeze(-1) - self.y[batch["i"]]) ** 2).mean()
        if self.calls in self.nan_steps:
            loss = loss * float("nan")
        self.calls += 1
        loss.backward()
        return {"loss": loss.item()}

    def after_optimizer_step(self):
        pass

    def evaluate(self):
        return {"mse": ((self.model(self.x).squeeze(-1) - self.y) ** 2).mean().item()}

    def save_model(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        from mmlm.checkpoint import save_tensors

        save_tensors(directory / "model.safetensors", self.model.state_dict())


def _cfg(**kw):
    return TrainConfig(**{"steps": 60, "batch_size": 8, "lr": 0.3, "warmup_steps": 0, "weight_decay": 0.0,
                          "progress": False, "log_every": 5, **kw})


def test_non_finite_steps_are_skipped_and_counted(tmp_path):
    task = _Task(nan_steps={3, 7})
    before = task.evaluate()["mse"]
    summary = train(task, _cfg(), tmp_path)
    assert summary["bad_steps"] == 2 and summary["step"] == 60
    assert summary["eval"]["mse"] < before / 10 and all(torch.isfinite(p).all() for p in task.model.parameters())


def test_too_many_non_finite_steps_abort_with_a_clear_message(tmp_path):
    with pytest.raises(TrainingError, match="non-finite loss or gradient.*max_bad_steps=2"):
        train(_Task(nan_steps=set(range(100))), _cfg(max_bad_steps=2), tmp_path)


def test_schedule_and_decay_groups():
    assert lr_at(0, 1.0, 100, 10) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 100, 10) == pytest.approx(1.0)
    assert lr_at(55, 1.0, 100, 10) == pytest.approx(0.5)
    assert lr_at(100, 1.0, 100, 10, min_lr_ratio=0.1) == pytest.approx(0.1)
    from mmlm.config import clip_preset
    from mmlm.models.clip import CLIP

    model = CLIP(clip_preset("tiny-vit"))
    decay, no_decay = param_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {"logit_scale", "visual.norm_pre.weight", "text.transformer.blocks.0.attn.qkv.bias"} <= no_decay_names
    assert all(names[id(p)].endswith(("weight", "pos_embed")) for p in decay["params"])
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0


def test_lit_locks_a_tower_except_its_last_blocks():
    from mmlm.config import clip_preset
    from mmlm.models.clip import CLIP
    from mmlm.train.clip_task import ClipRunConfig, ClipTask, LockConfig

    model = CLIP(clip_preset("tiny-vit"))
    cfg = ClipRunConfig(lock=LockConfig(image=True, image_unlocked_layers=1))
    ClipTask(cfg, model, tokenizer=None, train_data=[], preprocess=None)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "visual.transformer.blocks.1.attn.qkv.weight" in trainable and "visual.proj.weight" in trainable
    assert "visual.transformer.blocks.0.attn.qkv.weight" not in trainable and "visual.patch_embed.weight" not in trainable
    assert "text.transformer.blocks.0.attn.qkv.weight" in trainable
