"""Real video and audio files (PyAV, soundfile): reading, sampling, resampling, and bad files skipped and named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmlm.data.fbank import FbankConfig
from mmlm.data.media import (BadMediaError, CsvAudioText, CsvVideoText, MediaTextCollate, read_audio, read_video,
                             resample, sample_indices, write_audio, write_video)
from mmlm.data.transforms import PreprocessConfig


def _moving_square(T: int = 12, size: int = 32) -> np.ndarray:
    """A white square moving right by 2 px a frame on black: where it is tells which frame was read."""
    frames = np.zeros((T, size, size, 3), np.uint8)
    for t in range(T):
        frames[t, 10:20, 2 * t : 2 * t + 6] = 255
    return frames


def _left_edge(frames: np.ndarray) -> list[int]:
    return [int(np.argmax(f[15, :, 0] > 128)) for f in frames]


@pytest.mark.parametrize("ext", [".mp4", ".avi"])
def test_video_files_and_frame_sampling(tmp_path, ext):
    path = write_video(tmp_path / f"clip{ext}", _moving_square(), fps=8)
    uniform = read_video(path, frames=4)  # the centres of 4 segments of 12 frames: 1, 4, 7, 10
    assert uniform.shape == (4, 32, 32, 3) and uniform.dtype == np.uint8
    assert _left_edge(uniform) == [2, 8, 14, 20]
    at_4fps = read_video(path, frames=3, fps=4)  # every other frame of an 8 fps clip: 0, 2, 4
    assert _left_edge(at_4fps) == [0, 4, 8]
    assert _left_edge(read_video(path, frames=20, fps=8))[-1] == 22  # past the end: the last frame repeats


def test_frame_folder(tmp_path):
    for t, f in enumerate(_moving_square(6)):
        Image.fromarray(f).save(tmp_path / f"{t:04d}.png")
    assert _left_edge(read_video(tmp_path, frames=3)) == [2, 6, 10]
    assert list(sample_indices(2, 4)) == [0, 0, 1, 1]


@pytest.mark.parametrize("ext", [".wav", ".flac", ".ogg"])
def test_audio_files_resampled_to_the_model_rate(tmp_path, ext):
    t = np.arange(22_050) / 22_050
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 440 * t)], axis=1) * 0.5
    import soundfile as sf

    sf.write(tmp_path / f"a{ext}", stereo, 22_050, subtype="VORBIS" if ext == ".ogg" else "PCM_16")
    wave = read_audio(tmp_path / f"a{ext}", 16_000)
    assert wave.shape == (16_000,) and wave.dtype == np.float32
    assert np.abs(np.fft.rfft(wave)).argmax() == 440  # 1 s at 16 kHz: bin k is k Hz
    assert abs(float(np.abs(wave[1000:-1000]).max()) - 0.5) < 0.02
    np.testing.assert_allclose(resample(wave, 16_000, 16_000), wave)


def _table(tmp_path, kind: str, good: list[str], bad: dict[str, bytes]) -> tuple:
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    names = good[:1] + list(bad) + good[1:]
    rows = [f"{n},caption {i},{i}" for i, n in enumerate(names)]
    (tmp_path / "pairs.csv").write_text(f"{kind},caption,label\n" + "\n".join(rows) + "\n")
    return tmp_path / "pairs.csv", names


class _Tok:
    eot_id = 2

    def __call__(self, texts, context_length):
        ids = torch.zeros(len(texts), context_length, dtype=torch.long)
        ids[:, 0], ids[:, 3] = 1, 2
        return ids


def test_bad_videos_are_skipped_and_named(tmp_path):
    good = [write_video(tmp_path / f"ok{i}.mp4", _moving_square(8)).name for i in range(2)]
    real = (tmp_path / good[0]).read_bytes()
    bad = {"broken.mp4": real[: len(real) // 3][:64] + b"\x00" * 200, "notes.mp4": b"this is not a video\n" * 10}
    csv, names = _table(tmp_path, "video", good, bad)
    ds = CsvVideoText(csv, PreprocessConfig(image_size=16), frames=4)
    items = [ds[i] for i in range(len(ds))]
    reasons = {names[i]: it["bad"] for i, it in enumerate(items) if "bad" in it}
    assert sorted(reasons) == ["broken.mp4", "notes.mp4"]
    for name, (source, reason) in reasons.items():
        assert name in reason and str(csv) in source
    assert items[0]["video"].shape == (4, 16, 16, 3)
    batch = MediaTextCollate(_Tok(), 8, PreprocessConfig(image_size=16))(items)
    assert batch["batch_size"] == 2 and len(batch["bad"]) == 2
    assert batch["video_values"].shape == (2, 4, 3, 16, 16) and batch["input_ids"].shape == (2, 4)
    assert batch["labels"].tolist() == [0, 3]


def test_bad_audio_is_skipped_and_named(tmp_path):
    t = np.arange(16_000) / 16_000
    good = [write_audio(tmp_path / f"ok{i}.wav", 0.3 * np.sin(2 * np.pi * 300 * (i + 1) * t)).name for i in range(2)]
    real = (tmp_path / good[0]).read_bytes()
    bad = {"truncated.wav": real[:30], "header_only.wav": real[:44], "photo.flac": b"\x89PNG\r\n\x1a\n" + b"\x00" * 100}
    csv, names = _table(tmp_path, "audio", good, bad)
    ds = CsvAudioText(csv, FbankConfig(num_mel_bins=32, max_length=50))
    items = [ds[i] for i in range(len(ds))]
    reasons = {names[i]: it["bad"][1] for i, it in enumerate(items) if "bad" in it}
    assert sorted(reasons) == ["header_only.wav", "photo.flac", "truncated.wav"]
    assert all(name in reason for name, reason in reasons.items())
    batch = MediaTextCollate(_Tok(), 8)(items)
    assert batch["audio_values"].shape == (2, 50, 32) and len(batch["bad"]) == 3
    with pytest.raises(BadMediaError, match="no such file"):
        read_audio(tmp_path / "absent.wav")


def test_bytes_in_memory_read_as_the_file_and_limits_stop_decoding(tmp_path):
    import io

    from mmlm.data.media import MediaTooLargeError, VideoLimits

    path = write_video(tmp_path / "clip.mp4", _moving_square(12), fps=8)
    data = io.BytesIO(path.read_bytes())
    assert np.array_equal(read_video(data, frames=4), read_video(path, frames=4))
    assert np.array_equal(read_video(data, frames=3, fps=4), read_video(path, frames=3, fps=4))
    assert read_video(data, frames=4, limits=VideoLimits(frames=12, pixels=32 * 32, seconds=1.5)).shape[0] == 4
    for limits, what in [(VideoLimits(frames=11), "more decoded frames than the limit of 11"),
                         (VideoLimits(pixels=32 * 31), "pixels"),
                         (VideoLimits(seconds=1.0), "longer than the limit of 1 s of video")]:
        with pytest.raises(MediaTooLargeError, match=what):
            read_video(data, frames=4, limits=limits, name="input.0")
    with pytest.raises(BadMediaError, match="^clip: cannot decode video") as e:
        read_video(io.BytesIO(b"not a video" * 20), name="clip")
    assert "0x" not in str(e.value)  # no heap address of the file object

    t = np.arange(32_000) / 16_000
    wav = write_audio(tmp_path / "a.wav", 0.3 * np.sin(2 * np.pi * 300 * t))
    assert np.array_equal(read_audio(io.BytesIO(wav.read_bytes())), read_audio(wav))
    assert read_audio(io.BytesIO(wav.read_bytes()), max_seconds=2.0, formats=("WAV",)).shape == (32_000,)
    with pytest.raises(MediaTooLargeError, match="2 s of audio, more than the limit of 1.5 s"):
        read_audio(io.BytesIO(wav.read_bytes()), max_seconds=1.5)
    with pytest.raises(BadMediaError, match="is WAV audio, not FLAC"):
        read_audio(io.BytesIO(wav.read_bytes()), formats=("FLAC",))
    with pytest.raises(BadMediaError, match="cannot decode audio: Format not recognised") as e:
        read_audio(io.BytesIO(b"not audio" * 20))
    assert "0x" not in str(e.value)
