"""The other modalities of a multimodal course, as real tensors mmlm can make offline.

    audio   a generated tone -> waveform (S,) -> STFT power (T, n_fft/2+1) -> log-mel spectrogram (T, F)
    video   moving shapes, drawn with shapes.py's renderer -> frames (T, H, W, 3) uint8 -> (T, C, H, W)
    table   shapes scenes -> one row of numeric attributes each -> (N, F)

Batched, these are the shapes the guide (docs/01-data-shapes.md) teaches: audio (N, T, F), video
(N, T, C, H, W), table (N, F), next to text (B, T) and images (N, C, H, W).

The STFT and the mel filterbank are written out with torch (no torchaudio): the spectrogram equals
transformers' `audio_utils.spectrogram` with an HTK mel filterbank (tests/test_modalities.py checks it).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .shapes import COLOUR_RGB, COLOURS, POSITIONS, SHAPES, SIZES, Scene, object_mask

# ---------------------------------------------------------------- audio


def tone(frequencies: Sequence[float] = (440.0,), seconds: float = 1.0, sample_rate: int = 16_000,
         sweep_to: float | None = None) -> torch.Tensor:
    """(S,) float32 waveform in [-1, 1]: a sum of sines, plus a linear chirp from the first frequency up to
    `sweep_to` Hz when given (a rising line on the spectrogram)."""
    if not frequencies or seconds <= 0 or sample_rate <= 0:
        raise ValueError("tone needs at least one frequency, seconds > 0 and sample_rate > 0")
    t = torch.arange(int(seconds * sample_rate), dtype=torch.float64) / sample_rate
    wave = sum(torch.sin(2 * math.pi * f * t) for f in frequencies)
    if sweep_to is not None:  # instantaneous frequency f0 + (f1 - f0) t / seconds
        f0 = frequencies[0]
        wave = wave + torch.sin(2 * math.pi * (f0 * t + (sweep_to - f0) * t**2 / (2 * seconds)))
    fade = torch.clamp(torch.minimum(t, t[-1] - t) / 0.01, max=1.0)  # 10 ms fade in/out: no click at the edges
    return (wave * fade / wave.abs().max()).float()


def stft_power(wave: torch.Tensor, n_fft: int = 400, hop: int = 160) -> torch.Tensor:
    """(S,) or (N, S) waveform -> (.., T, n_fft // 2 + 1) power spectrum |FFT|^2 of Hann-windowed frames.

    Frames are centred (the signal is reflect-padded by n_fft // 2 on both sides), as Whisper and
    transformers' feature extractors do: T = 1 + S // hop."""
    if wave.shape[-1] <= n_fft // 2:
        raise ValueError(f"waveform of {wave.shape[-1]} samples is too short for n_fft {n_fft}")
    x = torch.nn.functional.pad(wave.double()[None], (n_fft // 2, n_fft // 2), mode="reflect")[0]  # (.., S + n_fft)
    frames = x.unfold(-1, n_fft, hop)  # (.., T, n_fft)
    window = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
    return torch.fft.rfft(frames * window).abs().square()  # (.., T, n_fft // 2 + 1)


def hz_to_mel(hz: torch.Tensor | float) -> torch.Tensor:
    """HTK mel scale: about linear below 1 kHz, logarithmic above (equal steps sound equally far apart)."""
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(hz, dtype=torch.float64) / 700.0)


def mel_to_hz(mel: torch.Tensor | float) -> torch.Tensor:
    return 700.0 * (10.0 ** (torch.as_tensor(mel, dtype=torch.float64) / 2595.0) - 1.0)


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int, f_min: float = 0.0,
                   f_max: float | None = None) -> torch.Tensor:
    """(n_fft // 2 + 1, n_mels) triangular filters, their centres evenly spaced on the mel scale.

    Filter m rises linearly from edge m to peak 1 at edge m + 1 and falls back to 0 at edge m + 2,
    where the n_mels + 2 edges are evenly spaced mels between f_min and f_max (default: Nyquist)."""
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"need 0 <= f_min < f_max <= {sample_rate / 2} (Nyquist), got {f_min}, {f_max}")
    fft_hz = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)  # (n_freqs,)
    edges = mel_to_hz(torch.linspace(float(hz_to_mel(f_min)), float(hz_to_mel(f_max)), n_mels + 2,
                                     dtype=torch.float64))  # (n_mels + 2,)
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]  # (n_mels,) each
    rising = (fft_hz[:, None] - lower) / (centre - lower)  # (n_freqs, n_mels)
    falling = (upper - fft_hz[:, None]) / (upper - centre)
    return torch.clamp(torch.minimum(rising, falling), min=0.0)


