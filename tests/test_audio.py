"""The audio tower: mmlm's AST == transformers' ASTModel / ASTForAudioClassification; Kaldi log-mel features ==
ASTFeatureExtractor (its numpy path); the audio-text CLIP trains."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmlm
from mmlm.config import ASTConfig, AudioCLIPConfig, TextConfig
from mmlm.convert.hf import export_hf
from mmlm.data.fbank import FbankConfig, ast_features, kaldi_fbank
from mmlm.models.audio import AudioCLIP, AudioSpectrogramTransformer

transformers = pytest.importorskip("transformers")

CASES = {
    # overlapping patches, frequency stride 4 != time stride 6, exact GELU
    "f4_t6": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, num_mel_bins=24,
                  max_length=30, patch_size=8, frequency_stride=4, time_stride=6),
    # non-overlapping in time (stride = patch), tanh GELU, other eps
    "f3_t8_tanh": dict(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=40,
                       num_mel_bins=16, max_length=40, patch_size=8, frequency_stride=3, time_stride=8,
                       hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
}


def _hf(case: str, classifier: bool, seed: int = 0):
    cfg = transformers.ASTConfig(**CASES[case], num_labels=5)
    torch.manual_seed(seed)
    model = (transformers.ASTForAudioClassification if classifier else transformers.ASTModel)(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # tokens, positions and LayerNorms away from their init: a wrong mapping cannot pass
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.usefixtures("kernel_mode")
@pytest.mark.parametrize("classifier", [False, True], ids=["ASTModel", "ASTForAudioClassification"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_ast_parity(tmp_path, case, classifier):
    hf = _hf(case, classifier)
    hf.save_pretrained(tmp_path / "hf")
    ours = mmlm.load(tmp_path / "hf")
    assert isinstance(ours, AudioSpectrogramTransformer)
    c = CASES[case]
    x = torch.randn(3, c["max_length"], c["num_mel_bins"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = hf(x), ours(x)
        if classifier:
            torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4)
            want = hf.audio_spectrogram_transformer(x)
        torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-4, rtol=1e-4)
    # and back: mmlm's export opens in transformers with the same outputs
    export_hf(ours, tmp_path / "back")
    again = (transformers.ASTForAudioClassification if classifier else transformers.ASTModel).from_pretrained(
        tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x).last_hidden_state if not classifier else again(x).logits,
                                   got.last_hidden_state if not classifier else got.logits, atol=1e-4, rtol=1e-4)


def test_ast_load_is_strict_and_shapes_are_checked(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = _hf("f4_t6", classifier=False)
    hf.save_pretrained(tmp_path / "hf")
    sd = load_file(tmp_path / "hf" / "model.safetensors")
    del sd["encoder.layer.1.output.dense.bias"]
    save_file(sd, tmp_path / "hf" / "model.safetensors")
    with pytest.raises((KeyError, ValueError), match=r"missing.*transformer.blocks.1.mlp.fc2.bias"):
        mmlm.load(tmp_path / "hf")
    ast = AudioSpectrogramTransformer(ASTConfig(num_mel_bins=24, max_length=30, patch_size=8, width=32, layers=1,
                                                heads=4))
    with pytest.raises(ValueError, match="30 frames, 24 mel bins"):
        ast(torch.zeros(1, 31, 24))


def _waves() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.arange(12_000) / 16_000
    chirp = np.sin(2 * np.pi * (300 * t + 2000 * t**2)).astype(np.float32) * 0.5
    return [rng.standard_normal(16_000).astype(np.float32) * 0.1, chirp, chirp[:3000]]


@pytest.mark.parametrize("mel_bins,max_length", [(128, 100), (64, 40)])
def test_features_equal_ast_feature_extractor(mel_bins, max_length):
    """ASTFeatureExtractor without torchaudio (its numpy path) is the reference; with torchaudio installed it
    calls torchaudio.compliance.kaldi.fbank instead, which this test cannot reach."""
    import transformers.models.audio_spectrogram_transformer.feature_extraction_audio_spectrogram_transformer as m

    if m.is_speech_available():
        pytest.skip("torchaudio is installed: ASTFeatureExtractor takes its torchaudio path")
    fe = transformers.ASTFeatureExtractor(num_mel_bins=mel_bins, max_length=max_length)
    waves = _waves()
    want = fe(waves, sampling_rate=16_000, return_tensors="pt").input_values
    got = ast_features([torch.from_numpy(w) for w in waves], FbankConfig(num_mel_bins=mel_bins, max_length=max_length))
    assert got.shape == want.shape == (3, max_length, mel_bins)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="shorter than one 400-sample frame"):
        kaldi_fbank(torch.zeros(100))


def test_audio_clip_gradients_and_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = AudioCLIPConfig(embed_dim=16, audio=ASTConfig(num_mel_bins=16, max_length=24, patch_size=8,
                                                        frequency_stride=4, time_stride=4, width=32, layers=1, heads=4),
                          text=TextConfig(vocab_size=100, eot_token_id=99, context_length=8, width=32, layers=1,
                                          heads=4))
    model = AudioCLIP(cfg).train()
    feats = torch.randn(3, 24, 16)
    ids = torch.randint(0, 99, (3, 8))
    out = model(feats, ids)
    labels = torch.arange(3)
    loss = torch.nn.functional.cross_entropy(out.logits_per_image, labels) + \
        torch.nn.functional.cross_entropy(out.logits_per_text, labels)
    loss.backward()
    none = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not none, f"no gradient for {none}"
    mmlm.save(model.eval(), tmp_path / "a")
    loaded = mmlm.load(tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_audio(feats), model.encode_audio(feats), atol=0, rtol=0)
        assert loaded.encode_audio(feats).shape == (3, 16)
    # an AST checkpoint as the audio tower
    ast = AudioSpectrogramTransformer(cfg.audio)
    started = AudioCLIP.from_pretrained_towers(cfg, ast=ast)
    with torch.no_grad():
        torch.testing.assert_close(started.audio(feats).pooler_output, ast(feats).pooler_output, atol=0, rtol=0)
