"""Fashion-MNIST: 70k real 28×28 greyscale product photos in 10 classes, with template captions.

Read from the Debian package `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist/*.gz, idx
format), or from `root=` / the MMLM_FASHION_MNIST environment variable. The idx format is a
big-endian header (magic, then one uint32 per dimension) followed by the raw uint8 values:
magic 2049 (0x801) for a label vector, 2051 (0x803) for an image tensor (N, 28, 28).
"""

from __future__ import annotations

import gzip
import os
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "MMLM_FASHION_MNIST"
INSTALL_HINT = "apt-get install dataset-fashion-mnist"
SPLITS = ("train", "test")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# The dataset's own label names, and the natural-language names used in prompts.
ORIGINAL_CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CLASS_NAMES = (
    "t-shirt", "pair of trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)
TEMPLATES = (
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a grayscale photo of a {}.",
    "a small photo of a {}.",
    "a blurry photo of a {}.",
    "a centered photo of a {}.",
    "a product photo of a {}.",
    "a close-up photo of the {}.",
    "a photo of the {}.",
)
_IMAGE_MAGIC, _LABEL_MAGIC = 2051, 2049


def resolve_root(root: str | os.PathLike | None = None) -> Path:
    """`root`, else $MMLM_FASHION_MNIST, else the Debian package's directory."""
    if root is None:
        root = os.environ.get(ENV_VAR) or DEFAULT_ROOT
    return Path(root).expanduser()


def _find(root: Path, name: str) -> Path:
    for candidate in (root / name, root / name.removesuffix(".gz")):  # gzipped, or already unpacked
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {root / name} not found. Install the dataset with `{INSTALL_HINT}` "
        f"(it lands in {DEFAULT_ROOT}), or pass root=... / set {ENV_VAR} to a directory holding "
        f"{', '.join(n for pair in FILES.values() for n in pair)}."
    )


def read_idx(path: str | os.PathLike, magic: int) -> np.ndarray:
    """An idx file (gzipped or not) as a uint8 array of the shape its header gives; checks magic and size."""
    path = Path(path)
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"corrupt Fashion-MNIST file {path}: cannot decompress ({e})") from e
    ndim = {_LABEL_MAGIC: 1, _IMAGE_MAGIC: 3}[magic]
    header = 4 * (1 + ndim)
    if len(data) < header:
        raise ValueError(f"corrupt Fashion-MNIST file {path}: {len(data)} bytes, shorter than the idx header")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"corrupt Fashion-MNIST file {path}: idx magic {found}, expected {magic}")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise ValueError(
            f"corrupt Fashion-MNIST file {path}: header says shape {shape} ({expected} bytes), "
            f"file holds {len(data) - header}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


@lru_cache(maxsize=4)
def _load(split: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    image_file, label_file = (_find(root, name) for name in FILES[split])
    images = read_idx(image_file, _IMAGE_MAGIC)
    labels = read_idx(label_file, _LABEL_MAGIC).astype(np.int64)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"corrupt Fashion-MNIST file {image_file}: images are {images.shape[1:]}, expected (28, 28)")
    if len(images) != len(labels):
        raise ValueError(
            f"Fashion-MNIST {split}: {len(images)} images in {image_file} but {len(labels)} labels in {label_file}"
        )
    if labels.size and not 0 <= labels.min() <= labels.max() < len(CLASS_NAMES):
        raise ValueError(f"corrupt Fashion-MNIST file {label_file}: labels outside 0..{len(CLASS_NAMES) - 1}")
    labels.flags.writeable = False  # shared by every caller through the cache
    return images, labels


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of "train" (60k) or "test" (10k), cached in memory.

    The arrays are read-only views shared between callers; copy before writing."""
    if split not in SPLITS:
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; expected one of {SPLITS}")
    return _load(split, resolve_root(root).resolve())


class FashionMNISTDataset(torch.utils.data.Dataset):
    """Item: dict(image=(28, 28, 3) uint8 RGB, caption=a template filled with the class name, label=int).

    The template of item i is drawn from `np.random.default_rng([seed, split_index, i])`, so captions
    are reproducible and independent of order and workers. Pickles without the arrays: each worker
    process loads them once through the cache."""

    def __init__(
        self,
        split: str = "train",
        seed: int = 0,
        root: str | os.PathLike | None = None,
        templates: Sequence[str] = TEMPLATES,
        class_names: Sequence[str] = CLASS_NAMES,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown Fashion-MNIST split {split!r}; expected one of {SPLITS}")
        if not templates or not all("{}" in t for t in templates):
            raise ValueError("templates must be a non-empty list of strings containing '{}'")
        self.split, self.seed = split, int(seed)
        self.root = resolve_root(root).resolve()  # fixed now, so workers read the same files
        self.templates, self.class_names = tuple(templates), tuple(class_names)
        self._size = len(self._arrays()[1])  # fail early, naming the missing file

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return _load(self.split, self.root)

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = int(index)
        if i < 0:
            i += self._size
        if not 0 <= i < self._size:
            raise IndexError(f"index {index} out of range for FashionMNISTDataset of size {self._size}")
        images, labels = self._arrays()
        label = int(labels[i])
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), i])
        template = self.templates[int(rng.integers(len(self.templates)))]
        image = np.repeat(images[i][:, :, None], 3, axis=2)  # (28, 28, 3), a fresh writable array
        return dict(image=image, caption=template.format(self.class_names[label]), label=label)

    def __repr__(self) -> str:
        return f"FashionMNISTDataset(split={self.split!r}, size={self._size}, root={str(self.root)!r})"
