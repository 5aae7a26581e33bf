"""The video tower: an image CLIP per frame, then temporal fusion (mean, or ActionCLIP's temporal Transformer)."""

from __future__ import annotations

import pytest
import torch

import mmlm
from mmlm.config import TemporalConfig, clip_preset
from mmlm.models.clip import CLIP
from mmlm.models.video import VideoCLIP


def _image_clip(preset: str = "tiny-vit", seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(clip_preset(preset)).eval()


def _video(B: int = 2, T: int = 4, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, T, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", ["tiny-vit", "tiny-rn"])
def test_one_frame_with_mean_fusion_is_the_image_clip(preset):
    clip = _image_clip(preset)
    video = VideoCLIP.from_image_clip(clip, TemporalConfig(fusion="mean")).eval()
    size = clip.config.vision.image_size
    frames = _video(3, 1, size)
    with torch.no_grad():
        want = clip.encode_image(frames[:, 0])
        got = video.encode_video(frames)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        # a still video (the same frame T times) is the image too
        torch.testing.assert_close(video.encode_video(frames.expand(3, 5, -1, -1, -1)), want, atol=1e-6, rtol=1e-6)
        # the text tower and the image path are the image CLIP's
        ids = torch.randint(0, 998, (2, 16))
        torch.testing.assert_close(video.encode_text(ids), clip.encode_text(ids), atol=0, rtol=0)


def test_order_matters_to_the_temporal_transformer_not_to_the_mean():
    clip = _image_clip()
    frames = _video(2, 6)
    reversed_frames = frames.flip(1)
    with torch.no_grad():
        mean = VideoCLIP.from_image_clip(clip, TemporalConfig(fusion="mean")).eval()
        torch.testing.assert_close(mean.encode_video(reversed_frames), mean.encode_video(frames), atol=1e-6, rtol=1e-5)
        transf = VideoCLIP.from_image_clip(clip, TemporalConfig(fusion="transformer", frames=8, layers=2)).eval()
        # ActionCLIP's init (N(0, 0.02)) leaves the Transformer's share tiny: give it weights a trained model has
        g = torch.Generator().manual_seed(2)
        for p in transf.temporal.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
        a, b = transf.encode_video(frames), transf.encode_video(reversed_frames)
        assert (a - b).abs().max() > 1e-4, "the temporal Transformer gave the same output for reversed frames"


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    video = VideoCLIP.from_image_clip(_image_clip(), TemporalConfig(fusion="transformer", frames=4)).train()
    out = video(video_values=_video(3, 4), input_ids=torch.randint(0, 998, (3, 16)))
    labels = torch.arange(3)
    loss = torch.nn.functional.cross_entropy(out.logits_per_image, labels) + \
        torch.nn.functional.cross_entropy(out.logits_per_text, labels)
    loss.backward()
    none = [n for n, p in video.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not none, f"no gradient for {none}"


def test_save_load_round_trip_and_errors(tmp_path):
    video = VideoCLIP.from_image_clip(_image_clip(), TemporalConfig(fusion="transformer", frames=4)).eval()
    mmlm.save(video, tmp_path / "v")
    loaded = mmlm.load(tmp_path / "v")
    assert isinstance(loaded, VideoCLIP) and loaded.config == video.config
    frames = _video(2, 3)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_video(frames), video.encode_video(frames), atol=0, rtol=0)
    with pytest.raises(ValueError, match="temporal.frames"):
        video.encode_video(_video(1, 5))
    with pytest.raises(ValueError, match=r"\(B, T, C, H, W\)"):
        video.encode_video(frames[:, 0])
    with pytest.raises(ValueError, match="exactly one"):
        video(input_ids=torch.zeros(1, 16, dtype=torch.long))


def test_position_embeddings_start_at_the_asked_scale():
    """`vision.pos_init_std` (the video recipe's 1.0) sets the ViT's position init; 0 keeps OpenAI's width^-1/2;
    the temporal Transformer's frame positions start at N(0, 1)."""
    from mmlm.config import ViTConfig

    torch.manual_seed(0)
    openai = CLIP(clip_preset("tiny-vit")).visual.pos_embed
    cfg = clip_preset("tiny-vit")
    cfg.vision.pos_init_std = 1.0
    video = VideoCLIP.from_image_clip(CLIP(cfg), TemporalConfig(fusion="transformer", frames=8))
    assert abs(openai.std().item() - 64**-0.5) < 0.03
    assert abs(video.visual.pos_embed.std().item() - 1.0) < 0.15
    assert abs(video.temporal.frame_pos.std().item() - 1.0) < 0.15
    with pytest.raises(ValueError, match="pos_init_std"):
        ViTConfig(image_size=32, patch_size=8, width=64, layers=1, heads=4, pos_init_std=-1)
