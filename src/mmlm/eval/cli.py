"""`mmlm eval zeroshot|retrieval|vqa`: evaluate a saved CLIP (or, for vqa, LLaVA) on built-in or file-based data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..config import AudioCLIPConfig, VideoCLIPConfig
from ..data.image_text import read_table
from ..data.transforms import BadImageError, ImageProcessor, PreprocessConfig
from ..formats import load, load_preprocess, load_tokenizer
from .retrieval import evaluate_retrieval
from .zeroshot import zeroshot


def open_model(model_dir: str | Path, dtype: Any = None, device: Any = None):
    """(model, tokenizer, ImageProcessor) of a saved CLIP or LLaVA: the checkpoint's preprocessing, else the
    model's default. `dtype` / `device`: where the weights load (`mmlm.load`; default float32 on the CPU)."""
    model = load(model_dir, dtype=dtype, device=device)
    vision = getattr(model.config, "vision", None)  # an audio CLIP has none
    preprocess = load_preprocess(model_dir) or (PreprocessConfig(image_size=vision.image_size) if vision else
                                                PreprocessConfig())
    return model, load_tokenizer(model_dir), ImageProcessor(preprocess)


def array_batches(images: list[np.ndarray], processor: ImageProcessor, batch: int = 256) -> Iterator[torch.Tensor]:
    from PIL import Image

    size = processor.config.image_size
    for i in range(0, len(images), batch):
        chunk = [im if im.shape[:2] == (size, size) else processor.pixels(Image.fromarray(im)) for im in images[i:i + batch]]
        yield processor.normalize(torch.from_numpy(np.stack(chunk)), channels_last=True)


def _file_images(paths: list[str], processor: ImageProcessor) -> tuple[list[np.ndarray], list[int], list[dict]]:
    """Decode files; unreadable ones are skipped and reported, never fatal."""
    images, kept, skipped = [], [], []
    for i, p in enumerate(paths):
        try:
            images.append(processor.pixels(processor.load(p)))
            kept.append(i)
        except BadImageError as e:
            skipped.append({"image": p, "reason": str(e)})
    return images, kept, skipped


def _builtin_zeroshot(name: str, size: int, limit: int) -> tuple[list[np.ndarray], list[int], tuple, tuple]:
    if name in ("shapes", "shapes-novel"):
        from ..data.shapes import CLASS_NAMES, TEMPLATES, ShapesDataset

        ds = ShapesDataset("novel" if name == "shapes-novel" else "val", limit or 1000, 0, size, single=True, n_questions=0)
        items = [ds[i] for i in range(len(ds))]
        return [x["image"] for x in items], [x["label"] for x in items], CLASS_NAMES, TEMPLATES
    from ..data.fashion_mnist import CLASS_NAMES, TEMPLATES, load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    n = limit or len(images)
    rgb = [np.repeat(im[..., None], 3, axis=-1) for im in images[:n]]
    return rgb, labels[:n].tolist(), tuple(CLASS_NAMES), tuple(TEMPLATES)


def eval_zeroshot(model_dir: str | Path, data: str, classes: str | None = None, templates: str | None = None,
                  limit: int = 0, dtype: Any = None, device: Any = None) -> dict[str, Any]:
    model, tok, processor = open_model(model_dir, dtype, device)
    if isinstance(model.config, (VideoCLIPConfig, AudioCLIPConfig)):
        return _media_zeroshot(model, tok, processor, data, classes, templates, limit)
    skipped: list[dict] = []
    if data in ("shapes", "shapes-novel", "fashion_mnist"):
        images, labels, class_names, tmpl = _builtin_zeroshot(data, processor.config.image_size, limit)
    else:
        rows = read_table(data, ["image", "label"])[: limit or None]
        root = Path(data).parent
        if classes:
            text = Path(classes).read_text()
            class_names = tuple(json.loads(text)) if classes.endswith(".json") else tuple(l.strip() for l in text.splitlines() if l.strip())
        else:
            class_names = tuple(sorted({r["label"] for r in rows}))
        unknown = sorted({r["label"] for r in rows} - set(class_names))
        if unknown:
            raise ValueError(f"{data}: labels {unknown[:5]} are not among the class names")
        images, kept, skipped = _file_images([str(root / r["image"]) for r in rows], processor)
        labels = [class_names.index(rows[i]["label"]) for i in kept]
        tmpl = ("a photo of a {}.",)
    if templates:
        tmpl = tuple(l.strip() for l in Path(templates).read_text().splitlines() if l.strip())
    with torch.no_grad():
        result = zeroshot(model, tok, array_batches(images, processor), torch.tensor(labels), class_names, tmpl)
    return {"task": "zeroshot", "data": data, **result, "skipped": skipped}


