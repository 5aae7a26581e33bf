"""Video and audio files -> the tensors the towers read, and CSV/TSV sources of (video | audio, caption) pairs.

    video file (mp4/webm/avi/...)  --PyAV decode--> frames, sampled --> uint8 (T, H, W, 3) --resize--> (T, S, S, 3)
    frame folder (0001.png, ...)   --sorted, sampled-->               the same
    audio file (wav/flac/ogg)      --soundfile--> (S, channels) --mix to mono, resample--> float32 (S',) --fbank--> (T, F)

The readers are PyAV (`av`) and `soundfile` (libsndfile): no container or codec is parsed here. A file either
reader cannot use is a `BadMediaError` naming it; the sources turn it into a `{"bad": (source, reason)}` item
that the collate drops and the training loop counts and names, stopping only past
`train.max_bad_sample_fraction`: exactly how bad images are handled (data/image_text.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .fbank import FbankConfig, ast_features
from .image_text import IMAGE_EXTENSIONS, read_table
from .transforms import BadImageError, ImageProcessor, PreprocessConfig

VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".gif")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")


class BadMediaError(ValueError):
    """A video or audio file that cannot be decoded; the message names the file."""


# ---------------------------------------------------------------------------------------------- video

def sample_indices(n: int, frames: int) -> np.ndarray:
    """`frames` indices spread evenly over n decoded frames (the centre of each of `frames` equal segments,
    as TSN / ActionCLIP sample); a clip shorter than `frames` repeats frames."""
    if n < 1:
        raise ValueError("no frames to sample from")
    return np.minimum(((np.arange(frames) + 0.5) * n / frames).astype(np.int64), n - 1)


def _decode_all(path: Path) -> tuple[list[np.ndarray], list[float]]:
    """Every frame of the first video stream as uint8 (H, W, 3), and its time in seconds."""
    import av  # imported here: `import mmlm` stays light

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BadMediaError(f"{path}: no video stream")
            stream = container.streams.video[0]
            base = float(stream.time_base) if stream.time_base is not None else 0.0
            frames, times = [], []
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                times.append(frame.pts * base if frame.pts is not None else len(times) / float(stream.average_rate or 25))
    except BadMediaError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as e:  # every PyAV error is an FFmpegError
        raise BadMediaError(f"{path}: cannot decode video: {e}") from None
    if not frames:
        raise BadMediaError(f"{path}: the video has no decodable frames")
    return frames, times


def read_video(path: str | Path, frames: int = 8, fps: float | None = None) -> np.ndarray:
    """A video file or a folder of frame images -> uint8 (T, H, W, 3).

    fps None: `frames` frames spread evenly over the whole clip. fps given: one frame every 1/fps seconds from
    the start (a folder's frames count as 25 fps), the first `frames` of them (a shorter clip repeats its last)."""
    path = Path(path)
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise BadMediaError(f"{path}: a frame folder with no images ({', '.join(IMAGE_EXTENSIONS)})")
        times = [i / 25.0 for i in range(len(files))]
        pick = _pick(times, frames, fps)
        out = []
        for i in pick:
            try:
                with Image.open(files[i]) as im:
                    out.append(np.asarray(im.convert("RGB")))
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise BadMediaError(f"{files[i]}: cannot read frame: {e}") from None
        if len({f.shape for f in out}) > 1:
            raise BadMediaError(f"{path}: frames of different sizes {sorted({f.shape for f in out})}")
        return np.stack(out)
    if not path.is_file():
        raise BadMediaError(f"{path}: no such file or folder")
    decoded, times = _decode_all(path)
    return np.stack([decoded[i] for i in _pick(times, frames, fps)])


def _pick(times: list[float], frames: int, fps: float | None) -> np.ndarray:
    if fps is None:
        return sample_indices(len(times), frames)
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    t = np.asarray(times) - times[0]
    wanted = np.arange(frames) / fps  # the moments to show
    return np.minimum(np.searchsorted(t, wanted - 1e-6), len(t) - 1)  # the first frame at or after each


def write_video(path: str | Path, frames: np.ndarray, fps: int = 8) -> Path:
    """uint8 (T, H, W, 3) -> an H.264 mp4 (or another container by extension) with PyAV; H and W must be even
    for yuv420p."""
    import av

    path = Path(path)
    T, H, W, _ = frames.shape
    with av.open(str(path), mode="w") as container:
        codec = {".webm": "libvpx", ".avi": "mpeg4"}.get(path.suffix.lower(), "libx264")
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "12", "preset": "veryfast"}  # near-lossless: small shapes keep their colour
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# ---------------------------------------------------------------------------------------------- audio

