"""Training and evaluation data by `data.kind`: one registry per model family instead of `if kind ==` chains.

A recipe's `data:` section names its source in `kind` (`DataConfig` for CLIP's image-text pairs,
`LlavaDataConfig` for LLaVA's conversations). The source gives the training set, the texts a tokenizer is
fitted on (read without decoding images where the source allows), and the held-out evaluation sets.
A new source is one entry in `IMAGE_TEXT` or `CONVERSATIONS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from torch.utils.data import ConcatDataset, Dataset, Subset

from . import fashion_mnist, media_sets, shapes
from .image_text import ArrayImageText, CsvImageText, TarImageText
from .llava_json import LlavaJson
from .transforms import PreprocessConfig


def _check_kind(kind: str, path: str, registry: dict[str, Any]) -> None:
    if kind not in registry:
        raise ValueError(f"data.kind must be one of {sorted(registry)}, got {kind!r}")
    if registry[kind].needs_path and not path:
        raise ValueError(f"data.kind {kind!r} needs data.path")


# ----------------------------------------------------------------------------- CLIP: image-text pairs

@dataclass
class DataConfig:
    kind: str = "shapes"  # shapes | fashion_mnist | csv | tar | moving_shapes | sounds | spoken | video_csv | audio_csv | video_tar | audio_tar
    path: str = ""  # csv/tsv file, or a tar shard glob; the generated video/audio sets: their directory
    image_col: str = "image"
    caption_col: str = "caption"
    train_size: int = 50_000  # shapes: training images generated on the fly
    single_fraction: float = 0.5  # shapes: share of single-object training images
    seed: int = 0
    eval_size: int = 1000
    eval_path: str = ""  # csv/tar: held-out pairs for retrieval
    # videos and audio (a video or audio CLIP's run sets these from its model config)
    frames: int = 8  # frames sampled per clip
    fps: float = 0.0  # 0: spread over the whole clip; else one frame every 1/fps seconds
    mel_bins: int = 128  # log-mel features per 10 ms frame
    audio_frames: int = 1024  # 10 ms frames per clip (padded or cut)

    def __post_init__(self) -> None:
        _check_kind(self.kind, self.path, IMAGE_TEXT)


# (name, images (N, S, S, 3) uint8, labels, class names, prompt templates) and (name, images, captions)
ZeroShotSet = tuple[str, np.ndarray, list[int], tuple[str, ...], tuple[str, ...]]
RetrievalSet = tuple[str, np.ndarray, list[str]]


@dataclass(frozen=True)
class ImageTextSource:
    train: Callable[[DataConfig, PreprocessConfig], Dataset]
    captions: Callable[[DataConfig, Dataset, int], list[str]]  # (cfg, its training set, at most this many)
    evaluation: Callable[[DataConfig, PreprocessConfig], tuple[list[ZeroShotSet], list[RetrievalSet]]]
    needs_path: bool = False


def _arrays(ds: Dataset, preprocess: PreprocessConfig) -> tuple[np.ndarray, list[str], list[int]]:
    """A small dataset held in memory at the model's image size: images, captions, labels."""
    arr = ArrayImageText(ds, preprocess)
    items = [arr[i] for i in range(len(arr))]
    return np.stack([x["image"] for x in items]), [x["caption"] for x in items], [x["label"] for x in items]


def _shapes_train(d: DataConfig, preprocess: PreprocessConfig) -> Dataset:
    n_single = int(d.train_size * d.single_fraction)
    size = preprocess.image_size
    parts = [shapes.ShapesDataset("train", n_single, d.seed, size, single=True, n_questions=0),
             shapes.ShapesDataset("train", d.train_size - n_single, d.seed, size, single=False, n_questions=0)]
    return ArrayImageText(ConcatDataset([p for p in parts if len(p)]), preprocess)


def _shapes_captions(d: DataConfig, data: Dataset, limit: int) -> list[str]:
    rng = np.random.default_rng([d.seed, 99])
    scenes = (shapes.sample_scene(rng, "train", single=bool(i % 2)) for i in range(limit))
    return [shapes.caption(s, rng) for s in scenes]


def _shapes_evaluation(d: DataConfig, preprocess: PreprocessConfig):
    size, zeroshot = preprocess.image_size, []
    for split in ("val", "novel"):
        imgs, _, labels = _arrays(shapes.ShapesDataset(split, d.eval_size, d.seed, size, single=True, n_questions=0),
                                  preprocess)
        zeroshot.append((f"zeroshot_{'seen' if split == 'val' else split}", imgs, labels, shapes.CLASS_NAMES,
                         shapes.TEMPLATES))
    imgs, caps, _ = _arrays(shapes.ShapesDataset("val", d.eval_size, d.seed + 1, size, n_questions=0), preprocess)
    return zeroshot, [("retrieval_val", imgs, caps)]


