"""The embedded shapes dataset: determinism, held-out pairs, geometry, text, VQA and files on disk."""

from __future__ import annotations

import csv
import io
import json
import math
import pickle
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from mmlm.data import shapes as S


def _train_scenes(n: int = 2000, split: str = "train") -> list[S.Scene]:
    return [S.sample_scene(S.item_rng(0, split, i), split) for i in range(n)]


def test_constants():
    assert len(S.CLASS_NAMES) == 64 == len(set(S.CLASS_NAMES))
    assert S.CLASS_NAMES[S.class_index("orange", "star")] == "orange star"
    assert len(S.HELD_OUT_PAIRS) == 12 == len(set(S.HELD_OUT_PAIRS))
    colours = Counter(c for c, _ in S.HELD_OUT_PAIRS)
    shapes = Counter(s for _, s in S.HELD_OUT_PAIRS)
    assert set(colours) <= set(S.COLOURS) and max(colours.values()) <= 2
    assert set(shapes) <= set(S.SHAPES) and max(shapes.values()) <= 2


def test_determinism():
    a, b = S.ShapesDataset("train", 10, seed=3), S.ShapesDataset("train", 10, seed=3)
    for i in (0, 7):
        x, y = a[i], b[i]
        assert x["image"].tobytes() == y["image"].tobytes()
        assert (x["caption"], x["label"], x["conversations"]) == (y["caption"], y["label"], y["conversations"])
    assert a[0]["image"].tobytes() != a[1]["image"].tobytes()
    assert a[0]["image"].tobytes() != S.ShapesDataset("train", 10, seed=4)[0]["image"].tobytes()
    assert a[0]["image"].tobytes() != S.ShapesDataset("val", 10, seed=3)[0]["image"].tobytes()
    # Item i depends on (seed, split, i) only: reading in another order changes nothing.
    assert a[7]["image"].tobytes() == S.ShapesDataset("train", 10, seed=3)[7]["image"].tobytes()
    assert a[-1]["caption"] == a[9]["caption"]
    with pytest.raises(IndexError):
        a[10]


def test_held_out_pairs_never_in_train_and_everything_else_is():
    seen_pairs, colours, shapes = set(), set(), set()
    for split in ("train", "val"):
        for scene in _train_scenes(2000 if split == "train" else 300, split):
            for o in scene.objects:
                seen_pairs.add((o.colour, o.shape))
                colours.add(o.colour)
                shapes.add(o.shape)
    assert not seen_pairs & set(S.HELD_OUT_PAIRS)
    assert colours == set(S.COLOURS) and shapes == set(S.SHAPES)
    assert seen_pairs == set(S.SEEN_PAIRS)  # all 52 seen pairs do occur


def test_novel_split_uses_held_out_pairs():
    for i in range(300):
        scene = S.sample_scene(S.item_rng(0, "novel", i), "novel")
        assert (scene.objects[0].colour, scene.objects[0].shape) in S.HELD_OUT_PAIRS
    single = S.ShapesDataset("novel", 200, single=True)
    labels = {single[i]["label"] for i in range(200)}
    assert {S.CLASS_NAMES[k] for k in labels} == {f"{c} {s}" for c, s in S.HELD_OUT_PAIRS}
    assert all(len(single[i]["scene"].objects) == 1 for i in range(20))


def test_objects_in_distinct_cells_with_distinct_attributes():
    counts = Counter()
    for scene in _train_scenes(2000):
        objs = scene.objects
        counts[len(objs)] += 1
        assert 1 <= len(objs) <= 3
        for attr in ("position", "colour", "shape"):
            assert len({getattr(o, attr) for o in objs}) == len(objs), attr
        assert all(o.size in S.SIZES and o.position in S.POSITIONS for o in objs)
    assert set(counts) == {1, 2, 3}


def _cell_box(position: str, image_size: int) -> tuple[slice, slice]:
    """The object's grid cell in whole pixels, cut inwards (fractional cell edges)."""
    row, col = divmod(S.POSITIONS.index(position), 3)
    c = image_size / 3
    return slice(math.ceil(row * c), math.floor((row + 1) * c)), slice(math.ceil(col * c), math.floor((col + 1) * c))


