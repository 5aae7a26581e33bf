"""Image-text pair sources (CSV/TSV files, webdataset-style tar shards) and the batch collate.

Every source is a map-style dataset whose item `i` is a pure function of `i`, which is what makes a
shuffled, multi-worker, killed-and-resumed run reproducible. An item is either
`{"image": uint8 (S, S, 3), "caption": str}` or, when its image cannot be used (missing, corrupt,
a decompression bomb), `{"bad": (source, reason)}`: the collate drops it and the training loop counts
and names it, failing only past a threshold.
"""

from __future__ import annotations

import csv
import glob
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .transforms import BadImageError, ImageProcessor, PreprocessConfig, load_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def read_table(path: str | Path, columns: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV (or TSV, by extension) that must have `columns`; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        header = reader.fieldnames or []
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"{path}: line 1: missing column(s) {missing}; the header has {header}")
        rows = []
        for row in reader:
            if None in row or any(row[c] is None for c in columns):
                raise ValueError(f"{path}: line {reader.line_num}: expected {len(header)} fields, found a different count")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows after the header")
    return rows


class CsvImageText(Dataset):
    """A CSV/TSV with an image path column and a caption column; paths are relative to the file."""

    def __init__(self, path: str | Path, preprocess: PreprocessConfig, image_col: str = "image",
                 caption_col: str = "caption", max_pixels: int | None = None):
        self.path = Path(path)
        rows = read_table(self.path, [image_col, caption_col])
        root = self.path.parent
        self.images = [str(root / r[image_col]) for r in rows]
        self.captions = [r[caption_col] for r in rows]
        self.processor = ImageProcessor(preprocess, max_pixels=max_pixels)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            return {"image": self.processor.pixels(self.processor.load(self.images[i])), "caption": self.captions[i]}
        except BadImageError as e:
            return {"bad": (f"{self.path}:{i + 2}", str(e))}  # line i + 2: the header is line 1


@dataclass(frozen=True)
class _Member:
    shard: int
    offset: int
    size: int


class TarShards(Dataset):
    """webdataset-style tar shards indexed once (tar headers only, no payload read): members `KEY.EXT` that share
    a key are one sample, `KEY.txt` its caption. Any sample is then read by seeking, so shuffling, worker and rank
    splitting and exact resume work as for a CSV. `samples[i]` = (shard:key, the first member with one of
    `extensions`, the .txt member); a missing one makes the sample bad, never silently dropped."""

    def __init__(self, shards: str | Sequence[str], extensions: Sequence[str]):
        if isinstance(shards, (str, Path)):
            paths = sorted(glob.glob(str(shards))) or ([str(shards)] if Path(shards).is_file() else [])
        else:
            paths = [str(s) for s in shards]
        if not paths:
            raise FileNotFoundError(f"no tar shards match {shards!r}")
        self.shards = paths
        self.samples: list[tuple[str, _Member | None, _Member | None]] = []
        for s, path in enumerate(paths):
            groups: dict[str, dict[str, _Member]] = {}
            try:
                with tarfile.open(path) as tar:
                    for m in tar:
                        if not m.isfile():
                            continue
                        key, ext = os.path.splitext(m.name)
                        groups.setdefault(key, {})[ext.lower()] = _Member(s, m.offset_data, m.size)
            except (tarfile.TarError, OSError) as e:
                raise ValueError(f"{path}: not a readable tar shard: {e}") from e
            for key, parts in groups.items():
                payload = next((parts[e] for e in extensions if e in parts), None)
                self.samples.append((f"{path}:{key}", payload, parts.get(".txt")))
        self._files: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, m: _Member) -> bytes:
        f = self._files.get(m.shard)
        if f is None:  # opened lazily, per process (DataLoader workers each get their own handles)
            f = self._files[m.shard] = open(self.shards[m.shard], "rb")
        f.seek(m.offset)
        return f.read(m.size)

    def raw_caption(self, i: int) -> str | None:
        """Sample i's caption text as stored (undecodable bytes replaced), without reading its payload; None
        when it has no caption member."""
        text = self.samples[i][2]
        return None if text is None else self._read(text).decode("utf-8", errors="replace")

    def __getstate__(self) -> dict[str, Any]:  # file handles do not cross process boundaries
        return {**self.__dict__, "_files": {}}


class TarImageText(TarShards):
    """Tar shards of `KEY.jpg|png|...` + `KEY.txt` (see TarShards)."""

    def __init__(self, shards: str | Sequence[str], preprocess: PreprocessConfig, max_pixels: int | None = None):
        super().__init__(shards, IMAGE_EXTENSIONS)
        self.processor = ImageProcessor(preprocess, max_pixels=max_pixels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        name, image, text = self.samples[i]
        if image is None or text is None:
            return {"bad": (name, "missing " + ("image" if image is None else "caption") + " member")}
        try:
            pil = load_image(io.BytesIO(self._read(image)), max_pixels=self.processor.max_pixels, name=name)
            caption = self._read(text).decode("utf-8").strip()
        except (BadImageError, UnicodeDecodeError) as e:
            return {"bad": (name, str(e))}
        return {"image": self.processor.pixels(pil), "caption": caption}


class ArrayImageText(Dataset):
    """Adapts a dataset of `{"image": uint8 array, "caption": str, ...}` items (shapes, Fashion-MNIST),
    resizing with the preprocessing config when the array is not already at the model's size."""

    def __init__(self, base: Dataset, preprocess: PreprocessConfig):
        self.base = base
        self.processor = ImageProcessor(preprocess)
        self.size = preprocess.image_size

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.base[i]
        image = item["image"]
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=-1)
        if image.shape[:2] != (self.size, self.size):
            image = self.processor.pixels(Image.fromarray(image))
        return {"image": image, "caption": item["caption"], "label": item.get("label", -1)}


class ImageTextCollate:
    """Samples -> {"pixel_values" (B, 3, S, S) float32, "input_ids" (B, T), "labels" (B,), "bad", "batch_size"}."""

    def __init__(self, tokenizer: Any, context_length: int, preprocess: PreprocessConfig):
        self.tokenizer, self.context_length = tokenizer, context_length
        self.processor = ImageProcessor(preprocess)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        good = [s for s in samples if "bad" not in s]
        bad = [s["bad"] for s in samples if "bad" in s]
        if not good:
            return {"pixel_values": None, "input_ids": None, "labels": None, "bad": bad, "batch_size": 0}
        images = torch.from_numpy(np.stack([s["image"] for s in good]))  # (B, S, S, 3) uint8
        ids = self.tokenizer([s["caption"] for s in good], context_length=self.context_length)
        # Drop the padding columns after the batch's longest caption: the causal text tower never looks
        # past a row's EOT, so the features are the same and short captions cost less.
        longest = int((ids == self.tokenizer.eot_id).int().argmax(dim=1).max()) + 1
        return {
            "pixel_values": self.processor.normalize(images, channels_last=True),
            "input_ids": ids[:, :longest],
            "labels": torch.tensor([s.get("label", -1) for s in good]),
            "bad": bad,
            "batch_size": len(good),
        }
