"""Contrastive CLIP pretraining as a `Task` for the one training loop, plus its run config."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from ..checkpoint import save
from ..config import CLIPConfig, apply_overrides, clip_preset, from_dict, to_dict
from ..data.transforms import PreprocessConfig
from ..distributed import all_gather_objects, all_mean
from .feature_cache import contrastive_step
from .loop import TrainConfig
from .objectives import contrastive_loss

LN_100 = math.log(100.0)


@dataclass
class DataConfig:
    kind: str = "shapes"  # shapes | fashion_mnist | csv | tar
    path: str = ""  # csv/tsv file, or a tar shard glob
    image_col: str = "image"
    caption_col: str = "caption"
    train_size: int = 50_000  # shapes: training images generated on the fly
    single_fraction: float = 0.5  # shapes: share of single-object training images
    seed: int = 0
    eval_size: int = 1000
    eval_path: str = ""  # csv/tar: held-out pairs for retrieval

    def __post_init__(self) -> None:
        if self.kind not in ("shapes", "fashion_mnist", "csv", "tar"):
            raise ValueError(f"data.kind must be shapes, fashion_mnist, csv or tar, got {self.kind!r}")
        if self.kind in ("csv", "tar") and not self.path:
            raise ValueError(f"data.kind {self.kind!r} needs data.path")


@dataclass
class TokenizerConfig:
    kind: str = "bpe"  # "bpe": train a byte-level BPE on the training captions; "clip": OpenAI's BPE; "file"
    vocab_size: int = 1024
    path: str = ""  # kind "file": anything load_tokenizer opens

    def __post_init__(self) -> None:
        if self.kind not in ("bpe", "clip", "file"):
            raise ValueError(f"tokenizer.kind must be bpe, clip or file, got {self.kind!r}")


@dataclass
class LockConfig:
    """LiT: freeze a tower, optionally all but its last `*_unlocked_layers` blocks."""

    image: bool = False
    image_unlocked_layers: int = 0
    text: bool = False
    text_unlocked_layers: int = 0


@dataclass
class ClipRunConfig:
    model: CLIPConfig = field(default_factory=lambda: clip_preset("tiny-vit"))
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: str = "clip"  # clip | siglip
    loss_gather: str = "local"  # under torchrun: local (each rank's rows vs all columns) | global (whole loss per rank)
    lock: LockConfig = field(default_factory=LockConfig)
    init_from: str = ""  # start from a checkpoint (anything mmlm.load opens) instead of random weights

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def run_config_from_dict(d: dict[str, Any], overrides: list[str] | None = None) -> ClipRunConfig:
    """A recipe dict (YAML) -> ClipRunConfig. `model.preset` names a starting architecture; the other
    `model` keys override its fields. Dotted `overrides` apply last and must name existing fields."""
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}
    model = dict(d.get("model") or {})
    overrides = list(overrides or [])
    for o in [o for o in overrides if o.startswith("model.preset=")]:  # a preset replaces the base, so first
        model = {"preset": o.split("=", 1)[1].strip()}
        overrides.remove(o)
    preset = model.pop("preset", None)
    base = to_dict(clip_preset(preset)) if preset else to_dict(CLIPConfig())
    for section in ("vision", "text"):
        if section in model:
            if model[section].get("kind", base[section]["kind"]) != base[section]["kind"]:
                base[section] = {}
            base[section].update(model.pop(section))
    base.update(model)
    full = {"model": base}
    defaults = ClipRunConfig()
    for name in ("data", "tokenizer", "train", "lock"):
        full[name] = {**to_dict(getattr(defaults, name)), **(d.get(name) or {})}
    for name in ("loss", "loss_gather", "init_from"):
        full[name] = d.get(name, getattr(defaults, name))
    unknown = sorted(set(d) - set(full))
    if unknown:
        raise ValueError(f"recipe: unknown section(s) {unknown}; known: {sorted(full)}")
    if overrides:
        apply_overrides(full, overrides)
    return ClipRunConfig(model=CLIPConfig.from_dict(full["model"]), data=from_dict(DataConfig, full["data"], ".data"),
                         tokenizer=from_dict(TokenizerConfig, full["tokenizer"], ".tokenizer"),
                         train=from_dict(TrainConfig, full["train"], ".train"), loss=full["loss"],
                         loss_gather=full["loss_gather"],
                         lock=from_dict(LockConfig, full["lock"], ".lock"), init_from=full["init_from"])


def lock_tower(blocks: nn.ModuleList | None, tower: nn.Module, unlocked_layers: int) -> None:
    """Freeze `tower` except its last `unlocked_layers` transformer blocks (and what follows them)."""
    for p in tower.parameters():
        p.requires_grad_(False)
    if unlocked_layers and blocks is not None:
        for b in list(blocks)[-unlocked_layers:]:
            for p in b.parameters():
                p.requires_grad_(True)
        for name, mod in tower.named_children():
            if name in ("norm_post", "norm_final", "proj"):
                for p in mod.parameters():
                    p.requires_grad_(True)


class ClipTask:
    """Contrastive pretraining of a CLIP model on image-text pairs."""

    def __init__(self, cfg: ClipRunConfig, model: nn.Module, tokenizer: Any, train_data: Dataset,
                 preprocess: PreprocessConfig, evaluate: Callable[[], dict[str, Any]] | None = None):
        self.cfg, self.model, self.tokenizer, self.preprocess = cfg, model, tokenizer, preprocess
        self.data = train_data
        self._evaluate = evaluate
        lk = cfg.lock
        if lk.image:
            blocks = getattr(getattr(model.visual, "transformer", None), "blocks", None)
            lock_tower(blocks, model.visual, lk.image_unlocked_layers)
        if lk.text:
            lock_tower(model.text.transformer.blocks, model.text, lk.text_unlocked_layers)

    def train_dataset(self) -> Dataset:
        return self.data

    def collate(self, samples):
        from ..data.image_text import ImageTextCollate

        if not hasattr(self, "_collate"):
            self._collate = ImageTextCollate(self.tokenizer, self.model.config.text.context_length, self.preprocess)
        return self._collate(samples)

    def step(self, batch: dict[str, Any], autocast) -> dict[str, float]:
        sizes = all_gather_objects(batch["batch_size"])  # every rank skips together, or none does
        if min(sizes) == 0 or sum(sizes) < 2:
            return {"loss": float("nan")}
        model = self.model
        if self.cfg.lock.image and not self.cfg.lock.image_unlocked_layers:
            model.visual.eval()  # a locked tower keeps its BatchNorm statistics too

        def loss_fn(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
            return contrastive_loss(self.cfg.loss, img, txt, model.logit_scale, model.logit_bias, self.cfg.loss_gather)

        loss = contrastive_step(model, batch["pixel_values"], batch["input_ids"], loss_fn,
                                micro_batch=self.cfg.train.micro_batch, autocast=autocast)
        return {"loss": all_mean(loss.item()), "logit_scale": model.logit_scale.exp().item()}

    def after_optimizer_step(self) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, LN_100)  # CLIP clamps the temperature at 100

    def evaluate(self) -> dict[str, Any]:
        return self._evaluate() if self._evaluate is not None else {}

    def save_model(self, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        save(self.model, directory, tokenizer=self.tokenizer, preprocess=self.preprocess, state_dict=state_dict)
