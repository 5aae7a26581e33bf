"""Video-text and audio-text CLIP through the one training loop (`mmlm train clip`): short smoke runs on the
embedded datasets' recipes, and a run over a CSV with broken files among good ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

import mmlm
from mmlm.cli import main
from mmlm.data.media import write_audio, write_video
from mmlm.models.audio import AudioCLIP
from mmlm.models.video import VideoCLIP
from mmlm.train.clip_run import train_clip
from mmlm.train.recipes import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "src" / "mmlm" / "recipes"
SMOKE = ["train.steps=2", "train.batch_size=4", "train.eval_every=2", "train.ckpt_every=2", "train.log_every=1",
         "train.precision=fp32", "train.num_workers=0", "data.train_size=8", "data.eval_size=4"]


def test_video_recipe_trains_and_evaluates(tmp_path, capsys):
    cfg = load_recipe("clip", RECIPES / "clip-video-shapes.yaml", SMOKE + [f"data.path={tmp_path / 'data'}"])
    summary = train_clip(cfg, tmp_path / "run")
    assert summary["step"] == 2
    assert {"moving_shapes_val", "moving_shapes_novel"} <= set(summary["eval"])
    model = mmlm.load(tmp_path / "run" / "final")
    assert isinstance(model, VideoCLIP)
    assert model.encode_video(torch.zeros(2, 8, 3, 32, 32)).shape == (2, 64)
    # `mmlm eval zeroshot` on the written CSV (classes.json beside it), with a broken file added: skipped, named
    table = tmp_path / "data" / "novel.csv"
    (tmp_path / "data" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100)
    table.write_text(table.read_text() + "broken.mp4,a broken clip,0,moving left,star,red\n")
    assert main(["eval", "zeroshot", "--model", str(tmp_path / "run" / "final"), "--data", str(table)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 4 and result["classes"] == 10 and 0 <= result["top1"] <= 1
    assert len(result["skipped"]) == 1 and "broken.mp4" in result["skipped"][0]["reason"]
    # `mmlm eval retrieval` on the same table with a second caption for the first clip: each file decoded once,
    # the broken one skipped, Recall@K equal to the metric on the model's own embeddings
    lines = table.read_text().splitlines()
    first = lines[1].split(",")
    table.write_text("\n".join(lines + [",".join([first[0], "another caption of the first clip", *first[2:]])]) + "\n")
    assert main(["eval", "retrieval", "--model", str(tmp_path / "run" / "final"), "--data", str(table)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["images"], result["texts"]) == (4, 5) and len(result["skipped"]) == 1
    from mmlm.data.media import CsvVideoText, normalize_videos
    from mmlm.eval.retrieval import retrieval_metrics
    from mmlm.formats import load_tokenizer

    ds = CsvVideoText(table, mmlm.formats.load_preprocess(tmp_path / "run" / "final"), frames=model.config.temporal.frames)
    from mmlm.data.transforms import ImageProcessor

    videos = normalize_videos(torch.from_numpy(np.stack([ds[i]["video"] for i in range(4)])),
                              ImageProcessor(ds.processor.config))
    tok = load_tokenizer(tmp_path / "run" / "final")
    captions = [ds.captions[i] for i in (0, 1, 2, 3, 5)]
    with torch.no_grad():
        want = retrieval_metrics(torch.nn.functional.normalize(model.encode_video(videos), dim=-1),
                                 torch.nn.functional.normalize(model.encode_text(
                                     tok(captions, context_length=model.config.text.context_length)), dim=-1),
                                 torch.tensor([0, 1, 2, 3, 0]))
    assert all(result[k] == want[k] for k in want)


def test_audio_recipe_trains_and_evaluates(tmp_path, capsys):
    cfg = load_recipe("clip", RECIPES / "clip-audio.yaml", SMOKE + [f"data.path={tmp_path / 'data'}"])
    summary = train_clip(cfg, tmp_path / "run")
    assert summary["step"] == 2 and "sounds_val" in summary["eval"]
    assert np.isfinite(summary["eval"]["sounds_val"]["top1"])
    model = mmlm.load(tmp_path / "run" / "final")
    assert isinstance(model, AudioCLIP) and model.encode_audio(torch.zeros(2, 100, 64)).shape == (2, 64)
    capsys.readouterr()
    assert main(["eval", "zeroshot", "--model", str(tmp_path / "run" / "final"),
                 "--data", str(tmp_path / "data" / "val.csv")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 4 and result["classes"] == 10 and not result["skipped"]
    assert main(["eval", "retrieval", "--model", str(tmp_path / "run" / "final"),
                 "--data", str(tmp_path / "data" / "val.csv")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["images"], result["texts"]) == (4, 4) and result["i2t_R@5"] == 1.0


def test_a_run_skips_and_names_broken_files(tmp_path, capsys):
    t = np.arange(16_000) / 16_000
    rows = []
    for i in range(12):
        write_audio(tmp_path / f"ok{i}.wav", 0.3 * np.sin(2 * np.pi * 200 * (1 + i % 4) * t))
        rows.append(f"ok{i}.wav,tone number {i % 4}")
    (tmp_path / "cut.wav").write_bytes((tmp_path / "ok0.wav").read_bytes()[:30])
    (tmp_path / "readme.wav").write_text("not audio at all\n")
    rows[3:3] = ["cut.wav,a truncated file", "readme.wav,a text file"]
    (tmp_path / "pairs.csv").write_text("audio,caption\n" + "\n".join(rows) + "\n")
    cfg = load_recipe("clip", RECIPES / "clip-audio.yaml",
                      ["train.steps=3", "train.batch_size=7", "train.eval_every=0", "train.ckpt_every=3",
                       "train.precision=fp32", "train.num_workers=0", "train.max_bad_sample_fraction=0.5",
                       "data.kind=audio_csv", f"data.path={tmp_path / 'pairs.csv'}"])
    summary = train_clip(cfg, tmp_path / "run")
    assert summary["step"] == 3 and summary["bad_samples"] >= 2
    printed = capsys.readouterr().out  # the loop names each skipped sample: the table's line, the file, the reason
    assert "pairs.csv:5: " in printed and "cut.wav: cannot decode audio" in printed
    assert "pairs.csv:6: " in printed and "readme.wav: cannot decode audio" in printed


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_tar_shards_of_videos_and_audio_train_and_name_bad_members(tmp_path, capsys):
    """webdataset-style shards (KEY.mp4 / KEY.wav + KEY.txt), as for images: read by seeking, the same items as
    the CSV readers, a broken or captionless member a bad sample named shard:key."""
    from mmlm.data.fbank import FbankConfig
    from mmlm.data.media import TarMediaText, audio_features, read_audio, read_video, video_pixels
    from mmlm.data.media_sets import moving_shape_item, sound_item
    from mmlm.data.transforms import ImageProcessor, PreprocessConfig

    clips, sounds = {}, {}
    for i in range(4):
        item = moving_shape_item("train", i, frames=8, size=32)
        write_video(tmp_path / f"v{i}.mp4", item["video"])
        clips[f"c{i}.mp4"], clips[f"c{i}.txt"] = (tmp_path / f"v{i}.mp4").read_bytes(), item["caption"].encode()
        s = sound_item("train", i)
        write_audio(tmp_path / f"a{i}.wav", s["audio"])
        sounds[f"s{i}.wav"], sounds[f"s{i}.txt"] = (tmp_path / f"a{i}.wav").read_bytes(), s["caption"].encode()
    clips["broken.mp4"], clips["broken.txt"] = b"\x00" * 64, b"a broken clip"
    clips["nocaption.mp4"] = clips["c0.mp4"]
    _tar(tmp_path / "video-000.tar", dict(list(clips.items())[:4]))
    _tar(tmp_path / "video-001.tar", dict(list(clips.items())[4:]))
    _tar(tmp_path / "audio-000.tar", sounds)

    pre = PreprocessConfig(image_size=32)
    videos = TarMediaText(str(tmp_path / "video-*.tar"), "video", pre, frames=8)
    assert len(videos) == 6
    got = {x["caption"]: x["video"] for x in (videos[i] for i in range(6)) if "bad" not in x}
    assert len(got) == 4
    want = video_pixels(read_video(tmp_path / "v1.mp4", 8), ImageProcessor(pre))
    assert np.array_equal(got[clips["c1.txt"].decode()], want)
    bad = [videos[i]["bad"] for i in range(6) if "bad" in videos[i]]
    assert {b[0].rsplit(":", 1)[1] for b in bad} == {"broken", "nocaption"}
    assert any("missing caption" in b[1] for b in bad) and any("cannot decode video" in b[1] for b in bad)
    audio = TarMediaText(str(tmp_path / "audio-*.tar"), "audio", features=FbankConfig(num_mel_bins=64, max_length=100))
    first = audio[0]
    assert np.allclose(first["audio"], audio_features(read_audio(tmp_path / "a0.wav"), audio.features))

    cfg = load_recipe("clip", RECIPES / "clip-video-shapes.yaml",
                      ["train.steps=2", "train.batch_size=3", "train.eval_every=0", "train.ckpt_every=2",
                       "train.precision=fp32", "train.num_workers=0", "train.max_bad_sample_fraction=0.5",
                       "data.kind=video_tar", f"data.path={tmp_path / 'video-*.tar'}"])
    summary = train_clip(cfg, tmp_path / "run")
    assert summary["step"] == 2 and summary["bad_samples"] >= 1
    cfg = load_recipe("clip", RECIPES / "clip-audio.yaml",
                      ["train.steps=2", "train.batch_size=2", "train.eval_every=0", "train.ckpt_every=2",
                       "train.precision=fp32", "train.num_workers=0", "data.kind=audio_tar",
                       f"data.path={tmp_path / 'audio-*.tar'}"])
    assert train_clip(cfg, tmp_path / "run-audio")["step"] == 2