def _fashion_train(d: DataConfig, preprocess: PreprocessConfig) -> Dataset:
    return ArrayImageText(fashion_mnist.FashionMNISTDataset("train", seed=d.seed), preprocess)


def _fashion_captions(d: DataConfig, data: Dataset, limit: int) -> list[str]:
    return [t.format(c) for c in fashion_mnist.CLASS_NAMES for t in fashion_mnist.TEMPLATES]


def _fashion_evaluation(d: DataConfig, preprocess: PreprocessConfig):
    test = fashion_mnist.FashionMNISTDataset("test", seed=d.seed)
    n = len(test) if d.eval_size <= 0 else min(d.eval_size, len(test))
    imgs, _, labels = _arrays(Subset(test, range(n)), preprocess)
    # No retrieval here: captions are class templates, so most captions fit a thousand images equally.
    return [("zeroshot_test", imgs, labels, tuple(fashion_mnist.CLASS_NAMES), tuple(fashion_mnist.TEMPLATES))], []


def _held_out_pairs(open_pairs: Callable[[str, PreprocessConfig], Dataset]):
    """Retrieval on the held-out pairs of `eval_path`, opened with `open_pairs` (no evaluation without one);
    unreadable pairs are left out."""
    def evaluation(d: DataConfig, preprocess: PreprocessConfig):
        if not d.eval_path:
            return [], []
        src = open_pairs(d.eval_path, preprocess)
        items = [x for x in (src[i] for i in range(min(len(src), d.eval_size))) if "bad" not in x]
        return [], [("retrieval_eval", np.stack([x["image"] for x in items]), [x["caption"] for x in items])]
    return evaluation


def _tar_captions(d: DataConfig, data: TarImageText, limit: int) -> list[str]:
    texts = (data.raw_caption(i) for i in range(min(limit, len(data))))
    return [t for t in texts if t is not None]


IMAGE_TEXT: dict[str, ImageTextSource] = {
    "shapes": ImageTextSource(_shapes_train, _shapes_captions, _shapes_evaluation),
    "fashion_mnist": ImageTextSource(_fashion_train, _fashion_captions, _fashion_evaluation),
    "csv": ImageTextSource(lambda d, pre: CsvImageText(d.path, pre, d.image_col, d.caption_col),
                           lambda d, data, limit: list(data.captions[:limit]), _held_out_pairs(CsvImageText),
                           needs_path=True),
    "tar": ImageTextSource(lambda d, pre: TarImageText(d.path, pre), _tar_captions, _held_out_pairs(TarImageText),
                           needs_path=True),
    # videos and audio clips (items hold "video" (T, S, S, 3) uint8 or "audio" (T, F) features instead of "image")
    **{name.replace("-", "_"): ImageTextSource(media_sets.generated_train(name),
                                               lambda d, data, limit: list(data.captions[:limit]),
                                               media_sets.generated_evaluation(name))
       for name in media_sets.DATASETS},
    **{f"{col}_csv": ImageTextSource(media_sets.csv_train(col), lambda d, data, limit: list(data.captions[:limit]),
                                     lambda d, pre: ([], []), needs_path=True)
       for col in ("video", "audio")},
    **{f"{col}_tar": ImageTextSource(media_sets.tar_train(col), _tar_captions, lambda d, pre: ([], []), needs_path=True)
       for col in ("video", "audio")},
}


# ----------------------------------------------------------------------------- LLaVA: conversations

@dataclass
class LlavaDataConfig:
    # shapes (generated on the fly) | media_shapes (shapes, moving shapes and sounds, on the fly) | json (LLaVA's JSON)
    kind: str = "shapes"
    path: str = ""  # json: the training file
    image_root: str = ""  # json: image paths are relative to this (default: the file's directory)
    eval_path: str = ""  # json: a file whose first question/answer per record is scored by exact match
    train_size: int = 20_000  # shapes
    n_questions: int = 3  # shapes: questions per conversation (stage 2)
    seed: int = 0
    eval_size: int = 200
    # media_shapes: the share of samples with an image, a video, a sound, and a clip with its soundtrack
    mix: list = field(default_factory=lambda: [0.4, 0.3, 0.2, 0.1])
    frames: int = 8  # media_shapes: frames rendered per clip

    def __post_init__(self) -> None:
        _check_kind(self.kind, self.path, CONVERSATIONS)
        self.mix = list(self.mix)
        if len(self.mix) != 4 or any(not isinstance(m, (int, float)) or m < 0 for m in self.mix) or sum(self.mix) <= 0:
            raise ValueError(f"data.mix must be four shares >= 0 (image, video, audio, video+audio), got {self.mix}")


