"""`mmlm train clip`: build data, tokenizer, model and evaluation from a recipe, then run the loop."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from torch.utils.data import ConcatDataset, Dataset

from ..checkpoint import load_state_dict_strict
from .. import distributed
from ..data.image_text import ArrayImageText, CsvImageText, TarImageText
from ..data.transforms import ImageProcessor, PreprocessConfig
from ..eval.retrieval import evaluate_retrieval
from ..eval.zeroshot import zeroshot
from ..formats import load as load_model
from ..formats import load_tokenizer
from ..models.clip import CLIP
from .clip_task import ClipRunConfig, ClipTask, run_config_from_dict
from .loop import train


# ----------------------------------------------------------------------------- data per kind

def train_data(cfg: ClipRunConfig, preprocess: PreprocessConfig) -> Dataset:
    d = cfg.data
    if d.kind == "shapes":
        from ..data.shapes import ShapesDataset

        n_single = int(d.train_size * d.single_fraction)
        size = cfg.model.vision.image_size
        parts = [ShapesDataset("train", n_single, d.seed, size, single=True, n_questions=0),
                 ShapesDataset("train", d.train_size - n_single, d.seed, size, single=False, n_questions=0)]
        return ArrayImageText(ConcatDataset([p for p in parts if len(p)]), preprocess)
    if d.kind == "fashion_mnist":
        from ..data.fashion_mnist import FashionMNISTDataset

        return ArrayImageText(FashionMNISTDataset("train", seed=d.seed), preprocess)
    if d.kind == "csv":
        return CsvImageText(d.path, preprocess, d.image_col, d.caption_col)
    return TarImageText(d.path, preprocess)


def caption_corpus(cfg: ClipRunConfig, data: Dataset, limit: int = 20_000) -> list[str]:
    """Training captions for fitting a BPE (without decoding images where the source allows)."""
    d = cfg.data
    if d.kind == "shapes":
        from ..data.shapes import caption, sample_scene

        rng = np.random.default_rng([d.seed, 99])
        return [caption(s, rng) for s in (sample_scene(rng, "train", single=bool(i % 2)) for i in range(limit))]
    if d.kind == "fashion_mnist":
        from ..data.fashion_mnist import CLASS_NAMES, TEMPLATES

        return [t.format(c) for c in CLASS_NAMES for t in TEMPLATES]
    if d.kind == "csv":
        return list(data.captions[:limit])
    out = []
    for i in range(min(limit, len(data))):
        _, _, text = data.samples[i]
        if text is not None:
            out.append(data._read(text).decode("utf-8", errors="replace"))
    return out


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


# ----------------------------------------------------------------------------- evaluation suites

def _pixel_batches(images: np.ndarray, processor: ImageProcessor, batch: int = 256):
    for i in range(0, len(images), batch):
        yield processor.normalize(torch.from_numpy(images[i:i + batch]), channels_last=True)


def _materialise(ds: Dataset, processor: ImageProcessor, size: int) -> tuple[np.ndarray, list[str], list[int]]:
    arr = ArrayImageText(ds, processor.config)
    items = [arr[i] for i in range(len(arr))]
    return np.stack([x["image"] for x in items]), [x["caption"] for x in items], [x["label"] for x in items]


def build_evaluator(cfg: ClipRunConfig, model: CLIP, tok, preprocess: PreprocessConfig) -> Callable[[], dict[str, Any]]:
    """Evaluation sets are generated once and kept in memory; the closure embeds and scores them."""
    d, size = cfg.data, cfg.model.vision.image_size
    processor = ImageProcessor(preprocess)
    zs: list[tuple[str, np.ndarray, list[int], tuple[str, ...], tuple[str, ...]]] = []
    ret: list[tuple[str, np.ndarray, list[str]]] = []
    if d.kind == "shapes":
        from ..data.shapes import CLASS_NAMES, TEMPLATES, ShapesDataset

        for split in ("val", "novel"):
            imgs, _, labels = _materialise(ShapesDataset(split, d.eval_size, d.seed, size, single=True, n_questions=0),
                                           processor, size)
            zs.append((f"zeroshot_{'seen' if split == 'val' else split}", imgs, labels, CLASS_NAMES, TEMPLATES))
        imgs, caps, _ = _materialise(ShapesDataset("val", d.eval_size, d.seed + 1, size, n_questions=0), processor, size)
        ret.append(("retrieval_val", imgs, caps))
    elif d.kind == "fashion_mnist":
        from ..data.fashion_mnist import CLASS_NAMES, TEMPLATES, FashionMNISTDataset

        test = FashionMNISTDataset("test", seed=d.seed)
        n = len(test) if d.eval_size <= 0 else min(d.eval_size, len(test))
        imgs, caps, labels = _materialise(torch.utils.data.Subset(test, range(n)), processor, size)
        # No retrieval here: captions are class templates, so most captions fit a thousand images equally.
        zs.append(("zeroshot_test", imgs, labels, tuple(CLASS_NAMES), tuple(TEMPLATES)))
    elif d.eval_path:
        src = CsvImageText(d.eval_path, preprocess) if d.kind == "csv" else TarImageText(d.eval_path, preprocess)
        items = [src[i] for i in range(min(len(src), d.eval_size))]
        items = [x for x in items if "bad" not in x]
        ret.append(("retrieval_eval", np.stack([x["image"] for x in items]), [x["caption"] for x in items]))

    def evaluate() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, imgs, labels, classes, templates in zs:
            m = zeroshot(model, tok, _pixel_batches(imgs, processor), torch.tensor(labels), classes, templates,
                         with_confusion=False)
            out[name] = {"top1": m["top1"], "top5": m["top5"]}
        for name, imgs, caps in ret:
            m = evaluate_retrieval(model, tok, _pixel_batches(imgs, processor), caps, range(len(caps)))
            out[name] = {k: v for k, v in m.items() if "@" in k}
        return out

    return evaluate


# ----------------------------------------------------------------------------- entry point

def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> ClipRunConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a YAML mapping at the top level")
    return run_config_from_dict(raw, overrides)


def train_clip(cfg: ClipRunConfig, out: str | Path, resume: bool = True) -> dict[str, Any]:
    """Train a CLIP per `cfg` into run directory `out` (resuming from its latest checkpoint if any)."""
    out = Path(out)
    w = distributed.setup(cfg.train.dist_timeout_s)  # under torchrun (else nothing)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    preprocess = PreprocessConfig(image_size=cfg.model.vision.image_size)
    data = train_data(cfg, preprocess)
    with distributed.main_first():  # rank 0 fits and saves the tokenizer, the other ranks load it
        tok = build_tokenizer(cfg, data, out)
    fit_text_to_tokenizer(cfg, tok)
    if w.is_main:
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    torch.manual_seed(cfg.train.seed)
    model = CLIP(cfg.model)
    if cfg.init_from:
        src = load_model(cfg.init_from)
        load_state_dict_strict(model, src.state_dict(), cfg.init_from)
    task = ClipTask(cfg, model, tok, data, preprocess, build_evaluator(cfg, model, tok, preprocess))
    summary = train(task, cfg.train, out, resume=resume)
    if w.is_main:
        print(json.dumps({"run": str(out), **summary}))
    return summary
