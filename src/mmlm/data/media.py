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

from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Collection

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .fbank import FbankConfig, ast_features
from .image_text import IMAGE_EXTENSIONS, TarShards, read_table
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


@dataclass
class VideoLimits:
    """The most a video may cost to decode (a server's bounds on untrusted files); None: no bound.

    `pixels` is checked from the stream's header before decoding and again on every frame; `frames` (decoded) and
    `seconds` (the frames' timestamps) while decoding, so a file whose header lies stops where the bound is passed.
    Decoding keeps only the frames it returns, so memory is bounded by those, not by the clip's length."""

    frames: int | None = None
    pixels: int | None = None  # width x height of one frame
    seconds: float | None = None


class MediaTooLargeError(BadMediaError):
    """A video or audio file past a limit the caller set (VideoLimits, `max_seconds`); the message names it."""


def _open_video(source: Path | BinaryIO, name: str) -> tuple[Any, Any]:
    """The PyAV container of a file or a binary file object (rewound), and its first video stream."""
    import av  # imported here: `import mmlm` stays light

    if not isinstance(source, Path):
        source.seek(0)
    container = av.open(str(source) if isinstance(source, Path) else source)
    if not container.streams.video:
        container.close()
        raise BadMediaError(f"{name}: no video stream")
    return container, container.streams.video[0]


def _decode_errors() -> tuple[type[Exception], ...]:
    import av

    return av.error.FFmpegError, OSError, ValueError, EOFError  # every PyAV error is an FFmpegError


def _too_large(name: str, what: str) -> MediaTooLargeError:
    return MediaTooLargeError(f"{name}: {what}")


def _frame_times(source: Path | BinaryIO, name: str, limits: VideoLimits,
                 keep: list[np.ndarray] | None = None) -> list[float]:
    """Pass 1: the time in seconds of every frame of the first video stream, decoded but not converted (or, with
    `keep`, converted and appended to it: one pass where memory need not be bounded)."""
    container, stream = _open_video(source, name)
    with container:
        size = (stream.codec_context.width or 0) * (stream.codec_context.height or 0)
        if limits.pixels is not None and size > limits.pixels:
            raise _too_large(name, f"frames of {size} pixels, more than the limit of {limits.pixels}")
        base = float(stream.time_base) if stream.time_base is not None else 0.0
        times: list[float] = []
        for frame in container.decode(stream):
            t = frame.pts * base if frame.pts is not None else len(times) / float(stream.average_rate or 25)
            times.append(t)
            if keep is not None:
                keep.append(frame.to_ndarray(format="rgb24"))
            if limits.frames is not None and len(times) > limits.frames:
                raise _too_large(name, f"more decoded frames than the limit of {limits.frames}")
            if limits.pixels is not None and frame.width * frame.height > limits.pixels:
                raise _too_large(name, f"a frame of {frame.width * frame.height} pixels, more than the limit of "
                                       f"{limits.pixels}")
            if limits.seconds is not None and t - times[0] > limits.seconds:
                raise _too_large(name, f"longer than the limit of {limits.seconds:g} s of video")
    if not times:
        raise BadMediaError(f"{name}: the video has no decodable frames")
    return times


def _frames_at(source: Path | BinaryIO, name: str, picks: np.ndarray) -> np.ndarray:
    """Pass 2: the frames at indices `picks` (in decoding order, repeats allowed) as uint8 (T, H, W, 3)."""
    wanted = {int(i) for i in picks}
    kept: dict[int, np.ndarray] = {}
    container, stream = _open_video(source, name)
    with container:
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                kept[i] = frame.to_ndarray(format="rgb24")
            if len(kept) == len(wanted):
                break
    if len(kept) < len(wanted):
        raise BadMediaError(f"{name}: the video decoded to fewer frames the second time")
    return _stack([kept[int(i)] for i in picks], name)