def resample(wave: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Band-limited resampling by the FFT: keep the spectrum below both Nyquist frequencies, change the length."""
    if rate == target:
        return wave
    n = wave.shape[-1]
    m = max(1, round(n * target / rate))
    spectrum = np.fft.rfft(wave)
    keep = min(len(spectrum), m // 2 + 1)
    out = np.zeros(m // 2 + 1, dtype=spectrum.dtype)
    out[:keep] = spectrum[:keep]
    return (np.fft.irfft(out, n=m) * (m / n)).astype(np.float32)


def read_audio(path: str | Path, sample_rate: int = 16_000, min_seconds: float = 0.025) -> np.ndarray:
    """An audio file -> float32 (S,) mono in [-1, 1] at `sample_rate`. Channels are averaged."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise BadMediaError(f"{path}: no such file")
    try:
        wave, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (S, channels)
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError, TypeError) as e:
        raise BadMediaError(f"{path}: cannot decode audio: {e}") from None
    if wave.shape[0] < min_seconds * rate:
        raise BadMediaError(f"{path}: {wave.shape[0]} samples ({wave.shape[0] / rate:.3f} s) is too short "
                            f"(the file is empty or truncated)")
    return resample(wave.mean(axis=1), rate, sample_rate)


def write_audio(path: str | Path, wave: np.ndarray | torch.Tensor, sample_rate: int = 16_000) -> Path:
    """float (S,) in [-1, 1] -> wav/flac/ogg by extension (16-bit PCM for wav and flac, Vorbis for ogg)."""
    import soundfile as sf

    path = Path(path)
    wave = np.asarray(wave, dtype=np.float32)
    subtype = "VORBIS" if path.suffix.lower() == ".ogg" else "PCM_16"
    sf.write(str(path), wave, sample_rate, subtype=subtype)
    return path


# ---------------------------------------------------------------------------------------------- sources

class CsvVideoText(Dataset):
    """A CSV/TSV with a `video` column (a file or a frame folder, relative to the table) and a caption column.
    Items: {"video": uint8 (T, S, S, 3), "caption", "label"} or {"bad": (source, reason)}."""

    def __init__(self, path: str | Path, preprocess: PreprocessConfig, frames: int = 8, fps: float | None = None,
                 video_col: str = "video", caption_col: str = "caption"):
        self.path = Path(path)
        rows = read_table(self.path, [video_col, caption_col])
        self.videos = [str(self.path.parent / r[video_col]) for r in rows]
        self.captions = [r[caption_col] for r in rows]
        self.labels = [int(r["label"]) if r.get("label", "").strip().lstrip("-").isdigit() else -1 for r in rows]
        self.frames, self.fps = frames, fps
        self.processor = ImageProcessor(preprocess)

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            raw = read_video(self.videos[i], self.frames, self.fps)  # (T, H, W, 3)
            video = np.stack([self.processor.pixels(Image.fromarray(f)) for f in raw])  # (T, S, S, 3)
        except (BadMediaError, BadImageError) as e:
            return {"bad": (f"{self.path}:{i + 2}", str(e))}  # line i + 2: the header is line 1
        return {"video": video, "caption": self.captions[i], "label": self.labels[i]}


class CsvAudioText(Dataset):
    """A CSV/TSV with an `audio` column (a file relative to the table) and a caption column.
    Items: {"audio": float32 (T, F) log-mel features, "caption", "label"} or {"bad": (source, reason)}."""

    def __init__(self, path: str | Path, features: FbankConfig | None = None, audio_col: str = "audio",
                 caption_col: str = "caption"):
        self.path = Path(path)
        rows = read_table(self.path, [audio_col, caption_col])
        self.files = [str(self.path.parent / r[audio_col]) for r in rows]
        self.captions = [r[caption_col] for r in rows]
        self.labels = [int(r["label"]) if r.get("label", "").strip().lstrip("-").isdigit() else -1 for r in rows]
        self.features = features or FbankConfig()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            wave = read_audio(self.files[i], self.features.sampling_rate)
        except BadMediaError as e:
            return {"bad": (f"{self.path}:{i + 2}", str(e))}
        return {"audio": ast_features(torch.from_numpy(wave), self.features)[0].numpy(), "caption": self.captions[i],
                "label": self.labels[i]}


class MediaTextCollate:
    """Samples -> {"video_values" (B, T, 3, S, S) | "audio_values" (B, T, F), "input_ids", "labels", "bad",
    "batch_size"}: ImageTextCollate's contract with the media tensor in place of pixel_values."""

    def __init__(self, tokenizer: Any, context_length: int, preprocess: PreprocessConfig | None = None):
        self.tokenizer, self.context_length = tokenizer, context_length
        self.processor = ImageProcessor(preprocess) if preprocess is not None else None

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        good = [s for s in samples if "bad" not in s]
        bad = [s["bad"] for s in samples if "bad" in s]
        out: dict[str, Any] = {"input_ids": None, "labels": None, "bad": bad, "batch_size": len(good)}
        if not good:
            return out
        if "video" in good[0]:
            videos = torch.from_numpy(np.stack([s["video"] for s in good]))  # (B, T, S, S, 3) uint8
            B, T = videos.shape[:2]
            if self.processor is None:
                raise ValueError("MediaTextCollate needs a PreprocessConfig for videos")
            out["video_values"] = self.processor.normalize(videos.flatten(0, 1), channels_last=True).unflatten(0, (B, T))
        else:
            out["audio_values"] = torch.from_numpy(np.stack([s["audio"] for s in good]))  # (B, T, F)
        ids = self.tokenizer([s["caption"] for s in good], context_length=self.context_length)
        longest = int((ids == self.tokenizer.eot_id).int().argmax(dim=1).max()) + 1
        out["input_ids"] = ids[:, :longest]
        out["labels"] = torch.tensor([s.get("label", -1) for s in good])
        return out

