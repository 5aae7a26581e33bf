"""Videos and audio clips named in requests -> a video or audio CLIP's input, under the operator's limits.

    video part  --bytes (data: URI, allowed file, fetched URL)--> read_video (PyAV, T frames as the model was
        evaluated with) --> video_pixels --> uint8 (T, S, S, 3)          (the batch: normalize_videos)
    audio part  --base64--> read_audio (soundfile, mono, the model's rate) --> audio_features --> (T, F) log-mel

The decoding and the features are data/media.py's, the same calls `mmlm eval zeroshot` makes on a checkpoint: the
server adds only the bounds (bytes before decoding; frames, pixels and seconds of video and seconds of audio
while decoding) and turns every refusal into an APIError naming the part.
"""

from __future__ import annotations

import io
from typing import Mapping

import numpy as np

from ..data.fbank import FbankConfig
from ..data.media import (BadMediaError, MediaTooLargeError, VideoLimits, audio_features, read_audio, read_video,
                          video_pixels)
from ..data.transforms import ImageProcessor
from .errors import APIError
from .images import ImageLoader, decode_base64

# the `format` of an input_audio part -> the containers soundfile may find in its bytes
AUDIO_FORMATS = {"wav": ("WAV", "WAVEX", "RF64", "W64"), "flac": ("FLAC",), "ogg": ("OGG",), "mp3": ("MP3",)}


class VideoReader:
    """Video URLs -> uint8 (T, S, S, 3) frames: `frames` frames spread over the clip, each preprocessed as an image."""

    def __init__(self, sources: ImageLoader, processor: ImageProcessor, frames: int, max_bytes: int,
                 limits: VideoLimits):
        self.sources, self.processor, self.frames = sources, processor, frames
        self.max_bytes, self.limits = max_bytes, limits

    def load(self, url: str, param: str, fetched: Mapping[str, bytes] | None = None) -> np.ndarray:
        data = self.sources.read_bytes(url, param, fetched, max_bytes=self.max_bytes, kind="video")
        try:
            frames = read_video(io.BytesIO(data), self.frames, limits=self.limits, name=param)  # (T, H, W, 3)
        except MediaTooLargeError as e:
            raise APIError(400, str(e), "video_too_large", param) from None
        except BadMediaError as e:
            raise APIError(400, str(e), "invalid_video", param) from None
        return video_pixels(frames, self.processor)  # (T, S, S, 3)


class AudioReader:
    """input_audio parts (base64 + format) -> float32 (T, F) log-mel features, as the model was trained on."""

    def __init__(self, features: FbankConfig, max_bytes: int, max_seconds: float):
        self.features, self.max_bytes, self.max_seconds = features, max_bytes, max_seconds

    def load(self, data: str, fmt: str, param: str) -> np.ndarray:
        if fmt not in AUDIO_FORMATS:
            raise APIError(400, f"{param}.format: {fmt!r} is not a supported audio format "
                                f"({', '.join(AUDIO_FORMATS)})", "unsupported_audio_format", f"{param}.format")
        raw = decode_base64(data, self.max_bytes, param, kind="audio")
        try:
            wave = read_audio(io.BytesIO(raw), self.features.sampling_rate, max_seconds=self.max_seconds,
                              formats=AUDIO_FORMATS[fmt], name=param)  # (S,)
        except MediaTooLargeError as e:
            raise APIError(400, str(e), "audio_too_long", param) from None
        except BadMediaError as e:
            raise APIError(400, str(e), "invalid_audio", param) from None
        return audio_features(wave, self.features)  # (T, F)
