"""Contrastive CLIP pretraining as a `Task` for the one training loop, plus its run config (read from a recipe by
`train/recipes.py`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import torch
from torch import nn
from torch.utils.data import Dataset

from ..checkpoint import save
from ..config import AudioCLIPConfig, CLIPConfig, VideoCLIPConfig, clip_preset, model_config_from_dict, to_dict
from ..data.sources import DataConfig
from ..data.transforms import PreprocessConfig
from ..devices import resolve as resolve_device
from ..distributed import all_gather_objects, all_mean, fully_shard_model, sync_batch_norm, world
from .feature_cache import contrastive_step
from .loop import TrainConfig
from .objectives import contrastive_loss

LN_100 = math.log(100.0)


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
    # an image CLIP, or (by its `kind`) a video_clip or an audio_clip: the same loop, loss and checkpoints
    model: Union[CLIPConfig, VideoCLIPConfig, AudioCLIPConfig] = field(default_factory=lambda: clip_preset("tiny-vit"))
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: str = "clip"  # clip | siglip
    loss_gather: str = "local"  # under torchrun: local (each rank's rows vs all columns) | global (whole loss per rank)
    lock: LockConfig = field(default_factory=LockConfig)
    init_from: str = ""  # start from a checkpoint (anything mmlm.load opens) instead of random weights

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = model_config_from_dict(self.model, "model")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


# the batch key of each kind of model's media, and its encoder
MEDIA = {CLIPConfig: ("pixel_values", "encode_image"), VideoCLIPConfig: ("video_values", "encode_video"),
         AudioCLIPConfig: ("audio_values", "encode_audio")}


def media_of(model: nn.Module) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]]:
    """(batch key, encoder) of the images, videos or audio clips this CLIP-style model compares with text."""
    key, method = MEDIA[type(model.config)]
    return key, getattr(model, method)


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


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """FSDP2's shard units of a CLIP, innermost first: the image tower's blocks, then each tower. A unit must be
    called as a module (FSDP2 gathers it in its forward hook): the pooling of a transformer tower runs its last
    block's parts, and the text tower's packed path every block's, so those are gathered with their tower."""
    units: list[nn.Module] = []
    tower = media_tower(model)
    blocks = getattr(getattr(tower, "transformer", None), "blocks", None)
    if blocks is not None:
        units += list(blocks)[:-1]
    else:  # ModifiedResNet: its Bottlenecks, each called as a module
        units += [b for stage in (tower.layer1, tower.layer2, tower.layer3, tower.layer4) for b in stage]
    temporal = [model.temporal] if hasattr(model, "temporal") else []  # a video CLIP's fusion over the frames
    return units + [tower, *temporal, model.text]


def media_tower(model: nn.Module) -> nn.Module:
    """The tower that is not the text's: an audio CLIP's spectrogram transformer, else the image tower (a video
    CLIP's frame encoder)."""
    return model.audio if isinstance(model.config, AudioCLIPConfig) else model.visual


class ClipTask:
    """Contrastive pretraining of a CLIP model on image-text pairs."""

    def __init__(self, cfg: ClipRunConfig, model: nn.Module, tokenizer: Any, train_data: Dataset,
                 preprocess: PreprocessConfig, evaluate: Callable[[], dict[str, Any]] | None = None):
        self.cfg, self.model, self.tokenizer, self.preprocess = cfg, model, tokenizer, preprocess
        self.data = train_data
        self._evaluate = evaluate
        lk = cfg.lock
        if lk.image:  # a video CLIP's frame encoder; an audio CLIP's AST
            tower = media_tower(model)
            blocks = getattr(getattr(tower, "transformer", None), "blocks", None)
            lock_tower(blocks, tower, lk.image_unlocked_layers)
        if lk.text:
            lock_tower(model.text.transformer.blocks, model.text, lk.text_unlocked_layers)
        if cfg.train.fsdp and world().enabled:  # before the loop builds the optimizer over the sharded parameters
            model.to(resolve_device(cfg.train.device, "train.device"))  # FSDP2 shards where the model is
            sync_batch_norm(model)  # (a ResNet tower) before sharding: FSDP2 keeps hold of the modules it shards
            scales = [p for p in (model.logit_scale, model.logit_bias) if p is not None]  # used outside any forward
            fully_shard_model(model, fsdp_units(model), cfg.train.precision, ignored=scales)
            if isinstance(model.config, AudioCLIPConfig):  # encode_audio calls the tower's encode, not its forward
                from torch.distributed.fsdp import register_fsdp_forward_method

                register_fsdp_forward_method(model.audio, "encode")

    def train_dataset(self) -> Dataset:
        return self.data

    def collate(self, samples):
        from ..data.image_text import ImageTextCollate
        from ..data.media import MediaTextCollate

        if not hasattr(self, "_collate"):
            collate = ImageTextCollate if type(self.model.config) is CLIPConfig else MediaTextCollate
            self._collate = collate(self.tokenizer, self.model.config.text.context_length, self.preprocess)
        return self._collate(samples)

    def step(self, batch: dict[str, Any], autocast) -> dict[str, float]:
        sizes = all_gather_objects(batch["batch_size"])  # every rank skips together, or none does
        if min(sizes) == 0 or sum(sizes) < 2:
            return {"loss": float("nan")}
        model = self.model
        if self.cfg.lock.image and not self.cfg.lock.image_unlocked_layers:
            media_tower(model).eval()  # a locked tower keeps its BatchNorm statistics too

        def loss_fn(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
            return contrastive_loss(self.cfg.loss, img, txt, model.logit_scale, model.logit_bias, self.cfg.loss_gather)

        key, encode = media_of(model)
        loss = contrastive_step(model, batch[key], batch["input_ids"], loss_fn,
                                micro_batch=self.cfg.train.micro_batch, autocast=autocast, encode=encode)
        return {"loss": all_mean(loss.item()), "logit_scale": model.logit_scale.exp().item()}

    def after_optimizer_step(self) -> None:
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, LN_100)  # CLIP clamps the temperature at 100

    def evaluate(self) -> dict[str, Any]:
        return self._evaluate() if self._evaluate is not None else {}

    def save_model(self, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        save(self.model, directory, tokenizer=self.tokenizer, preprocess=self.preprocess, state_dict=state_dict)
