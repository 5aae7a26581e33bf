"""Kaldi-style log-mel filterbank features: a 16 kHz waveform (S,) -> (T, F), the input of an Audio Spectrogram
Transformer.

    waveform --frames of 25 ms every 10 ms--> (T, 400) --remove DC, pre-emphasis, Hann window, zero-pad to 512-->
        --|rFFT|^2--> (T, 257) power --Kaldi mel filterbank--> (T, F) --log--> pad/cut to max_length, normalise

Reference: transformers' `ASTFeatureExtractor` on its numpy path (the one it takes without torchaudio), which
follows Kaldi's `compute-fbank-feats` (torchaudio.compliance.kaldi.fbank) with a Hann window. Equal to it
within float32 rounding (tests/test_audio.py). The steps differ from `modalities.stft_power` (Whisper-style): no
centring (Kaldi's snip_edges: a frame only where the signal covers it), the mean of each frame removed, a
pre-emphasis filter x[n] - 0.97 x[n-1] that lifts high frequencies, a symmetric window, and mel filters that are
triangles on the mel axis itself (Kaldi's mel scale 1127 ln(1 + f/700), 20 Hz up to Nyquist).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..config import ASTConfig

# AudioSet's feature statistics: the normalisation every published AST checkpoint was trained with
AUDIOSET_MEAN, AUDIOSET_STD = -4.2677393, 4.5689974
MEL_FLOOR = 1.192092955078125e-07  # float32 epsilon: log(0) never happens


@dataclass
class FbankConfig:
    """How waveforms become an AST's input (transformers' preprocessor_config.json fields, same names)."""

    sampling_rate: int = 16_000
    num_mel_bins: int = 128
    max_length: int = 1024  # frames (10 ms each): shorter clips are padded with zeros, longer ones cut
    do_normalize: bool = True
    mean: float = AUDIOSET_MEAN
    std: float = AUDIOSET_STD

    @classmethod
    def for_tower(cls, audio: ASTConfig) -> FbankConfig:
        """The features an audio tower (an ASTConfig) reads: its mel bins and frames, the defaults otherwise."""
        return cls(num_mel_bins=audio.num_mel_bins, max_length=audio.max_length)


def kaldi_mel_filterbank(n_mels: int, n_fft: int = 512, sample_rate: int = 16_000, f_min: float = 20.0,
                         f_max: float | None = None) -> torch.Tensor:
    """(n_fft // 2 + 1, n_mels) float64 filters: triangles with evenly spaced corners on Kaldi's mel axis,
    evaluated at each FFT bin's mel value (so they are triangles in mel, not in Hz)."""
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"need 0 <= f_min < f_max <= {sample_rate / 2} (Nyquist), got {f_min}, {f_max}")

    def mel(hz: torch.Tensor | float) -> torch.Tensor:
        return 1127.0 * torch.log1p(torch.as_tensor(hz, dtype=torch.float64) / 700.0)

    edges = torch.linspace(float(mel(f_min)), float(mel(f_max)), n_mels + 2, dtype=torch.float64)  # (n_mels + 2,)
    bins = mel(torch.arange(n_fft // 2 + 1, dtype=torch.float64) * sample_rate / n_fft)  # (n_freqs,) in mel
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins[:, None] - lower) / (centre - lower)  # (n_freqs, n_mels)
    falling = (upper - bins[:, None]) / (upper - centre)
    return torch.clamp(torch.minimum(rising, falling), min=0.0)


def kaldi_fbank(wave: torch.Tensor, sample_rate: int = 16_000, num_mel_bins: int = 128, frame_length: int = 400,
                hop: int = 160, preemphasis: float = 0.97) -> torch.Tensor:
    """(S,) waveform -> (T, num_mel_bins) float32 log-mel energies, T = 1 + (S - frame_length) // hop."""
    wave = torch.as_tensor(wave).double().flatten()
    if wave.numel() < frame_length:
        raise ValueError(f"a waveform of {wave.numel()} samples is shorter than one {frame_length}-sample frame "
                         f"({1000 * frame_length / sample_rate:.0f} ms)")
    n_fft = 2 ** math.ceil(math.log2(frame_length))  # 400 -> 512
    frames = wave.unfold(0, frame_length, hop)  # (T, frame_length), no centring: every frame inside the signal
    frames = frames - frames.mean(dim=1, keepdim=True)  # remove each frame's DC offset
    frames = torch.cat([frames[:, :1] * (1 - preemphasis), frames[:, 1:] - preemphasis * frames[:, :-1]], dim=1)
    frames = frames * torch.hann_window(frame_length, periodic=False, dtype=torch.float64)
    spectrum = torch.fft.rfft(frames, n=n_fft)  # (T, n_fft // 2 + 1), the frame zero-padded to n_fft
    # transformers keeps the FFT in complex64 before taking |.|^2 in float64: rounding it the same way keeps the
    # features equal to float32 precision instead of ~1e-6 apart
    power = spectrum.to(torch.complex64).to(torch.complex128).abs() ** 2
    mel = power @ kaldi_mel_filterbank(num_mel_bins, n_fft, sample_rate)  # (T, num_mel_bins)
    return torch.log(torch.clamp(mel, min=MEL_FLOOR)).float()


def ast_features(waves: list[torch.Tensor] | torch.Tensor, cfg: FbankConfig | None = None) -> torch.Tensor:
    """Waveforms at cfg.sampling_rate -> (N, max_length, num_mel_bins): what an AST reads, as ASTFeatureExtractor
    makes it (each clip's fbank zero-padded or cut to max_length frames, then (x - mean) / (2 std))."""
    cfg = cfg or FbankConfig()
    if isinstance(waves, torch.Tensor) and waves.dim() == 1:
        waves = [waves]
    out = torch.zeros(len(waves), cfg.max_length, cfg.num_mel_bins)
    for i, w in enumerate(waves):
        f = kaldi_fbank(w, cfg.sampling_rate, cfg.num_mel_bins)[: cfg.max_length]
        out[i, : f.shape[0]] = f
    if cfg.do_normalize:
        out = (out - cfg.mean) / (cfg.std * 2)  # AST's choice: half a standard deviation per unit
    return out