def log_mel_spectrogram(wave: torch.Tensor, sample_rate: int = 16_000, n_mels: int = 64, n_fft: int = 400,
                        hop: int = 160, floor: float = 1e-10) -> torch.Tensor:
    """(S,) or (N, S) waveform -> (.., T, n_mels) float32 natural-log mel energies: one row per 10 ms frame
    (at 16 kHz with hop 160), one column per mel band. This is audio's (T, F): time steps, features."""
    mel = stft_power(wave, n_fft, hop) @ mel_filterbank(n_mels, n_fft, sample_rate)  # (.., T, n_mels)
    return torch.log(torch.clamp(mel, min=floor)).float()


# ---------------------------------------------------------------- video


def moving_shapes_video(n_frames: int = 8, image_size: int = 64, n_objects: int = 2, seed: int = 0) -> np.ndarray:
    """(T, H, W, 3) uint8 frames: `n_objects` shapes of distinct colours gliding in straight lines across a dark
    background, bouncing off the borders. Drawn with the shapes dataset's anti-aliased masks and colours."""
    if n_frames < 1 or not 1 <= n_objects <= len(COLOURS):
        raise ValueError(f"need n_frames >= 1 and 1 <= n_objects <= {len(COLOURS)}")
    rng = np.random.default_rng(seed)
    S = image_size
    radius = S / 8
    colours = rng.choice(len(COLOURS), n_objects, replace=False)
    shapes = rng.choice(len(SHAPES), n_objects, replace=False)
    pos = rng.uniform(radius, S - radius, size=(n_objects, 2))  # (n, 2) centre x, y
    angle = rng.uniform(0, 2 * np.pi, size=n_objects)
    vel = np.stack([np.cos(angle), np.sin(angle)], axis=1) * S / 12  # (n, 2) pixels per frame
    background = (np.frombuffer(rng.bytes(S * S), dtype=np.uint8).reshape(S, S, 1) >> 3) + np.uint8(12)
    frames = np.empty((n_frames, S, S, 3), dtype=np.uint8)
    for t in range(n_frames):
        img = np.repeat(background, 3, axis=2).astype(np.float32)
        for k in range(n_objects):
            alpha = object_mask(SHAPES[shapes[k]], pos[k, 0], pos[k, 1], radius, 0.0, 0, 0, S, S)[..., None]
            img += (np.asarray(COLOUR_RGB[COLOURS[colours[k]]], dtype=np.float32) - img) * alpha
        frames[t] = np.clip(img + 0.5, 0, 255).astype(np.uint8)
        pos += vel
        for axis in range(2):  # bounce
            out = (pos[:, axis] < radius) | (pos[:, axis] > S - radius)
            vel[out, axis] *= -1
            pos[:, axis] = np.clip(pos[:, axis], radius, S - radius)
    return frames


def video_tensor(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, H, W) float32 in [0, 1]: a video is a sequence of images."""
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0


# ---------------------------------------------------------------- table

TABLE_COLUMNS = ("objects", "large objects", "mean row", "mean column", "colour of first", "shape of first")


def scene_table(scenes: Sequence[Scene]) -> torch.Tensor:
    """(N, F) float32: one row of numeric attributes per scene (columns in TABLE_COLUMNS). Categorical
    columns hold an index (colour/shape of the first object); rows and columns of the 3x3 grid count 0..2."""
    rows = []
    for scene in scenes:
        if not scene.objects:
            raise ValueError("scene_table: a scene without objects has no attributes")
        grid = [divmod(POSITIONS.index(o.position), 3) for o in scene.objects]
        first = scene.objects[0]
        rows.append([len(scene.objects), sum(o.size == SIZES[1] for o in scene.objects),
                     float(np.mean([r for r, _ in grid])), float(np.mean([c for _, c in grid])),
                     COLOURS.index(first.colour), SHAPES.index(first.shape)])
    return torch.tensor(rows, dtype=torch.float32)
