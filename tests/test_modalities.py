"""Audio, video and table tensors of mmlm.data.modalities: shapes, and the spectrogram against transformers."""

import numpy as np
import pytest
import torch

from mmlm.data.modalities import (TABLE_COLUMNS, log_mel_spectrogram, mel_filterbank, moving_shapes_video,
                                  scene_table, stft_power, tone, video_tensor)
from mmlm.data.shapes import ShapesDataset


def test_stft_equals_torch_stft():
    wave = tone((300.0, 1200.0), seconds=0.25)
    window = torch.hann_window(400, dtype=torch.float64)
    ref = torch.stft(wave.double(), 400, 160, window=window, return_complex=True).abs().square().T
    torch.testing.assert_close(stft_power(wave), ref)


def test_log_mel_equals_transformers():
    audio_utils = pytest.importorskip("transformers.audio_utils")
    wave = tone((440.0,), seconds=0.5, sweep_to=5000.0)
    ref_fb = audio_utils.mel_filter_bank(201, 40, 0.0, 8000.0, 16000, norm=None, mel_scale="htk")
    np.testing.assert_allclose(mel_filterbank(40, 400, 16000).numpy(), ref_fb, atol=1e-12)
    ref = audio_utils.spectrogram(wave.double().numpy(), audio_utils.window_function(400, "hann"), 400, 160,
                                  power=2.0, mel_filters=ref_fb, log_mel="log", mel_floor=1e-10, dtype=np.float64)
    np.testing.assert_allclose(log_mel_spectrogram(wave, n_mels=40).numpy(), ref.T, atol=1e-4)


def test_tone_energy_sits_in_its_mel_band():
    spec = log_mel_spectrogram(torch.stack([tone((500.0,)), tone((3000.0,))]))  # (2, T, 64)
    assert spec.shape == (2, 101, 64)
    low, high = spec.mean(dim=1).argmax(dim=-1).tolist()
    assert low < high  # the higher tone peaks in a higher mel band


def test_video_frames_move():
    frames = moving_shapes_video(n_frames=6, image_size=48, seed=3)
    assert frames.shape == (6, 48, 48, 3) and frames.dtype == np.uint8
    assert not np.array_equal(frames[0], frames[-1])
    assert np.array_equal(frames, moving_shapes_video(n_frames=6, image_size=48, seed=3))
    video = video_tensor(frames)
    assert video.shape == (6, 3, 48, 48) and 0.0 <= video.min() and video.max() <= 1.0


def test_scene_table_rows():
    items = [ShapesDataset("val", 5, 0, 64, n_questions=0)[i] for i in range(5)]
    table = scene_table([it["scene"] for it in items])
    assert table.shape == (5, len(TABLE_COLUMNS))
    assert table[:, 0].tolist() == [float(len(it["scene"].objects)) for it in items]


def test_bad_inputs_are_errors():
    with pytest.raises(ValueError, match="too short"):
        stft_power(torch.zeros(100))
    with pytest.raises(ValueError, match="Nyquist"):
        mel_filterbank(10, 400, 16000, f_max=9000.0)
