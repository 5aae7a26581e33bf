"""The embedded video and audio datasets: real files, captions that name the class, held-out pairs and voices."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from mmlm.cli import main
from mmlm.data.fbank import kaldi_fbank
from mmlm.data.media import read_audio, read_video
from mmlm.data.media_sets import (ACTIONS, HELD_OUT_ACTIONS, HELD_OUT_VOICES, SOUNDS, moving_shape_item,
                                  render_action, render_sound, write_media_dataset)
from mmlm.data.shapes import SHAPES


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_moving_shapes_files_captions_and_held_out_pairs(tmp_path):
    write_media_dataset("moving-shapes", tmp_path, train=24, val=4, novel=6, image_size=32, frames=8)
    train, novel = _rows(tmp_path / "train.csv"), _rows(tmp_path / "novel.csv")
    held = set(HELD_OUT_ACTIONS)
    assert all((r["shape"], r["class"]) not in held for r in train)
    assert all((r["shape"], r["class"]) in held for r in novel)
    for r in train[:3] + novel[:2]:
        assert r["class"] in r["caption"]
        assert "something" in r["caption"] or (r["shape"] in r["caption"] and r["colour"] in r["caption"])
        assert ACTIONS[int(r["label"])] == r["class"]
        assert read_video(tmp_path / r["video"], frames=8).shape == (8, 32, 32, 3)
    assert json.loads((tmp_path / "classes.json").read_text())["classes"] == list(ACTIONS)
    assert any(r["caption"].startswith(("something", "a video of something")) for r in train)  # as prompted
    # every action and every shape is still seen in training (only the pairs are held out)
    assert len({a for _, a in held}) == len(held)  # each action held out with one shape at most
    assert {s for s, _ in held} == set(SHAPES)


def test_actions_differ_in_the_way_they_say():
    rng = lambda: np.random.default_rng(0)  # noqa: E731  (the same object, the same background each time)
    left = render_action("square", "red", "moving left", rng(), 8, 32).astype(float)
    right = render_action("square", "red", "moving right", rng(), 8, 32).astype(float)
    np.testing.assert_allclose(left, right[::-1], atol=1)  # moving left is moving right played backwards
    assert np.abs(left.mean(0) - right.mean(0)).max() < 1  # ... so its frame average is the same
    blink = render_action("star", "blue", "blinking", rng(), 8, 32)
    assert blink[1].max() < 60 < blink[0].max()  # off on odd frames
    assert moving_shape_item("train", 3)["video"].shape == (8, 64, 64, 3)


def test_sounds_are_what_they_say():
    g = np.random.default_rng(0)
    spec = {k: kaldi_fbank(render_sound(k, g), num_mel_bins=64).numpy() for k in SOUNDS}
    low, high = spec["a low tone"].mean(0).argmax(), spec["a high tone"].mean(0).argmax()
    assert low < high
    up, down = spec["a rising chirp"].argmax(1), spec["a falling chirp"].argmax(1)
    assert up[-10] > up[10] and down[-10] < down[10]
    for n, kind in ((2, "two beeps"), (3, "three beeps"), (4, "four beeps")):
        loud = spec[kind].max(1) > spec[kind].max() - 4
        assert int(np.sum(np.diff(loud.astype(int)) == 1) + loud[0]) == n, kind


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_spoken_digits_with_held_out_voices_via_the_cli(tmp_path):
    assert main(["data", "spoken", "--out", str(tmp_path), "--train", "6", "--val", "1", "--novel", "3"]) == 0
    train, novel = _rows(tmp_path / "train.csv"), _rows(tmp_path / "novel.csv")
    assert all(r["voice"] not in HELD_OUT_VOICES for r in train)
    assert all(r["voice"] in HELD_OUT_VOICES for r in novel)
    for r in train[:2]:
        assert f'"{r["class"]}"' in r["caption"]
        wave = read_audio(tmp_path / r["audio"])
        assert wave.shape == (16_000,) and np.abs(wave).max() > 0.3