def _media_zeroshot(model, tok, processor: ImageProcessor, data: str, classes: str | None, templates: str | None,
                    limit: int) -> dict[str, Any]:
    """Zero-shot over a CSV/TSV of videos or audio clips (`video` or `audio` column, `label`: a class name or index).

    Class names and templates: `classes` / `templates` files, else the classes.json beside the table (`mmlm data`
    writes one), else the sorted labels and "a video of {}." / "the sound of {}."."""
    video = _media_column(model) == "video"
    col = "video" if video else "audio"
    rows = read_table(data, [col, "label"])
    beside = Path(data).parent / "classes.json"
    spec = json.loads(beside.read_text()) if beside.is_file() else {}
    if classes:
        text = Path(classes).read_text()
        class_names = tuple(json.loads(text)) if classes.endswith(".json") else tuple(l.strip() for l in text.splitlines() if l.strip())
    else:
        class_names = tuple(spec.get("classes") or sorted({r["label"] for r in rows}))
    tmpl = tuple(spec.get("templates") or (("a video of {}.",) if video else ("the sound of {}.",)))
    if templates:
        tmpl = tuple(l.strip() for l in Path(templates).read_text().splitlines() if l.strip())

    def label_index(label: str) -> int:
        if label in class_names:
            return class_names.index(label)
        if label.strip().isdigit() and int(label) < len(class_names):
            return int(label)
        raise ValueError(f"{data}: label {label!r} is neither a class name nor a class index")

    _, items, kept, skipped = _media_items(model, processor, data, "label", limit)
    labels = [label_index(rows[i]["label"]) for i in kept]

    with torch.no_grad():
        result = zeroshot(model, tok, _media_batches(model, processor, items), torch.tensor(labels), class_names, tmpl,
                          encode=_media_encoder(model))
    return {"task": "zeroshot", "data": data, **result, "skipped": skipped}


def _media_column(model) -> str | None:
    """"video" for a video CLIP, "audio" for an audio CLIP, None for an image CLIP."""
    if isinstance(model.config, VideoCLIPConfig):
        return "video"
    return "audio" if hasattr(model, "encode_audio") else None


def _media_encoder(model):
    return model.encode_video if _media_column(model) == "video" else model.encode_audio


def _media_items(model, processor: ImageProcessor, data: str, caption_col: str, limit: int,
                 rows: Sequence[int] | None = None) -> tuple[Any, list, list[int], list[dict]]:
    """Decode the table's videos (as the model samples frames) or audio clips (as log-mel features): rows `rows`
    (default all, up to `limit`). Returns the dataset, the decoded items, the rows they came from, and the rows
    skipped (file and reason)."""
    from ..data.fbank import FbankConfig
    from ..data.media import CsvAudioText, CsvVideoText

    col = _media_column(model)
    if col == "video":
        ds = CsvVideoText(data, processor.config, frames=model.config.temporal.frames, caption_col=caption_col)
    else:
        ds = CsvAudioText(data, FbankConfig.for_tower(model.config.audio), caption_col=caption_col)
    wanted = list(rows) if rows is not None else list(range(min(len(ds), limit or len(ds))))
    items, kept, skipped = [], [], []
    for i in wanted:
        x = ds[i]
        if "bad" in x:
            skipped.append({col: ds.videos[i] if col == "video" else ds.files[i], "reason": x["bad"][1]})
        else:
            items.append(x[col])
            kept.append(i)
    if not items:
        raise ValueError(f"{data}: none of its {len(wanted)} {col} files could be read")
    return ds, items, kept, skipped


def _media_batches(model, processor: ImageProcessor, items: list, n: int = 64) -> Iterator[torch.Tensor]:
    from ..data.media import normalize_videos

    video = _media_column(model) == "video"
    for i in range(0, len(items), n):
        x = torch.from_numpy(np.stack(items[i:i + n]))
        yield normalize_videos(x, processor) if video else x