def test_render_colours_background_and_containment():
    rng = np.random.default_rng(0)
    for i in range(60):
        scene = S.sample_scene(S.item_rng(1, "train", i), "train")
        img = S.render(scene, 64, rng)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        background = np.ones((64, 64), dtype=bool)
        for o in scene.objects:
            rows, cols = _cell_box(o.position, 64)
            background[max(0, rows.start - 1) : rows.stop + 1, max(0, cols.start - 1) : cols.stop + 1] = False
            cell = img[rows, cols].astype(np.float32)
            target = np.array(S.COLOUR_RGB[o.colour], dtype=np.float32)
            # Enough pixels close to the object's colour for its size (a small star covers ≈ 50 pixels).
            close = np.abs(cell - target).max(-1) < 0.18 * 255 + 10
            assert close.sum() >= (20 if o.size == "small" else 50), (o, close.sum())
            # The colour is the nearest base colour of the cell's brightest region.
            bright = cell[cell.max(-1) > 120].mean(0)
            nearest = min(S.COLOURS, key=lambda c: np.abs(np.array(S.COLOUR_RGB[c]) - bright).sum())
            assert nearest == o.colour, (o, bright)
        assert img[background].max() <= 61  # dark background, untouched outside object cells
        assert img[background].mean() < 50


def test_render_sizes_and_default_rng():
    def area(size: str) -> int:
        img = S.render(S.Scene([S.ShapeObject("square", "white", size, "center")]), 64)
        return int((img.min(-1) > 150).sum())

    small, large = area("small"), area("large")
    assert 60 < small < 150 < large < 400 and large > 1.8 * small
    scene = S.Scene([S.ShapeObject("star", "red", "large", "top left")])
    assert S.render(scene).tobytes() == S.render(scene).tobytes()
    assert S.render(scene, 128).shape == (128, 128, 3)


def test_captions():
    for i in range(200):
        rng = S.item_rng(0, "train", i, single=True)
        scene = S.sample_scene(rng, "train", single=True)
        text = S.caption(scene, rng)
        o = scene.objects[0]
        assert f"{o.colour} {o.shape}" in text, text
    multi = [S.ShapesDataset("train", 200)[i] for i in range(0, 200, 5)]
    texts = {d["caption"] for d in multi}
    assert len(texts) == len(multi)  # varied
    assert not any(" a orange" in t or " a a" in t for t in texts)
    scene = S.Scene(
        [S.ShapeObject("square", "green", "large", "bottom"), S.ShapeObject("cross", "white", "small", "left")]
    )
    # reading order (top left to bottom right), whatever order the scene lists them in
    assert S.describe(scene) == "two objects: a small white cross on the left and a large green square at the bottom."
    assert S.describe(S.Scene(scene.objects[::-1])) == S.describe(scene)


def test_vqa_answers_match_scene():
    yes = no = 0
    for i in range(300):
        rng = S.item_rng(0, "train", i)
        scene = S.sample_scene(rng, "train")
        by_shape = {o.shape: o for o in scene.objects}
        by_colour = {o.colour: o for o in scene.objects}
        present = {(o.colour, o.shape) for o in scene.objects}
        for q, a, t in S.vqa_triples(scene, rng):
            words = q.rstrip("?.").split()
            if t == "colour":
                assert by_shape[words[-1]].colour == a
            elif t == "shape":
                colour = next(w for w in words if w in S.COLOURS)
                assert by_colour[colour].shape == a
            elif t == "count":
                assert a == str(len(scene.objects))
            elif t in ("position", "size"):
                o = next(o for o in scene.objects if f"{o.colour} {o.shape}" in q)
                assert a == (o.position if t == "position" else o.size)
            elif t == "existence":
                pair = next((c, s) for c, s in S.ALL_PAIRS if f" {c} {s}" in q)
                assert a == ("yes" if pair in present else "no")
                assert pair not in S.HELD_OUT_PAIRS  # train questions never name a held-out pair
                yes, no = yes + (a == "yes"), no + (a == "no")
            elif t == "describe":
                assert a == S.describe(scene)
    assert 0.4 < yes / (yes + no) < 0.6  # balanced negatives
    turns = S.conversations(scene, np.random.default_rng(0), n_questions=4)
    assert [t["from"] for t in turns] == ["human", "gpt"] * 4
    assert turns[0]["value"].startswith("<image>\n") and "<image>" not in "".join(t["value"] for t in turns[1:])


