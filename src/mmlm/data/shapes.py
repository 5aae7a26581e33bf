"""shapes: the embedded synthetic image-text dataset, deterministic from a seed.

An image is a dark noisy square split into a 3×3 grid; 1–3 objects each sit in their own cell,
so they never overlap. An object is a (shape, colour, size, position):

    shape    circle square triangle pentagon hexagon star cross diamond
    colour   red green blue yellow purple orange cyan white
    size     small (≈ half a cell across) or large (≈ a whole cell, with a margin)
    position top left, top, top right, left, center, right, bottom left, bottom, bottom right

Within one scene colours are distinct and shapes are distinct, so "the star" and "the red object"
always name exactly one object and every VQA answer is unambiguous.

Twelve (colour, shape) pairs, `HELD_OUT_PAIRS`, never appear in `train` or `val` images (nor in
their captions or questions); every colour and every shape still does. The `novel` split puts a
held-out pair on its first object (single-object `novel` images show only held-out pairs): CLIP
zero-shot and LLaVA answers there test composition of attributes seen apart.

Item i of a split comes from `np.random.default_rng([seed, split_index, i])` alone (the
single-object variant appends a 1), so any item can be regenerated on its own: on-the-fly datasets
are resumable and worker-safe. Within an item the stream is consumed in a fixed order:
`sample_scene`, `render`, `caption`, `conversations`.

Rendering draws each object's mask at 4× on a canvas the size of its cell with Pillow and
box-downsamples it (anti-aliasing), then alpha-blends a flat colour over the background.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tarfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "pentagon", "hexagon", "star", "cross", "diamond")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "cyan", "white")
SIZES = ("small", "large")
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # row-major over the 3×3 grid: position index p sits in row p // 3, column p % 3
SPLITS = ("train", "val", "novel")

# A Latin-square-like pattern: the diagonal (colour i, shape i) for all 8, plus (colour i, shape i+4)
# for the even colours. Each colour and each shape is held out once or twice, never more.
HELD_OUT_PAIRS = (
    ("red", "circle"), ("green", "square"), ("blue", "triangle"), ("yellow", "pentagon"),
    ("purple", "hexagon"), ("orange", "star"), ("cyan", "cross"), ("white", "diamond"),
    ("red", "hexagon"), ("blue", "cross"), ("purple", "circle"), ("cyan", "triangle"),
)
ALL_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES)
SEEN_PAIRS = tuple(p for p in ALL_PAIRS if p not in HELD_OUT_PAIRS)
CLASS_NAMES = tuple(f"{c} {s}" for c, s in ALL_PAIRS)  # index = colour_index * 8 + shape_index

# Zero-shot prompt templates; article-free ("the {}") so "orange star" never reads "a orange star".
# Captions use these frames too, so CLIP sees them in training.
TEMPLATES = ("a photo of the {}.", "the {}.", "a picture of the {}.")

QUESTION_TYPES = ("colour", "shape", "size", "count", "position", "existence", "describe")

# Base RGB of each colour; render() varies the shade a little.
COLOUR_RGB = {
    "red": (225, 35, 35),
    "green": (40, 195, 60),
    "blue": (45, 95, 240),
    "yellow": (240, 225, 40),
    "purple": (160, 60, 215),
    "orange": (250, 135, 20),
    "cyan": (30, 215, 225),
    "white": (240, 240, 240),
}

_SIZE_FRACTION = {"small": 0.58, "large": 0.84}  # object extent / cell side
_SUPERSAMPLE = 4  # anti-aliasing: draw at 4× and box-downsample
_MAX_ROTATION_DEG = 8.0  # more would turn a square towards a diamond
_POSITION_PHRASES = {
    "top left": "in the top left", "top": "at the top", "top right": "in the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left", "bottom": "at the bottom", "bottom right": "in the bottom right",
}
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def class_index(colour: str, shape: str) -> int:
    """Index of "colour shape" in CLASS_NAMES."""
    return COLOURS.index(colour) * len(SHAPES) + SHAPES.index(shape)


@dataclass
class ShapeObject:
    shape: str
    colour: str
    size: str
    position: str

    @property
    def name(self) -> str:
        """The class name, e.g. "red circle"."""
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    objects: list[ShapeObject] = field(default_factory=list)


# ---------------------------------------------------------------- sampling


def _split_index(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown shapes split {split!r}; expected one of {SPLITS}")
    return SPLITS.index(split)


def item_rng(seed: int, split: str, index: int, single: bool = False) -> np.random.Generator:
    """The generator that item `index` of `split` is built from, and nothing else."""
    key = [int(seed), _split_index(split), int(index)]
    return np.random.default_rng(key + [1] if single else key)


def _pick_pair(rng: np.random.Generator, pairs: Sequence[tuple[str, str]], used: list[ShapeObject]) -> tuple[str, str]:
    colours, shapes = {o.colour for o in used}, {o.shape for o in used}
    free = [p for p in pairs if p[0] not in colours and p[1] not in shapes]
    return free[int(rng.integers(len(free)))]


def sample_scene(rng: np.random.Generator, split: str, max_objects: int = 3, single: bool = False) -> Scene:
    """1..max_objects objects (exactly 1 if `single`) in distinct cells, with distinct colours and shapes.

    train/val use only seen pairs; in `novel` the first object is a held-out pair (the others any pair)."""
    _split_index(split)
    if not 1 <= max_objects <= len(COLOURS):
        raise ValueError(f"max_objects must be in 1..{len(COLOURS)}, got {max_objects}")
    n = 1 if single else int(rng.integers(1, max_objects + 1))
    cells = rng.choice(len(POSITIONS), size=n, replace=False)
    objects: list[ShapeObject] = []
    for k in range(n):
        if split == "novel":
            pairs = HELD_OUT_PAIRS if k == 0 else ALL_PAIRS
        else:
            pairs = SEEN_PAIRS
        colour, shape = _pick_pair(rng, pairs, objects)
        size = SIZES[int(rng.integers(len(SIZES)))]
        objects.append(ShapeObject(shape, colour, size, POSITIONS[int(cells[k])]))
    return Scene(objects)


# ---------------------------------------------------------------- rendering


@lru_cache(maxsize=None)
def _unit_polygon(shape: str) -> np.ndarray:
    """Vertices (K, 2) of `shape` in x-right, y-down coordinates, centred; within ±1.05 on both axes
    at any rotation up to ±8°.

    The scales even out the areas a little (a unit square would dwarf a unit star)."""

    def regular(k: int, start_deg: float, radius: float = 1.0) -> np.ndarray:
        a = np.deg2rad(start_deg + 360.0 / k * np.arange(k))
        return radius * np.stack([np.cos(a), np.sin(a)], axis=1)

    if shape == "square":
        pts = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * 0.82
    elif shape == "triangle":  # equilateral, apex up
        pts = regular(3, -90.0) * 1.08
    elif shape == "pentagon":  # apex up, flat bottom
        pts = regular(5, -90.0)
    elif shape == "hexagon":  # flat top and bottom, points left and right: unlike the pentagon
        pts = regular(6, 0.0)
    elif shape == "star":  # five points, apex up
        outer, inner = regular(5, -90.0), regular(5, -90.0 + 36.0, 0.42)
        pts = np.stack([outer, inner], axis=1).reshape(10, 2)
    elif shape == "cross":  # a plus sign
        w = 0.32
        pts = np.array([
            [-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w],
            [w, 1], [-w, 1], [-w, w], [-1, w], [-1, -w], [-w, -w],
        ], dtype=np.float64)
    elif shape == "diamond":  # a rhombus taller than wide, so never a rotated square
        pts = np.array([[0, -1], [0.68, 0], [0, 1], [-0.68, 0]], dtype=np.float64)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return pts - (pts.max(0) + pts.min(0)) / 2  # centre the bounding box


def object_mask(
    shape: str, cx: float, cy: float, radius: float, angle: float, x0: int, y0: int, w: int, h: int
) -> np.ndarray:
    """Anti-aliased coverage (h, w) float32 in [0, 1] of one object on the pixel box at (x0, y0)."""
    ss = _SUPERSAMPLE
    canvas = Image.new("L", (w * ss, h * ss), 0)
    draw = ImageDraw.Draw(canvas)
    # Supersampled pixel j covers [j, j+1); its centre j + 0.5 maps to (j + 0.5) / ss in image coords.
    px, py = (cx - x0) * ss - 0.5, (cy - y0) * ss - 0.5
    r = radius * ss
    if shape == "circle":
        draw.ellipse((px - r, py - r, px + r, py + r), fill=255)
    else:
        c, s = math.cos(angle), math.sin(angle)
        pts = _unit_polygon(shape) @ np.array([[c, s], [-s, c]]) * r + (px, py)
        draw.polygon([tuple(p) for p in pts.tolist()], fill=255)
    return np.asarray(canvas.reduce(ss), dtype=np.float32) * (1.0 / 255.0)


def render(scene: Scene, image_size: int = 64, rng: np.random.Generator | None = None) -> np.ndarray:
    """The scene as an (image_size, image_size, 3) uint8 RGB image.

    `rng` drives the background noise and the small jitter of position, size, rotation and shade;
    None means a fixed generator, so the same scene always renders the same."""
    if image_size < 24:
        raise ValueError(f"image_size must be >= 24 for recognisable shapes, got {image_size}")
    rng = np.random.default_rng(0) if rng is None else rng
    S = image_size
    cell = S / 3.0
    # Background: a dark level per image (grey, faintly tinted) plus per-pixel grey grain in 0..31 from
    # one call for raw bytes. Grain shared by the channels keeps PNGs about half the size of colour noise.
    base = (int(rng.integers(6, 26)) + rng.integers(0, 5, size=3)).astype(np.uint8)
    grain = np.frombuffer(rng.bytes(S * S), dtype=np.uint8).reshape(S, S, 1) >> 3
    img = grain + base  # (S, S, 3) uint8, at most 61: no overflow
    for obj in scene.objects:
        row, col = divmod(POSITIONS.index(obj.position), 3)
        u = rng.random(8)  # size, x, y, rotation, shade, 3 × tint: one call per object
        radius = _SIZE_FRACTION[obj.size] * (0.95 + 0.1 * u[0]) * cell / 2.0
        # Shapes reach ±1.05 radius on each axis: keep them, plus a margin, inside the cell.
        slack = max(0.0, (cell / 2.0 - 1.05 * radius) - 0.05 * cell) * 0.8
        cx = (col + 0.5) * cell + (2.0 * u[1] - 1.0) * slack
        cy = (row + 0.5) * cell + (2.0 * u[2] - 1.0) * slack
        angle = math.radians((2.0 * u[3] - 1.0) * _MAX_ROTATION_DEG)
        shade = 0.85 + 0.15 * u[4]
        colour = np.asarray(COLOUR_RGB[obj.colour], dtype=np.float32) * shade + np.floor(u[5:] * 21.0) - 10.0
        np.clip(colour, 0.0, 255.0, out=colour)
        x0, y0 = max(0, int(cx - radius) - 2), max(0, int(cy - radius) - 2)
        x1, y1 = min(S, int(math.ceil(cx + radius)) + 2), min(S, int(math.ceil(cy + radius)) + 2)
        alpha = object_mask(obj.shape, cx, cy, radius, angle, x0, y0, x1 - x0, y1 - y0)[..., None]  # (h, w, 1)
        region = img[y0:y1, x0:x1].astype(np.float32)
        region += (colour - region) * alpha  # alpha blend
        region += 0.5
        img[y0:y1, x0:x1] = region.astype(np.uint8)
    return img


# ---------------------------------------------------------------- text


def position_phrase(position: str) -> str:
    """How captions say a grid cell: "top left" -> "in the top left"."""
    return _POSITION_PHRASES[position]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(obj: ShapeObject, with_size: bool, with_position: bool, determiner: str = "a") -> str:
    words = ([obj.size] if with_size else []) + [obj.colour, obj.shape]
    phrase = " ".join(words)
    det = _article(phrase) if determiner == "a" else determiner
    phrase = f"{det} {phrase}" if det else phrase
    return f"{phrase} {_POSITION_PHRASES[obj.position]}" if with_position else phrase


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def describe(scene: Scene) -> str:
    """The full canonical description (every attribute of every object): the answer to "Describe the image.".

    Objects are listed in reading order (top left to bottom right), so the answer follows from the image alone."""
    ordered = sorted(scene.objects, key=lambda o: POSITIONS.index(o.position))
    parts = [_noun_phrase(o, True, True) for o in ordered]
    if len(parts) == 1:
        return parts[0] + "."
    return f"{_NUMBER_WORDS[len(parts)]} objects: {_join(parts)}."


_SINGLE_FRAMES = (
    ("a", "{}"), ("a", "a photo of {}"), ("a", "there is {}"), ("a", "an image of {}"),
    ("a", "a picture showing {}"), ("a", "{} on a dark background"), ("a", "a small image of {}"),
    ("the", "a photo of the {}"), ("the", "the {}"), ("the", "a picture of the {}"),
)
_MULTI_FRAMES = (
    "{}", "{n} objects: {}", "a photo of {}", "there are {n} objects: {}", "an image with {}",
    "a picture showing {}", "{n} shapes on a dark background: {}",
)


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """A caption in a varied template. Single objects: colour and shape always, size and position often."""
    objs = scene.objects
    if not objs:
        return "an empty dark image."
    if len(objs) == 1:
        det, frame = _SINGLE_FRAMES[int(rng.integers(len(_SINGLE_FRAMES)))]
        with_size, with_pos = rng.random(2) < (0.7, 0.7)
        phrase = _noun_phrase(objs[0], bool(with_size), bool(with_pos), determiner="" if det == "the" else "a")
        text = frame.format(phrase)
    else:
        frame = _MULTI_FRAMES[int(rng.integers(len(_MULTI_FRAMES)))]
        flags = rng.random((len(objs), 2)) < (0.6, 0.85)
        phrases = [_noun_phrase(o, bool(s), bool(p)) for o, (s, p) in zip(objs, flags)]
        text = frame.format(_join(phrases), n=_NUMBER_WORDS[len(objs)])
    return text + "." if rng.random() < 0.6 else text


_QUESTIONS = {
    "colour": ("What colour is the {shape}?", "What color is the {shape}?", "Which colour is the {shape}?"),
    "shape": ("What shape is the {colour} object?", "What is the shape of the {colour} object?",
              "Which shape is {colour}?"),
    "size": ("Is the {colour} {shape} small or large?", "What size is the {colour} {shape}?"),
    "count": ("How many objects are there?", "How many shapes are in the image?",
              "How many objects are in the picture?"),
    "position": ("Where is the {colour} {shape}?", "In which part of the image is the {colour} {shape}?"),
    "existence": ("Is there {a} {colour} {shape}?", "Is there {a} {colour} {shape} in the image?",
                  "Does the image contain {a} {colour} {shape}?"),
    "describe": ("Describe the image.", "Describe the image briefly.", "What is in the image?", "What do you see?"),
}


def _negative_pair(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """A (colour, shape) absent from the scene; half the time it shares the colour or shape of an object.

    Scenes without held-out pairs (train/val) never name a held-out pair, even as a negative."""
    present = {(o.colour, o.shape) for o in scene.objects}
    pool = ALL_PAIRS if any(p in HELD_OUT_PAIRS for p in present) else SEEN_PAIRS
    absent = [p for p in pool if p not in present]
    if rng.random() < 0.5:
        colours, shapes = {c for c, _ in present}, {s for _, s in present}
        hard = [p for p in absent if p[0] in colours or p[1] in shapes]
        absent = hard or absent
    return absent[int(rng.integers(len(absent)))]


def _question(scene: Scene, qtype: str, rng: np.random.Generator) -> tuple[str, str]:
    templates = _QUESTIONS[qtype]
    template = templates[int(rng.integers(len(templates)))]
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    if qtype == "colour":
        return template.format(shape=obj.shape), obj.colour
    if qtype == "shape":
        return template.format(colour=obj.colour), obj.shape
    if qtype == "size":
        return template.format(colour=obj.colour, shape=obj.shape), obj.size
    if qtype == "count":
        return template, str(len(scene.objects))
    if qtype == "position":
        return template.format(colour=obj.colour, shape=obj.shape), obj.position
    if qtype == "existence":
        if rng.random() < 0.5:
            colour, shape, answer = obj.colour, obj.shape, "yes"
        else:
            (colour, shape), answer = _negative_pair(scene, rng), "no"
        return template.format(a=_article(colour), colour=colour, shape=shape), answer
    if qtype == "describe":
        return template, describe(scene)
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")


def vqa_triples(
    scene: Scene, rng: np.random.Generator, n: int | None = None, qtypes: Sequence[str] = QUESTION_TYPES
) -> list[tuple[str, str, str]]:
    """(question, answer, qtype) triples with short exact-match answers.

    n=None asks one question of each type in `qtypes`, in order; otherwise n types are drawn (without
    replacement while they last). Answers: a colour, a shape, "small"/"large", a digit ("2"), a
    position ("top left"), "yes"/"no" (balanced), or the canonical description for "describe"."""
    if not scene.objects:
        raise ValueError("cannot ask questions about an empty scene")
    qtypes = list(qtypes)
    if n is None:
        chosen = qtypes
    else:
        chosen = []
        while len(chosen) < n:
            k = min(n - len(chosen), len(qtypes))
            chosen += [qtypes[int(j)] for j in rng.permutation(len(qtypes))[:k]]
    return [(*_question(scene, t, rng), t) for t in chosen]


def conversations(
    scene: Scene, rng: np.random.Generator, n_questions: int = 3, qtypes: Sequence[str] = QUESTION_TYPES
) -> list[dict[str, str]]:
    """LLaVA-format turns [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}, ...]."""
    return _turns(vqa_triples(scene, rng, n=n_questions, qtypes=qtypes))


def _turns(triples: Sequence[tuple[str, str, str]]) -> list[dict[str, str]]:
    turns: list[dict[str, str]] = []
    for k, (q, a, _) in enumerate(triples):
        turns.append({"from": "human", "value": "<image>\n" + q if k == 0 else q})
        turns.append({"from": "gpt", "value": a})
    return turns


# ---------------------------------------------------------------- dataset


class ShapesDataset(torch.utils.data.Dataset):
    """`size` items of a split, each generated on demand from (seed, split, index) alone.

    Item: dict(image=(H, W, 3) uint8, caption=str, label=class index of the first object,
    scene=Scene, conversations=LLaVA turns, question_types=one qtype per question)."""

    def __init__(
        self,
        split: str = "train",
        size: int = 10000,
        seed: int = 0,
        image_size: int = 64,
        single: bool = False,
        max_objects: int = 3,
        n_questions: int = 3,
    ) -> None:
        _split_index(split)
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        self.split, self.size, self.seed = split, int(size), int(seed)
        self.image_size, self.single = int(image_size), bool(single)
        self.max_objects, self.n_questions = int(max_objects), int(n_questions)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = int(index)
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(f"index {index} out of range for ShapesDataset of size {self.size}")
        rng = item_rng(self.seed, self.split, i, self.single)
        scene = sample_scene(rng, self.split, self.max_objects, self.single)
        image = render(scene, self.image_size, rng)
        text = caption(scene, rng)
        triples = vqa_triples(scene, rng, n=self.n_questions)
        first = scene.objects[0]
        return dict(image=image, caption=text, label=class_index(first.colour, first.shape), scene=scene,
                    conversations=_turns(triples), question_types=[t for _, _, t in triples])

    def __repr__(self) -> str:
        return (f"ShapesDataset(split={self.split!r}, size={self.size}, seed={self.seed}, "
                f"image_size={self.image_size}, single={self.single})")


# ---------------------------------------------------------------- writing to disk


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _csv_bytes(header: Sequence[str], rows: list[Sequence[str]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode()


def _write_image_dir(out: Path, name: str, items: Any) -> list[str]:
    """PNGs of `items` into images/<name>/NNNNNN.png via a temp dir renamed at the end; returns relative paths."""
    final, tmp = out / "images" / name, out / "images" / f".{name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rel = []
    for i, item in items:
        (tmp / f"{i:06d}.png").write_bytes(_png_bytes(item["image"]))
        rel.append(f"images/{name}/{i:06d}.png")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return rel


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: identical bytes on rerun
    tar.addfile(info, io.BytesIO(data))


def _write_shards(out: Path, split: str, ds: ShapesDataset, shard_size: int) -> list[str]:
    for old in out.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
        old.unlink()
    names = []
    for k, start in enumerate(range(0, len(ds), shard_size)):
        final = out / f"{split}-{k:06d}.tar"
        tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(start, min(start + shard_size, len(ds))):
                item = ds[i]
                _add_member(tar, f"{i:06d}.png", _png_bytes(item["image"]))
                _add_member(tar, f"{i:06d}.txt", item["caption"].encode())
                _add_member(tar, f"{i:06d}.json", json.dumps(item["conversations"]).encode())
        os.replace(tmp, final)
        names.append(final.name)
    return names


def _clear_split(out: Path, split: str, keep: set[str]) -> None:
    """Remove the outputs of `split` left by an earlier run, except those named in `keep`."""
    for name in (split, f"{split}_zeroshot"):
        if f"images/{name}" not in keep:
            shutil.rmtree(out / "images" / name, ignore_errors=True)
    for name in (f"{split}.csv", f"{split}_vqa.json", f"{split}_zeroshot.csv"):
        if name not in keep:
            (out / name).unlink(missing_ok=True)
    if "shards" not in keep:
        for old in out.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
            old.unlink()


def write_shapes(
    out_dir: str | os.PathLike,
    train: int = 10000,
    val: int = 1000,
    novel: int = 1000,
    seed: int = 0,
    image_size: int = 64,
    fmt: str = "files",
    single_eval: bool = True,
    shard_size: int = 1000,
    n_questions: int = 3,
) -> dict[str, Any]:
    """Write the shapes dataset under `out_dir` and return a summary dict.

    fmt="files", per split: images/<split>/NNNNNN.png, <split>.csv (image,caption; paths relative to
    the CSV) and <split>_vqa.json (LLaVA list of {id, image, conversations}).
    fmt="tar", per split: webdataset shards <split>-NNNNNN.tar of `shard_size` samples, members
    NNNNNN.png, NNNNNN.txt (caption) and NNNNNN.json (the conversations).
    Both: classes.json (class names, held-out pairs, templates) and, if `single_eval`, for val and
    novel a single-object zero-shot set images/<split>_zeroshot/ + <split>_zeroshot.csv (image,label
    with the class name). shapes.json records the arguments; a rerun with the same arguments and
    files in place returns at once. Every file is written to a temp name and renamed."""
    if fmt not in ("files", "tar"):
        raise ValueError(f"fmt must be 'files' or 'tar', got {fmt!r}")
    counts = {"train": int(train), "val": int(val), "novel": int(novel)}
    if any(n < 0 for n in counts.values()):
        raise ValueError(f"split sizes must be >= 0, got {counts}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = dict(counts=counts, seed=int(seed), image_size=int(image_size), format=fmt,
                  single_eval=bool(single_eval), shard_size=int(shard_size), n_questions=int(n_questions))
    manifest = out / "shapes.json"
    if manifest.exists():
        try:
            previous = json.loads(manifest.read_text())
        except (OSError, ValueError):
            previous = None
        if previous and previous.get("params") == params and all((out / f).exists() for f in previous["files"]):
            return previous
    manifest.unlink(missing_ok=True)  # the manifest is written last: its presence means "complete"

    files: list[str] = []
    classes = dict(classes=list(CLASS_NAMES), held_out_pairs=[list(p) for p in HELD_OUT_PAIRS],
                   held_out_classes=[f"{c} {s}" for c, s in HELD_OUT_PAIRS], templates=list(TEMPLATES),
                   shapes=list(SHAPES), colours=list(COLOURS), sizes=list(SIZES), positions=list(POSITIONS))
    _write_atomic(out / "classes.json", json.dumps(classes, indent=1).encode())
    files.append("classes.json")
    zeroshot_counts: dict[str, int] = {}
    for split, n in counts.items():
        ds = ShapesDataset(split, n, seed, image_size, n_questions=n_questions)
        with_zeroshot = single_eval and split != "train" and n > 0
        keep: set[str] = set()
        if n:
            keep = {"shards"} if fmt == "tar" else {f"images/{split}", f"{split}.csv", f"{split}_vqa.json"}
        if with_zeroshot:
            keep |= {f"images/{split}_zeroshot", f"{split}_zeroshot.csv"}
        _clear_split(out, split, keep)
        if fmt == "tar":
            if n:
                files += _write_shards(out, split, ds, shard_size)
        elif n:
            items = [(i, ds[i]) for i in range(n)]
            rel = _write_image_dir(out, split, items)
            rows = [(r, it["caption"]) for r, (_, it) in zip(rel, items)]
            _write_atomic(out / f"{split}.csv", _csv_bytes(("image", "caption"), rows))
            vqa = [dict(id=f"{split}-{i:06d}", image=r, conversations=it["conversations"],
                        question_types=it["question_types"])
                   for r, (i, it) in zip(rel, items)]
            _write_atomic(out / f"{split}_vqa.json", json.dumps(vqa, indent=1).encode())
            files += [f"images/{split}", f"{split}.csv", f"{split}_vqa.json"]
        if with_zeroshot:
            zs = ShapesDataset(split, n, seed, image_size, single=True, n_questions=n_questions)
            items = [(i, zs[i]) for i in range(n)]
            rel = _write_image_dir(out, f"{split}_zeroshot", items)
            rows = [(r, CLASS_NAMES[it["label"]]) for r, (_, it) in zip(rel, items)]
            _write_atomic(out / f"{split}_zeroshot.csv", _csv_bytes(("image", "label"), rows))
            files += [f"images/{split}_zeroshot", f"{split}_zeroshot.csv"]
            zeroshot_counts[split] = n
    summary = dict(out_dir=str(out), params=params, counts=counts, zeroshot=zeroshot_counts,
                   held_out_pairs=[list(p) for p in HELD_OUT_PAIRS], files=files)
    _write_atomic(manifest, json.dumps(summary, indent=1).encode())
    return summary