def read_video(source: str | Path | BinaryIO, frames: int = 8, fps: float | None = None,
               limits: VideoLimits | None = None, name: str | None = None) -> np.ndarray:
    """A video file, a binary file object holding one, or a folder of frame images -> uint8 (T, H, W, 3).

    fps None: `frames` frames spread evenly over the whole clip. fps given: one frame every 1/fps seconds from
    the start (a folder's frames count as 25 fps), the first `frames` of them (a shorter clip repeats its last).
    Without `limits` (trusted files: training, evaluation) a file is decoded once, every frame kept; with them it
    is decoded twice, once for the frames' times and once converting only the frames picked, so memory is bounded
    by the output. `limits` bound the decoding (MediaTooLargeError past them); `name` is what errors call the
    source (default: its path)."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if isinstance(source, (str, Path)):
        path = Path(source)
        name = name or str(path)
        if path.is_dir():
            return _read_frame_folder(path, frames, fps)
        if not path.is_file():
            raise BadMediaError(f"{name}: no such file or folder")
        source = path
    else:
        name = name or "<in-memory video>"
    try:
        if limits is None:
            decoded: list[np.ndarray] = []
            picks = _pick(_frame_times(source, name, VideoLimits(), keep=decoded), frames, fps)
            return _stack([decoded[i] for i in picks], name)
        return _frames_at(source, name, _pick(_frame_times(source, name, limits), frames, fps))
    except BadMediaError:
        raise
    except _decode_errors() as e:  # PyAV's own words (strerror) leave out the file object's name
        raise BadMediaError(f"{name}: cannot decode video: {getattr(e, 'strerror', None) or e}") from None


def _read_frame_folder(path: Path, frames: int, fps: float | None) -> np.ndarray:
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise BadMediaError(f"{path}: a frame folder with no images ({', '.join(IMAGE_EXTENSIONS)})")
    times = [i / 25.0 for i in range(len(files))]
    out = []
    for i in _pick(times, frames, fps):
        try:
            with Image.open(files[i]) as im:
                out.append(np.asarray(im.convert("RGB")))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise BadMediaError(f"{files[i]}: cannot read frame: {e}") from None
    return _stack(out, str(path))


def _stack(frames: list[np.ndarray], name: str) -> np.ndarray:
    """(H, W, 3) frames -> (T, H, W, 3); frames of different sizes are a bad video, named."""
    if len({f.shape for f in frames}) > 1:
        raise BadMediaError(f"{name}: frames of different sizes {sorted({f.shape for f in frames})}")
    return np.stack(frames)


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


MAX_SAMPLE_RATE = 384_000  # the highest rate audio is recorded at: a header claiming more is broken


def read_audio(source: str | Path | BinaryIO, sample_rate: int = 16_000, min_seconds: float = 0.025,
               max_seconds: float | None = None, formats: Collection[str] | None = None,
               name: str | None = None) -> np.ndarray:
    """An audio file, or a binary file object holding one -> float32 (S,) mono in [-1, 1] at `sample_rate`.

    Channels are averaged block by block while decoding, so memory holds the mono clip only. `max_seconds`: a
    longer clip is refused (MediaTooLargeError) from its header, and decoding stops past it whatever the header
    says. `formats`: the containers accepted (soundfile's names: WAV, FLAC, OGG, MP3); others are refused.
    `name` is what errors call the source (default: its path)."""
    import soundfile as sf

    if isinstance(source, (str, Path)):
        name = name or str(source)
        if not Path(source).is_file():
            raise BadMediaError(f"{name}: no such file")
        source = str(source)
    else:
        name = name or "<in-memory audio>"
    try:
        with sf.SoundFile(source) as f:
            if formats is not None and f.format not in formats:
                raise BadMediaError(f"{name}: the data is {f.format} audio, not {' or '.join(formats)}")
            rate = f.samplerate
            if not 0 < rate <= MAX_SAMPLE_RATE:
                raise BadMediaError(f"{name}: a sample rate of {rate} Hz (at most {MAX_SAMPLE_RATE})")
            most = None if max_seconds is None else int(max_seconds * rate)  # samples per channel
            if most is not None and f.frames > most:
                raise _too_large(name, f"{f.frames / rate:.3g} s of audio, more than the limit of {max_seconds:g} s")
            blocks, n = [], 0
            for block in f.blocks(blocksize=1 << 16, dtype="float32", always_2d=True):  # (s, channels)
                blocks.append(block.mean(axis=1))
                n += len(block)
                if most is not None and n > most:
                    raise _too_large(name, f"longer than the limit of {max_seconds:g} s of audio")
    except BadMediaError:
        raise
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError, TypeError) as e:
        why = getattr(e, "error_string", None) or str(e)  # a file object's repr (a heap address) stays out
        raise BadMediaError(f"{name}: cannot decode audio: {why}") from None
    wave = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    if len(wave) < min_seconds * rate:
        raise BadMediaError(f"{name}: {len(wave)} samples ({len(wave) / rate:.3f} s) is too short "
                            f"(the file is empty or truncated)")
    return resample(wave, rate, sample_rate)


def write_audio(path: str | Path, wave: np.ndarray | torch.Tensor, sample_rate: int = 16_000) -> Path:
    """float (S,) in [-1, 1] -> wav/flac/ogg by extension (16-bit PCM for wav and flac, Vorbis for ogg)."""
    import soundfile as sf

    path = Path(path)
    wave = np.asarray(wave, dtype=np.float32)
    subtype = "VORBIS" if path.suffix.lower() == ".ogg" else "PCM_16"
    sf.write(str(path), wave, sample_rate, subtype=subtype)
    return path


# ---------------------------------------------------------------------------------------------- model inputs

def video_pixels(frames: np.ndarray, processor: ImageProcessor) -> np.ndarray:
    """Decoded frames uint8 (T, H, W, 3) -> uint8 (T, S, S, 3): each frame resized and cropped as an image is."""
    s = processor.config.image_size
    if frames.shape[1:] == (s, s, 3) and processor.config.mode != "resize_crop":  # already square at S: resizing
        return np.ascontiguousarray(frames, dtype=np.uint8)  # to S x S changes nothing (PIL copies an equal size)
    return np.stack([processor.pixels(Image.fromarray(f)) for f in frames])


def normalize_videos(videos: torch.Tensor, processor: ImageProcessor) -> torch.Tensor:
    """uint8 (B, T, S, S, 3) -> float32 (B, T, 3, S, S), `encode_video`'s input: each frame normalised as an image."""
    return processor.normalize(videos.flatten(0, 1), channels_last=True).unflatten(0, tuple(videos.shape[:2]))


def audio_features(wave: np.ndarray, features: FbankConfig) -> np.ndarray:
    """float32 (S,) at features.sampling_rate -> float32 (T, F) log-mel features: `encode_audio`'s input, one clip."""
    return ast_features(torch.from_numpy(wave), features)[0].numpy()


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
            video = video_pixels(read_video(self.videos[i], self.frames, self.fps), self.processor)  # (T, S, S, 3)
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
        return {"audio": audio_features(wave, self.features), "caption": self.captions[i], "label": self.labels[i]}


class TarMediaText(TarShards):
    """webdataset-style tar shards of `KEY.mp4|webm|...` (column "video") or `KEY.wav|flac|ogg` (column "audio")
    with `KEY.txt` captions (see data/image_text.py TarShards). Items as CsvVideoText / CsvAudioText give them;
    an unreadable member is a bad item named `shard:key`."""

    def __init__(self, shards: str | Any, column: str, preprocess: PreprocessConfig | None = None, frames: int = 8,
                 fps: float | None = None, features: FbankConfig | None = None):
        if column not in ("video", "audio"):
            raise ValueError(f"column must be 'video' or 'audio', got {column!r}")
        super().__init__(shards, VIDEO_EXTENSIONS if column == "video" else AUDIO_EXTENSIONS)
        self.column, self.frames, self.fps = column, frames, fps
        self.processor = ImageProcessor(preprocess) if column == "video" else None
        self.features = features or FbankConfig()

    def __getitem__(self, i: int) -> dict[str, Any]:
        import io

        name, payload, text = self.samples[i]
        if payload is None or text is None:
            return {"bad": (name, "missing " + (self.column if payload is None else "caption") + " member")}
        try:
            caption = self._read(text).decode("utf-8").strip()
            data = io.BytesIO(self._read(payload))
            if self.column == "video":
                item = video_pixels(read_video(data, self.frames, self.fps, name=name), self.processor)
            else:
                item = audio_features(read_audio(data, self.features.sampling_rate, name=name), self.features)
        except (BadMediaError, BadImageError, UnicodeDecodeError) as e:
            return {"bad": (name, str(e))}
        return {self.column: item, "caption": caption, "label": -1}


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
            if self.processor is None:
                raise ValueError("MediaTextCollate needs a PreprocessConfig for videos")
            out["video_values"] = normalize_videos(videos, self.processor)
        else:
            out["audio_values"] = torch.from_numpy(np.stack([s["audio"] for s in good]))  # (B, T, F)
        ids = self.tokenizer([s["caption"] for s in good], context_length=self.context_length)
        longest = int((ids == self.tokenizer.eot_id).int().argmax(dim=1).max()) + 1
        out["input_ids"] = ids[:, :longest]
        out["labels"] = torch.tensor([s.get("label", -1) for s in good])
        return out



class MediaProcessor:
    """A LLaVA's media, as samples hold them, -> its forward's inputs:

        images  PIL or uint8 (H, W, 3)                    -> pixel_values (N, 3, S, S)
        videos  uint8 (T, H, W, 3), any T                 -> videos (N, frames, 3, S', S'): `frames` picked evenly
        sounds  float32 (S,) waveform at the features' rate -> audios (N, T, F) log-mel features

    Each kind is prepared as its tower was trained: images by the model's preprocess, frames as the video CLIP's
    images (its size, CLIP's normalisation), sounds by the audio tower's filterbank (`FbankConfig.for_tower`)."""

    def __init__(self, images: ImageProcessor, frames: ImageProcessor | None = None, n_frames: int = 8,
                 features: FbankConfig | None = None):
        self.images, self.frames, self.n_frames, self.features = images, frames, n_frames, features

    @classmethod
    def for_model(cls, config: Any, images: ImageProcessor | PreprocessConfig) -> MediaProcessor:
        """For a LlavaConfig: its video and audio towers decide how frames and sounds are prepared."""
        images = images if isinstance(images, ImageProcessor) else ImageProcessor(images)
        frames = ImageProcessor(PreprocessConfig(image_size=config.video.image_size)) if config.video else None
        features = FbankConfig.for_tower(config.audio) if config.audio else None
        return cls(images, frames, config.video_frames, features)

    def __call__(self, images: Collection[Any] = (), videos: Collection[np.ndarray] = (),
                 audios: Collection[np.ndarray] = ()) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if images:
            out["pixel_values"] = self.images([im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im))
                                               for im in images])
        if videos:
            if self.frames is None:
                raise ValueError("this model reads no video (it has no video tower)")
            clips = [video_pixels(v[sample_indices(len(v), self.n_frames)], self.frames) for v in videos]
            out["videos"] = normalize_videos(torch.from_numpy(np.stack(clips)), self.frames)
        if audios:
            if self.features is None:
                raise ValueError("this model reads no sound (it has no audio tower)")
            out["audios"] = torch.from_numpy(np.stack([audio_features(np.asarray(a, dtype=np.float32), self.features)
                                                       for a in audios]))
        return out