def test_dataset_item_and_pickle():
    ds = S.ShapesDataset("val", 5, seed=1, image_size=48)
    item = ds[2]
    assert item["image"].shape == (48, 48, 3) and item["image"].dtype == np.uint8
    first = item["scene"].objects[0]
    assert item["label"] == S.class_index(first.colour, first.shape)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone[2]["image"].tobytes() == item["image"].tobytes()


def test_write_shapes_files(tmp_path):
    out = tmp_path / "shapes"
    summary = S.write_shapes(out, train=6, val=4, novel=3, seed=0, image_size=32)
    assert summary["counts"] == {"train": 6, "val": 4, "novel": 3}
    with open(out / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and rows[0]["caption"] == S.ShapesDataset("train", 6, image_size=32)[0]["caption"]
    img = np.asarray(Image.open(out / rows[5]["image"]))
    assert img.tobytes() == S.ShapesDataset("train", 6, image_size=32)[5]["image"].tobytes()
    vqa = json.loads((out / "val_vqa.json").read_text())
    assert len(vqa) == 4 and (out / vqa[0]["image"]).is_file()
    assert vqa[0]["conversations"][0]["value"].startswith("<image>\n")
    with open(out / "novel_zeroshot.csv", newline="") as f:
        zs = list(csv.DictReader(f))
    held = {f"{c} {s}" for c, s in S.HELD_OUT_PAIRS}
    assert len(zs) == 3 and all(r["label"] in held and (out / r["image"]).is_file() for r in zs)
    classes = json.loads((out / "classes.json").read_text())
    assert classes["classes"] == list(S.CLASS_NAMES) and len(classes["held_out_pairs"]) == 12
    assert not list(out.rglob("*.tmp*"))
    # Idempotent: a rerun with the same arguments leaves every file as it was.
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert S.write_shapes(out, train=6, val=4, novel=3, seed=0, image_size=32) == summary
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # Fewer items: stale images go.
    S.write_shapes(out, train=2, val=0, novel=0, seed=0, image_size=32)
    assert len(list((out / "images" / "train").iterdir())) == 2
    assert not (out / "val.csv").exists() and not (out / "images" / "novel_zeroshot").exists()


def test_write_shapes_tar(tmp_path):
    summary = S.write_shapes(tmp_path, train=5, val=2, novel=0, image_size=32, fmt="tar", shard_size=2)
    shards = sorted(tmp_path.glob("train-*.tar"))
    assert [p.name for p in shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert "train-000000.tar" in summary["files"]
    ds = S.ShapesDataset("train", 5, image_size=32)
    with tarfile.open(shards[1]) as tar:
        names = tar.getnames()
        assert names == ["000002.png", "000002.txt", "000002.json", "000003.png", "000003.txt", "000003.json"]
        img = np.asarray(Image.open(io.BytesIO(tar.extractfile("000003.png").read())))
        text = tar.extractfile("000003.txt").read().decode()
        turns = json.loads(tar.extractfile("000003.json").read())
    assert img.tobytes() == ds[3]["image"].tobytes() and text == ds[3]["caption"]
    assert turns == ds[3]["conversations"]
    assert (tmp_path / "val_zeroshot.csv").is_file() and not (tmp_path / "train.csv").exists()


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        S.ShapesDataset("test")
    with pytest.raises(ValueError, match="fmt"):
        S.write_shapes("/nonexistent", fmt="zip")
