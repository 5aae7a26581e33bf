"""LLaVA's two training stages as a `Task` for the one loop, plus its run config.

Stage 1 (feature alignment) trains the projector only, on image -> caption (`plain` template); stage 2
(visual instruction tuning) trains projector + LM on conversations (`vicuna_v1` or the LM's `chat`
template). The vision tower is always frozen. Labels come from `data.conversation`, built by construction.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from ..checkpoint import save
from ..config import LlavaConfig, LMConfig, ViTConfig
from ..data.conversation import IGNORE, MEDIA_FIELDS, TEMPLATES, encode_conversation
from ..data.sources import LlavaDataConfig
from ..data.media import MediaProcessor
from ..data.transforms import PreprocessConfig
from ..devices import backward
from ..devices import resolve as resolve_device
from ..distributed import all_gather_objects, all_sum, fully_shard_model, global_mean_factor, world
from .loop import TrainConfig
from .objectives import next_token_targets, reply_weights


def tiny_llava_config() -> LlavaConfig:
    """A LLaVA small enough to train on a laptop CPU in minutes (64 px images, 8 px patches -> 64 image tokens)."""
    return LlavaConfig(vision=ViTConfig(image_size=64, patch_size=8, width=128, layers=4, heads=4),
                       lm=LMConfig(vocab_size=512, width=128, layers=4, heads=4, kv_heads=2, mlp_dim=384, max_seq_len=256),
                       image_token_id=2)


@dataclass
class LlavaRunConfig:
    model: LlavaConfig = field(default_factory=tiny_llava_config)
    stage: int = 1  # 1: projector only; 2: projector + LM
    template: str = ""  # "" = "plain" in stage 1, "vicuna_v1" in stage 2
    max_len: int = 256
    preprocess: str = "pad_square"  # how images become squares: pad_square (LLaVA) | resize_crop | resize
    init_from: str = ""  # a LLaVA checkpoint to start from (stage 2 starts from stage 1's final/)
    lora_rank: int = 0  # stage 2: > 0 trains LoRA updates of this rank instead of the whole LM
    lora_alpha: float = 16.0
    vision_from: str = ""  # a CLIP checkpoint with a ViT whose vision tower is copied in (stage 1)
    video_from: str = ""  # a video CLIP (its frame ViT) or an image CLIP whose tower reads the frames (`model.video`)
    audio_from: str = ""  # an audio CLIP whose AST becomes the audio tower (`model.audio` follows it)
    # A pretrained LM (a .gguf file, a transformers Llama/Qwen2 dir, an mmlm LM dir, or an asset name such as
    # "smollm2"): its weights, tokenizer and chat template; `<image>` joins its vocabulary (stage 1).
    lm_from: str = ""
    stage1_trains_lm: bool = False  # stage 1 trains the LM too: for an LM trained from scratch (nothing to keep)
    # token: the loss is the mean over answer tokens (LLaVA's); reply: the mean over replies, each reply's tokens
    # sharing one unit of weight (short answers then count as much as long descriptions)
    loss_per: str = "token"
    # Word dropout (Bowman et al. 2016): each learned token is, with this probability, replaced by a random token
    # as the *input* the next one is predicted from (the labels stay), so a reply cannot lean on its own previous
    # word where the image should decide ("blue" -> the shapes seen blue). Drawn per sample id: reproducible.
    word_dropout: float = 0.0
    vocab_size: int = 512  # byte-level BPE fitted to the data when no init_from brings a tokenizer
    data: LlavaDataConfig = field(default_factory=LlavaDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage!r}")
        if not self.template:
            self.template = "plain" if self.stage == 1 else "vicuna_v1"
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {self.template!r}")
        if self.loss_per not in ("token", "reply"):
            raise ValueError(f"loss_per must be 'token' or 'reply', got {self.loss_per!r}")
        if not 0.0 <= self.word_dropout < 1.0:
            raise ValueError(f"word_dropout must be in [0, 1), got {self.word_dropout!r}")


def set_trainable(model: nn.Module, stage: int, stage1_trains_lm: bool = False) -> None:
    """Vision frozen always; the projector always learns; in stage 2 the LM learns too: all of it, or only its
    LoRA updates when the model has them. A from-scratch LM (`stage1_trains_lm`) learns in stage 1 as well.
    With a Flamingo connector the resampler and cross-attention always learn and the LM only in such a stage 1."""
    model.vision.requires_grad_(False)
    model.projector.requires_grad_(True)
    for media in (model.video, model.audio):  # the video / sound towers frozen, their projections learn
        if media is not None:
            media.requires_grad_(True)
            media.tower.requires_grad_(False)
    flamingo = model.flamingo is not None
    if flamingo:  # the resampler and the gated cross-attention learn; the LM stays as it is (Flamingo's way)
        model.flamingo.requires_grad_(True)
    lora = bool(model.config.lora_rank)
    train_lm = (stage == 2 and not flamingo) or stage1_trains_lm
    for name, p in model.lm.named_parameters():
        p.requires_grad_(train_lm and (not lora or name.endswith((".lora_a", ".lora_b"))))


def _pil(image: Any) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))


def sample_turns(sample: dict[str, Any], template: str) -> list[dict[str, str]]:
    if template == "plain":  # stage 1: the media (an image, a clip, a sound), then its caption
        media = "".join(p * len(sample.get(k) or []) for p, k in MEDIA_FIELDS.items())
        return [{"from": "human", "value": media}, {"from": "gpt", "value": sample["caption"]}]
    return sample["conversations"]


LENGTH_MULTIPLE = 16  # training batches are padded to a multiple of this many tokens


class LlavaTask:
    def __init__(self, cfg: LlavaRunConfig, model: nn.Module, tokenizer: Any, train_data: Dataset,
                 preprocess: PreprocessConfig, evaluate: Callable[[], dict[str, Any]] | None = None):
        self.cfg, self.model, self.tokenizer, self.preprocess = cfg, model, tokenizer, preprocess
        self.data, self._evaluate = train_data, evaluate
        self.processor = MediaProcessor.for_model(model.config, preprocess)
        set_trainable(model, cfg.stage, cfg.stage1_trains_lm)
        if cfg.train.fsdp and world().enabled:  # before the loop builds the optimizer over the sharded parameters
            model.to(resolve_device(cfg.train.device, "train.device"))  # FSDP2 shards where the model is
            fully_shard_model(model, model.lm.blocks, cfg.train.precision)

    def train_dataset(self) -> Dataset:
        return self.data

    def collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        """Right-padded ids/labels/mask (B, T) and every sample's images in order (N_images, C, H, W).

        Unreadable samples ({"bad": ...}) are dropped and passed on for the loop to count and report.
        """
        mc = self.model.config
        bad = [s["bad"] for s in samples if "bad" in s]
        samples = [s for s in samples if "bad" not in s]
        if not samples:
            return {"input_ids": None, "labels": None, "attention_mask": None, "pixel_values": None, "bad": bad,
                    "batch_size": 0}
        media = mc.placeholders()
        encoded = [encode_conversation(sample_turns(s, self.cfg.template), self.tokenizer, self.cfg.template,
                                       mc.image_token_id, mc.image_tokens, max_len=self.cfg.max_len,
                                       n_images=len(s["images"]), name=s["id"], media=media,
                                       n_media={"<video>": len(s.get("videos") or []),
                                                "<audio>": len(s.get("audios") or [])}) for s in samples]
        T = max(len(e.input_ids) for e in encoded)
        # a round length (within the LM's context): batches then share a few shapes, and oneDNN's per-shape
        # bf16 kernels stay few (see models/kernels/packing.py ROW_MULTIPLE)
        T = max(T, min(-(-T // LENGTH_MULTIPLE) * LENGTH_MULTIPLE, mc.lm.max_seq_len))
        pad = self.tokenizer.pad_id
        ids = torch.tensor([e.input_ids + [pad] * (T - len(e.input_ids)) for e in encoded])
        labels = torch.tensor([e.labels + [IGNORE] * (T - len(e.labels)) for e in encoded])
        mask = torch.tensor([[1] * len(e.input_ids) + [0] * (T - len(e.input_ids)) for e in encoded])
        if self.cfg.word_dropout:
            ids = self._word_dropout(ids, labels, [s["id"] for s in samples])
        inputs = self.processor(images=[_pil(im) for s in samples for im in s["images"]],
                                videos=[v for s in samples for v in s.get("videos") or []],
                                audios=[a for s in samples for a in s.get("audios") or []])
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": inputs.get("pixel_values"),
                "videos": inputs.get("videos"), "audios": inputs.get("audios"), "bad": bad, "batch_size": len(samples)}

    def _word_dropout(self, ids: torch.Tensor, labels: torch.Tensor, names: list[str]) -> torch.Tensor:
        """ids with some learned tokens' inputs replaced by random tokens (never the image token), per
        `word_dropout`; each row's draw is seeded by its sample id and the data seed."""
        ids = ids.clone()
        vocab = self.model.config.lm.vocab_size
        media = sorted({i for i, _ in self.model.config.placeholders().values() if 0 <= i < vocab})
        for row, name in enumerate(names):
            g = torch.Generator().manual_seed(zlib.crc32(f"{self.cfg.data.seed}:{name}".encode()))
            drop = (torch.rand(ids.shape[1], generator=g) < self.cfg.word_dropout) & (labels[row] != IGNORE)
            new = torch.randint(0, vocab - len(media), (int(drop.sum()),), generator=g)
            for m in media:  # draw from the vocabulary without the media tokens: skip over each, lowest first
                new += (new >= m).long()
            ids[row, drop] = new
        return ids

    def step(self, batch: dict[str, Any], autocast) -> dict[str, float]:
        w = world()
        if min(all_gather_objects(batch["batch_size"])) == 0:  # every rank skips together (FSDP needs all)
            return {"loss": float("nan")}
        self.model.vision.eval()
        for media in (self.model.video, self.model.audio):
            if media is not None:
                media.tower.eval()
        at, targets = next_token_targets(batch["labels"])
        with autocast():  # the loss only where an answer token is predicted
            per_token = self.model(batch["input_ids"], attention_mask=batch["attention_mask"],
                                   pixel_values=batch["pixel_values"], videos=batch.get("videos"),
                                   audios=batch.get("audios"), logits_at=at, targets=targets).token_loss
        weights = reply_weights(batch["labels"]) if self.cfg.loss_per == "reply" else torch.ones_like(per_token)
        if not w.enabled:
            loss = (per_token * weights).sum() / weights.sum().clamp(min=1)
        else:  # this rank's weighted sum / all ranks' total weight, x world size: the ranks' mean is the global mean
            total, _ = global_mean_factor(int(round(float(weights.sum()))))
            loss = (per_token * weights).sum() * (w.world_size / max(total, 1))
        backward(loss, autocast)  # under fp16, scaled
        return {"loss": all_sum(loss.item()) / w.world_size}

    def after_optimizer_step(self) -> None:
        pass

    def evaluate(self) -> dict[str, Any]:
        return self._evaluate() if self._evaluate is not None else {}

    def save_model(self, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        save(self.model, directory, tokenizer=self.tokenizer, preprocess=self.preprocess, state_dict=state_dict)
