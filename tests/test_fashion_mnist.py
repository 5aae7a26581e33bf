"""Fashion-MNIST reader: the real Debian files, the idx format checks, and the error messages."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest

from mmlm.data import fashion_mnist as F

HAVE_PACKAGE = all((Path(F.DEFAULT_ROOT) / n).is_file() for pair in F.FILES.values() for n in pair)
needs_package = pytest.mark.skipif(
    not HAVE_PACKAGE, reason=f"Fashion-MNIST not installed in {F.DEFAULT_ROOT} (`{F.INSTALL_HINT}`)"
)


def _write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def _fake_root(root: Path, n: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (n, 28, 28)), np.arange(n) % 10
    for split in F.SPLITS:
        image_file, label_file = F.FILES[split]
        _write_idx(root / image_file, 2051, images)
        _write_idx(root / label_file, 2049, labels)
    return images.astype(np.uint8), labels


@needs_package
def test_real_files(monkeypatch):
    monkeypatch.delenv(F.ENV_VAR, raising=False)
    for split, n in (("train", 60000), ("test", 10000)):
        images, labels = F.load_fashion_mnist(split)
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int64
        assert np.bincount(labels).tolist() == [n // 10] * 10  # balanced classes, labels 0..9
        assert 50 < images.mean() < 100 and images.max() == 255
    assert F.load_fashion_mnist("test")[0] is F.load_fashion_mnist("test")[0]  # cached
    ds = F.FashionMNISTDataset("test", seed=0)
    item = ds[3]
    assert len(ds) == 10000
    assert item["image"].shape == (28, 28, 3) and item["image"].dtype == np.uint8
    assert (item["image"][..., 0] == F.load_fashion_mnist("test")[0][3]).all()
    assert F.CLASS_NAMES[item["label"]] in item["caption"]


def test_reader_and_dataset_on_fake_files(tmp_path, monkeypatch):
    images, labels = _fake_root(tmp_path)
    got_images, got_labels = F.load_fashion_mnist("train", root=tmp_path)
    assert (got_images == images).all() and (got_labels == labels).all() and got_labels.dtype == np.int64
    monkeypatch.setenv(F.ENV_VAR, str(tmp_path))
    ds = F.FashionMNISTDataset("test", seed=1)
    assert len(ds) == 5 and ds.root == tmp_path.resolve()
    captions = [ds[i]["caption"] for i in range(5)]
    assert captions == [F.FashionMNISTDataset("test", seed=1)[i]["caption"] for i in range(5)]  # deterministic
    assert all(F.CLASS_NAMES[labels[i]] in c for i, c in enumerate(captions))
    clone = pickle.loads(pickle.dumps(ds))
    assert clone[4]["caption"] == ds[4]["caption"] and (clone[4]["image"] == ds[4]["image"]).all()
    assert (ds[-1]["image"] == images[4][..., None]).all()
    with pytest.raises(IndexError):
        ds[5]


def test_missing_files_name_the_install_command(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as err:
        F.load_fashion_mnist("train", root=tmp_path)
    assert str(tmp_path / "train-images-idx3-ubyte.gz") in str(err.value)
    monkeypatch.setenv(F.ENV_VAR, str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        F.FashionMNISTDataset("test")


def test_corrupt_files_are_named(tmp_path):
    _fake_root(tmp_path)
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    _write_idx(bad, 2051, np.zeros(5))  # image magic on a label file
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz.*magic"):
        F.load_fashion_mnist("test", root=tmp_path)
    bad.write_bytes(gzip.compress((2049).to_bytes(4, "big") + (9).to_bytes(4, "big") + bytes(5)))  # truncated
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz.*shape \(9,\)"):
        F.load_fashion_mnist("test", root=tmp_path)
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz.*decompress"):
        F.load_fashion_mnist("test", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        F.load_fashion_mnist("val", root=tmp_path)