class ShapesConversations(Dataset):
    """Shapes items as LLaVA samples: {id, images: [uint8 (H, W, 3)], conversations, caption}."""

    def __init__(self, split: str, size: int, seed: int, image_size: int, n_questions: int):
        self.split = split
        self.ds = shapes.ShapesDataset(split, size, seed, image_size, n_questions=n_questions)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.ds[i]
        return {"id": f"shapes-{self.split}-{i}", "images": [item["image"]], "conversations": item["conversations"],
                "caption": item["caption"], "question_types": item["question_types"]}


class MediaShapesConversations(Dataset):
    """Shapes conversations about images mixed with conversations about generated clips and sounds
    (media_sets.media_conversation): sample i is an image, a video, a sound, or a clip with its soundtrack,
    drawn per index in the `mix` proportions. Every sample has the same fields (images, videos, audios)."""

    MODALITIES = ("image", "video", "audio", "video+audio")

    def __init__(self, split: str, size: int, seed: int, image_size: int, n_questions: int,
                 mix: list | tuple = (0.4, 0.3, 0.2, 0.1), frames: int = 8):
        self.split, self.seed, self.n_questions, self.frames = split, seed, n_questions, frames
        self.images = ShapesConversations(split, size, seed, image_size, n_questions)
        p = np.asarray(mix, dtype=np.float64)
        self.modality = np.random.default_rng([seed, 40, ("train", "val", "novel").index(split)]).choice(
            len(self.MODALITIES), size=size, p=p / p.sum())

    def __len__(self) -> int:
        return len(self.modality)

    def __getitem__(self, i: int) -> dict[str, Any]:
        kind = self.MODALITIES[self.modality[i]]
        if kind == "image":
            return {**self.images[i], "videos": [], "audios": [], "modality": "image"}
        return media_sets.media_conversation(self.split, i, kind, self.seed, self.n_questions, self.frames)


def _media_vqa(d: LlavaDataConfig, size: int) -> dict[str, list[dict[str, Any]]]:
    """One set per modality (and the held-out pairs of images and clips), `eval_size` one-question records each."""
    out = _shapes_vqa(d, size)
    for name, split, kind in (("video_val", "val", "video"), ("video_novel", "novel", "video"),
                              ("audio_val", "val", "audio"), ("mixed_val", "val", "video+audio")):
        out[name] = [media_sets.media_conversation(split, i, kind, d.seed, 1, d.frames) for i in range(d.eval_size)]
    return out


@dataclass(frozen=True)
class ConversationSource:
    train: Callable[[LlavaDataConfig, int], Dataset]  # (cfg, image size)
    records: Callable[[Dataset, int], list[dict[str, Any]]]  # the first n samples' text, images not decoded if possible
    evaluation: Callable[[LlavaDataConfig, int], dict[str, list[dict[str, Any]]]]  # name -> VQA samples
    needs_path: bool = False


def _shapes_vqa(d: LlavaDataConfig, size: int) -> dict[str, list[dict[str, Any]]]:
    return {f"vqa_{split}": [ds[i] for i in range(len(ds))] for split in ("val", "novel")
            for ds in [ShapesConversations(split, d.eval_size, d.seed, size, 1)]}


def _json_vqa(d: LlavaDataConfig, size: int) -> dict[str, list[dict[str, Any]]]:
    if not d.eval_path:
        return {}
    ds = LlavaJson(d.eval_path, d.image_root, frames=d.frames)
    items = [ds[i] for i in range(min(len(ds), d.eval_size))]
    return {"vqa_eval": [x for x in items if "bad" not in x]}


CONVERSATIONS: dict[str, ConversationSource] = {
    "shapes": ConversationSource(
        lambda d, size: ShapesConversations("train", d.train_size, d.seed, size, d.n_questions),
        lambda data, n: [data[i] for i in range(n)], _shapes_vqa),
    "media_shapes": ConversationSource(
        lambda d, size: MediaShapesConversations("train", d.train_size, d.seed, size, d.n_questions, d.mix, d.frames),
        lambda data, n: [data[i] for i in range(n)], _media_vqa),
    "json": ConversationSource(lambda d, size: LlavaJson(d.path, d.image_root, frames=d.frames),
                               lambda data, n: data.records[:n],
                               _json_vqa, needs_path=True),
}
