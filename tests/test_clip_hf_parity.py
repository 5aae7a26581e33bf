"""mmlm CLIP == transformers CLIPModel, both directions (load HF dir; export to HF), tiny random weights."""

from __future__ import annotations

import pytest
import torch

import mmlm
from hf_round_trip import hf_round_trip
from mmlm.convert.hf import export_hf

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("kernel_mode")  # fast kernels and reference formulas

CASES = {
    # name: (vision kwargs, text kwargs, projection_dim)
    "quickgelu_p8": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          image_size=32, patch_size=8, hidden_act="quick_gelu"),
                     dict(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu", eos_token_id=299),
                     24),
    "gelu_p4_legacy_eos": (dict(hidden_size=32, intermediate_size=80, num_hidden_layers=3, num_attention_heads=2,
                                image_size=24, patch_size=4, hidden_act="gelu"),
                           dict(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, max_position_embeddings=12, hidden_act="gelu", eos_token_id=2),
                           16),
    "gelu_p16_ctx20": (dict(hidden_size=48, intermediate_size=192, num_hidden_layers=2, num_attention_heads=3,
                            image_size=48, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6),
                       dict(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                            num_attention_heads=8, max_position_embeddings=20, hidden_act="quick_gelu", eos_token_id=499),
                       40),
}


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Perturb every tensor so that a wrong mapping cannot pass by accident (LN weights away from 1, biases from 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
            if name.endswith("logit_scale"):
                p.fill_(2.0)


def _hf_model(case: str, seed: int = 0):
    v, t, e = CASES[case]
    cfg = transformers.CLIPConfig(vision_config=v, text_config=t, projection_dim=e)
    torch.manual_seed(seed)
    model = transformers.CLIPModel(cfg).eval()
    _randomise(model, seed)
    return model


def _inputs(model, batch_text: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    vc, tc = model.config.vision_config, model.config.text_config
    pixels = torch.randn(3, 3, vc.image_size, vc.image_size, generator=g)
    T = tc.max_position_embeddings
    eos = tc.vocab_size - 1 if tc.eos_token_id == 2 else tc.eos_token_id
    ids = torch.randint(3, eos, (batch_text, T), generator=g)
    mask = torch.ones_like(ids)
    for row, length in enumerate([3, T, T // 2, 5][:batch_text]):
        ids[row, length - 1] = eos
        # Padding after EOT: transformers pads with EOS, OpenAI with 0; both must pool identically.
        ids[row, length:] = eos if row % 2 else 0
        mask[row, length:] = 0
    return pixels, ids, mask


def _features(x):
    return x if isinstance(x, torch.Tensor) else x.pooler_output  # transformers 5 returns a ModelOutput


def _assert_same(ours, hf, pixels, ids, mask):
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(pixels), _features(hf.get_image_features(pixel_values=pixels)),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.encode_text(ids), _features(hf.get_text_features(input_ids=ids)), atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.encode_text(ids, mask),
                                   _features(hf.get_text_features(input_ids=ids, attention_mask=mask)), atol=1e-5, rtol=0)
        out, ref = ours(pixel_values=pixels, input_ids=ids), hf(pixel_values=pixels, input_ids=ids)
        torch.testing.assert_close(out.logits_per_image, ref.logits_per_image, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.logits_per_text, ref.logits_per_text, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_hf_directory_matches_transformers(case, tmp_path):
    hf = _hf_model(case)
    hf.save_pretrained(tmp_path / "hf")
    ours = mmlm.load(tmp_path / "hf")
    assert not ours.training and next(ours.parameters()).dtype == torch.float32
    _assert_same(ours, hf, *_inputs(hf))


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_hf_round_trip(case, tmp_path):
    hf = _hf_model(case, seed=3)
    ours, again = hf_round_trip(hf, tmp_path, transformers.CLIPModel)
    _assert_same(ours, again, *_inputs(hf))
    # Every tensor survives the trip unchanged.
    for k, v in hf.state_dict().items():
        if not k.endswith("position_ids"):
            torch.testing.assert_close(again.state_dict()[k], v, atol=0, rtol=0)


def test_export_refuses_resnet(tmp_path):
    from mmlm.config import clip_preset
    from mmlm.models.clip import CLIP

    with pytest.raises(ValueError, match="ModifiedResNet"):
        export_hf(CLIP(clip_preset("tiny-rn")), tmp_path / "x")
