"""`mmlm train clip`: build data, tokenizer, model and evaluation from a run config, then run the loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .. import distributed
from ..checkpoint import build_model, load_state_dict_strict
from ..config import AudioCLIPConfig, VideoCLIPConfig
from ..data.sources import IMAGE_TEXT
from ..data.transforms import ImageProcessor, PreprocessConfig
from ..eval.retrieval import evaluate_retrieval
from ..eval.zeroshot import zeroshot
from ..formats import load as load_model
from ..formats import load_tokenizer
from ..models.clip import CLIP
from .clip_task import ClipRunConfig, ClipTask, media_of
from .loop import run_training


def train_data(cfg: ClipRunConfig, preprocess: PreprocessConfig) -> Dataset:
    """The image-text pairs of `data.kind`."""
    return IMAGE_TEXT[cfg.data.kind].train(cfg.data, preprocess)


def caption_corpus(cfg: ClipRunConfig, data: Dataset, limit: int = 20_000) -> list[str]:
    """Training captions for fitting a BPE (without decoding images where the source allows)."""
    return IMAGE_TEXT[cfg.data.kind].captions(cfg.data, data, limit)


def build_tokenizer(cfg: ClipRunConfig, data: Dataset, run: Path):
    from ..tokenizer import Tokenizer

    saved = run / "tokenizer"
    if (saved / "tokenizer.json").is_file():  # a resumed run must tokenize exactly as before
        return load_tokenizer(saved)
    t = cfg.tokenizer
    if t.kind == "clip":
        tok = Tokenizer.clip(context_length=cfg.model.text.context_length)
    elif t.kind == "file":
        tok = load_tokenizer(t.path)
    else:
        tok = Tokenizer.train_bpe(caption_corpus(cfg, data), vocab_size=t.vocab_size,
                                  context_length=cfg.model.text.context_length)
    tok.save(saved)
    return tok


def fit_text_to_tokenizer(cfg: ClipRunConfig, tok) -> None:
    """The text tower's vocabulary and EOT pooling follow the tokenizer (one setting drives the rest)."""
    text = cfg.model.text
    text.vocab_size = tok.vocab_size
    text.eot_token_id = tok.eot_id
    text.pool = "argmax" if tok.eot_id == tok.vocab_size - 1 else "eot"


# ----------------------------------------------------------------------------- evaluation

def _pixel_batches(images: np.ndarray, processor: ImageProcessor, batch: int = 256):
    """Model inputs from evaluation arrays: images (N, S, S, 3) and videos (N, T, S, S, 3) uint8 normalised (a video
    as its T images); audio features (N, T, F) as they are."""
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i:i + batch])
        if x.dtype != torch.uint8:  # audio features
            yield x
        elif x.dim() == 5:
            yield processor.normalize(x.flatten(0, 1), channels_last=True).unflatten(0, x.shape[:2])
        else:
            yield processor.normalize(x, channels_last=True)


def build_evaluator(cfg: ClipRunConfig, model: CLIP, tok, preprocess: PreprocessConfig) -> Callable[[], dict[str, Any]]:
    """Evaluation sets are generated once and kept in memory; the closure embeds and scores them."""
    processor = ImageProcessor(preprocess)
    zs, ret = IMAGE_TEXT[cfg.data.kind].evaluation(cfg.data, preprocess)
    _, encode = media_of(model)

    def evaluate() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, imgs, labels, classes, templates in zs:
            m = zeroshot(model, tok, _pixel_batches(imgs, processor, 64), torch.tensor(labels), classes, templates,
                         with_confusion=False, encode=encode)
            out[name] = {"top1": m["top1"], "top5": m["top5"]}
        for name, imgs, caps in ret:
            m = evaluate_retrieval(model, tok, _pixel_batches(imgs, processor), caps, range(len(caps)))
            out[name] = {k: v for k, v in m.items() if "@" in k}
        return out

    return evaluate


# ----------------------------------------------------------------------------- entry point

def build_task(cfg: ClipRunConfig, run: Path) -> ClipTask:
    """A CLIP run's data, tokenizer (written to `run`; the text tower follows it), model and evaluator."""
    if isinstance(cfg.model, AudioCLIPConfig):  # the clips' features follow the audio tower (one setting)
        preprocess = PreprocessConfig()
        cfg.data.mel_bins, cfg.data.audio_frames = cfg.model.audio.num_mel_bins, cfg.model.audio.max_length
    else:
        preprocess = PreprocessConfig(image_size=cfg.model.vision.image_size)
    if isinstance(cfg.model, VideoCLIPConfig) and cfg.data.frames > cfg.model.temporal.frames:
        raise ValueError(f"data.frames {cfg.data.frames} is more than the model's temporal.frames "
                         f"{cfg.model.temporal.frames}")
    with distributed.main_first():  # a generated set (moving shapes, sounds) is written once, by rank 0
        data = train_data(cfg, preprocess)
    with distributed.main_first():  # rank 0 fits and saves the tokenizer, the other ranks load it
        tok = build_tokenizer(cfg, data, run)
    fit_text_to_tokenizer(cfg, tok)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    if cfg.init_from:
        src = load_model(cfg.init_from)
        if isinstance(cfg.model, VideoCLIPConfig) and type(src) is CLIP:  # a video CLIP from an image CLIP:
            sd = {**model.state_dict(), **src.state_dict()}  # its frame encoder and text tower, a fresh temporal part
        else:
            sd = src.state_dict()
        load_state_dict_strict(model, sd, cfg.init_from)
    return ClipTask(cfg, model, tok, data, preprocess, build_evaluator(cfg, model, tok, preprocess))


def train_clip(cfg: ClipRunConfig, out: str | Path, resume: bool = True) -> dict[str, Any]:
    """Train a CLIP per `cfg` into run directory `out` (resuming from its latest checkpoint if any)."""
    return run_training(cfg, out, lambda run: build_task(cfg, run), resume)