def eval_retrieval(model_dir: str | Path, data: str, limit: int = 0, dtype: Any = None,
                   device: Any = None) -> dict[str, Any]:
    """Recall@K both ways over 'shapes' (val) or a CSV/TSV of image (or, for a video / audio CLIP, video / audio)
    and caption columns; a file may repeat with several captions and is decoded once."""
    model, tok, processor = open_model(model_dir, dtype, device)
    skipped: list[dict] = []
    col = _media_column(model)
    if col is not None:
        if data == "shapes":
            raise ValueError(f"--data shapes holds images; a {col} CLIP needs a CSV/TSV with {col},caption columns "
                             f"(`mmlm data {'moving-shapes' if col == 'video' else 'sounds'}` writes one)")
        rows = read_table(data, [col, "caption"])
        first: dict[str, int] = {}
        for i, r in enumerate(rows):
            first.setdefault(r[col], i)
        files = list(first)[: limit or None]
        _, items, kept, skipped = _media_items(model, processor, data, "caption", 0, [first[f] for f in files])
        index = {rows[i][col]: j for j, i in enumerate(kept)}
        pairs = [(r["caption"], index[r[col]]) for r in rows if r[col] in index]
        metrics = evaluate_retrieval(model, tok, _media_batches(model, processor, items), [c for c, _ in pairs],
                                     [j for _, j in pairs], encode=_media_encoder(model))
        return {"task": "retrieval", "data": data, **metrics, "skipped": skipped}
    if data == "shapes":
        from ..data.shapes import ShapesDataset

        ds = ShapesDataset("val", limit or 1000, 1, processor.config.image_size, n_questions=0)
        items = [ds[i] for i in range(len(ds))]
        images, captions, text_image = [x["image"] for x in items], [x["caption"] for x in items], list(range(len(items)))
    else:
        rows = read_table(data, ["image", "caption"])
        root = Path(data).parent
        order: dict[str, int] = {}
        for r in rows:
            order.setdefault(r["image"], len(order))
        paths = list(order)[: limit or None]
        images, kept, skipped = _file_images([str(root / p) for p in paths], processor)
        new_index = {paths[k]: j for j, k in enumerate(kept)}
        pairs = [(r["caption"], new_index[r["image"]]) for r in rows if r["image"] in new_index]
        captions, text_image = [c for c, _ in pairs], [j for _, j in pairs]
    metrics = evaluate_retrieval(model, tok, array_batches(images, processor), captions, text_image)
    return {"task": "retrieval", "data": data, **metrics, "skipped": skipped}


def eval_vqa(model_dir: str | Path, data: str, template: str | None = None, limit: int = 0,
             weights: str | None = None, answers: str | Path | None = None, dtype: Any = None,
             device: Any = None) -> dict[str, Any]:
    """Exact-match VQA of a LLaVA model (greedy decoding) on a LLaVA-JSON file with reference answers, or on the
    built-in shapes questions: "shapes" (val, seen colour-shape pairs) or "shapes-novel" (held-out pairs), one
    question per image, `limit` images (default 500); "media-shapes" adds as many clips, sounds and clips with their
    sound (a model that reads them; "media-shapes-novel": images and clips of held-out pairs).
    `weights` "int8"/"int4" answers with the LM quantized.
    `answers`: a JSON-lines file to write every question's answer to (id, type, question, answer, reference,
    correct), for reading the mistakes. `dtype` / `device`: where the weights load (default float32, CPU)."""
    from ..data.llava_json import LlavaJson
    from .vqa import evaluate_vqa

    model, tok, processor = open_model(model_dir, dtype, device)
    if weights:
        from ..quant import quantize

        quantize(model, weights)
    template = template or getattr(model.config, "template", "vicuna_v1")  # as the model was tuned
    if data in ("shapes", "shapes-novel"):
        from ..data.sources import ShapesConversations

        ds = ShapesConversations("val" if data == "shapes" else "novel", limit if limit > 0 else 500, 0,
                                 model.config.vision.image_size, 1)
    elif data in ("media-shapes", "media-shapes-novel"):  # images, clips, sounds and clips with sound, `limit` each
        from ..data.media_sets import media_conversation
        from ..data.sources import ShapesConversations

        split, n = ("val" if data == "media-shapes" else "novel"), limit if limit > 0 else 500
        kinds = [k for k in ("video", "audio", "video+audio") if split == "val" or k == "video"]
        images = ShapesConversations(split, n, 0, model.config.vision.image_size, 1)
        ds = [{**images[i], "modality": "image"} for i in range(n)]
        ds += [media_conversation(split, i, kind, n_questions=1) for kind in kinds for i in range(n)]
        limit = 0
    else:
        ds = LlavaJson(data, frames=getattr(model.config, "video_frames", 8))
    items = [ds[i] for i in range(len(ds) if limit <= 0 else min(limit, len(ds)))]
    bad = [x["bad"] for x in items if "bad" in x]
    result = evaluate_vqa(model, tok, processor, [x for x in items if "bad" not in x], template,
                          all_answers=answers is not None)
    if answers is not None:
        from ..checkpoint import atomic_write

        text = "".join(json.dumps(a) + "\n" for a in result.pop("answers"))
        atomic_write(answers, lambda tmp: Path(tmp).write_text(text))
    return {"model": str(model_dir), "data": data, "template": template, **result, "skipped": len(bad)}
