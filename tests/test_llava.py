"""mmlm Llava == transformers LlavaForConditionalGeneration (load HF dir, export to HF); the splice; generation."""

from __future__ import annotations

import pytest
import torch

import mmlm
from hf_round_trip import hf_round_trip
from mmlm.config import LlavaConfig, LMConfig, ViTConfig
from mmlm.convert.hf import export_hf
from mmlm.models.llava import Llava
from mmlm.models.lm import position_ids_from_mask

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("kernel_mode")  # fast kernels and reference formulas

IMAGE_ID = 120  # 16 patches of 4x4 on a 16x16 image: 16 image tokens per image with CLS dropped
CASES = {
    # name: LlavaConfig kwargs of transformers (vision_feature_layer, select strategy), text config extras
    "layer-2_drop_cls": (dict(vision_feature_layer=-2, vision_feature_select_strategy="default"), {}),
    "layers_concat_keep_cls_gqa_tied": (dict(vision_feature_layer=[-3, -1], vision_feature_select_strategy="full"),
                                        dict(num_key_value_heads=2, tie_word_embeddings=True)),
}


def _hf_model(case: str, seed: int = 0):
    llava_kw, text_kw = CASES[case]
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=16, patch_size=4)
    text = transformers.LlamaConfig(**{**dict(vocab_size=128, hidden_size=32, intermediate_size=56, num_hidden_layers=2,
                                              num_attention_heads=4, max_position_embeddings=128), **text_kw})
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID,
                                   tie_word_embeddings=text_kw.get("tie_word_embeddings", False), **llava_kw)
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # move norms away from 1 and biases away from 0 so a wrong mapping cannot pass
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _batch(per_image: int, seed: int = 1):
    """Two prompts with one image each, of 7 and 3 text tokens, left-padded to one length."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n_text in (7, 3):
        text = torch.randint(0, 100, (n_text,), generator=g).tolist()
        rows.append(text[:2] + [IMAGE_ID] * per_image + text[2:])
    T = max(map(len, rows))
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = torch.tensor(r), 1
    pixels = torch.randn(2, 3, 16, 16, generator=g)
    return ids, mask, pixels


def _assert_same(ours, hf):
    ids, mask, pixels = _batch(ours.config.image_tokens)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, pixel_values=pixels).logits
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                 pixel_values=pixels).logits
    real = mask.bool()  # logits at padded slots mean nothing in either library
    torch.testing.assert_close(got[real], ref[real], atol=1e-4, rtol=0)
    return (got[real] - ref[real]).abs().max().item()


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_hf_directory_matches_transformers(case, tmp_path):
    hf = _hf_model(case)
    hf.save_pretrained(tmp_path / "hf")
    ours = mmlm.load(tmp_path / "hf")
    assert isinstance(ours, Llava) and not ours.training
    assert ours.config.drop_cls == (CASES[case][0]["vision_feature_select_strategy"] == "default")
    diff = _assert_same(ours, hf)
    print(f"{case}: max |logit diff| {diff:.2e}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_hf_round_trip(case, tmp_path):
    hf = _hf_model(case, seed=3)
    ours, again = hf_round_trip(hf, tmp_path, transformers.LlavaForConditionalGeneration)
    _assert_same(ours, again)
    ref = hf.state_dict()
    for k, v in again.state_dict().items():
        torch.testing.assert_close(v, ref[k], atol=0, rtol=0)


def test_loads_llava_hf_hub_layout(tmp_path):
    """llava-hf checkpoints name tensors `language_model.model.*`, `vision_tower.vision_model.*`: they load too."""
    from safetensors.torch import load_file, save_file

    hf = _hf_model("layer-2_drop_cls", seed=5)
    hf.save_pretrained(tmp_path / "hf")
    sd = load_file(tmp_path / "hf" / "model.safetensors")
    old = {k.replace("vision_tower.", "vision_tower.vision_model.", 1): v for k, v in sd.items()}
    assert any(k.startswith("vision_tower.vision_model.") for k in old)
    save_file(old, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    _assert_same(mmlm.load(tmp_path / "hf"), hf)


def _tiny(projector: str = "mlp2x_gelu", **kw) -> Llava:
    lm = LMConfig(vocab_size=64, width=32, layers=2, heads=4, kv_heads=2, mlp_dim=48, max_seq_len=128, eos_token_id=1)
    cfg = LlavaConfig(vision=ViTConfig(image_size=16, patch_size=8, width=32, layers=2, heads=4), lm=lm,
                      projector=projector, image_token_id=63, **kw)
    torch.manual_seed(0)
    return Llava(cfg)


def _mixed_batch(model: Llava):
    """Row 0 text only, row 1 two images, row 2 one image; right-padded (as training batches are)."""
    n = model.config.image_tokens
    img = [model.config.image_token_id] * n
    rows = [[5, 6, 7, 8, 9], [5] + img + [6] + img + [7], [5, 6] + img + [7, 8, 9, 10]]
    T = max(map(len, rows))
    ids = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return rows, ids, mask, pixels


@pytest.mark.parametrize("projector", ["linear", "mlp2x_gelu"])
def test_mixed_batch_rows_equal_rows_alone(projector):
    """Text-only, two-image and one-image rows in one batch give the logits each row gets alone."""
    model = _tiny(projector).eval()
    rows, ids, mask, pixels = _mixed_batch(model)
    images_of = [pixels[:0], pixels[0:2], pixels[2:3]]
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, pixel_values=pixels).logits
        for i, r in enumerate(rows):
            alone = model(torch.tensor([r]), pixel_values=images_of[i] if len(images_of[i]) else None).logits[0]
            torch.testing.assert_close(batched[i, : len(r)], alone, atol=1e-5, rtol=0)


def test_every_trainable_parameter_gets_a_gradient():
    """Vision frozen (both LLaVA stages): the projector and every LM weight learn; tied and untied heads."""
    model = _tiny(vision_layer=[-2, -1]).train()
    model.vision.requires_grad_(False)
    rows, ids, mask, pixels = _mixed_batch(model)
    logits = model(ids, attention_mask=mask, pixel_values=pixels).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten().clamp(max=62))
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert {n.split(".")[0] for n, _ in trainable} == {"projector", "lm"}
    bad = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert bad == []
    assert all(p.grad is None for p in model.vision.parameters())


def test_image_token_count_mismatch_is_a_clear_error():
    model = _tiny().eval()
    rows, ids, mask, pixels = _mixed_batch(model)
    with pytest.raises(ValueError, match=r"hold 12 image tokens .* 2 image\(s\) give 8 features \(4 per image\)"):
        model(ids, attention_mask=mask, pixel_values=pixels[:2])
    with pytest.raises(ValueError, match="no pixel_values"):
        model(ids, attention_mask=mask)


def test_generate_with_images_equals_greedy_full_forward():
    """Left-padded prompts with 0, 2 and 1 images: cached generation == argmax over repeated full forwards."""
    model = _tiny().eval()
    rows, _, _, pixels = _mixed_batch(model)
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    out = mmlm.generate(model, ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=6, eos_token_id=[])
    assert out.shape == (3, 6)
    seq, m = ids, mask
    with torch.no_grad():
        for step in range(6):
            logits = model(seq, attention_mask=m, pixel_values=pixels).logits[:, -1]
            nxt = logits.argmax(-1)
            assert torch.equal(nxt, out[:, step])
            seq, m = torch.cat([seq, nxt[:, None]], 1), torch.cat([m, torch.ones_like(m[:, :1])], 1)


def test_text_only_model_rejects_images():
    lm = mmlm.models.lm.LM(LMConfig(vocab_size=64, width=32, layers=1, heads=4, mlp_dim=48))
    with pytest.raises(ValueError, match="takes no images"):
        mmlm.generate(lm, torch.tensor([[1, 2]]), pixel_values=torch.zeros(1, 3, 16, 16))


def test_save_load_round_trip_and_config(tmp_path):
    model = _tiny("linear", vision_layer=-1, drop_cls=False).eval()
    mmlm.save(model, tmp_path / "m")
    again = mmlm.load(tmp_path / "m")
    assert again.config == model.config and again.config.image_tokens == 5
    for k, v in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, atol=0, rtol=0)
    with pytest.raises(ValueError, match="cannot export"):
        export_hf(model, tmp_path / "hf")
    with pytest.raises(ValueError, match="vision_layer"):
        LlavaConfig(vision=ViTConfig(image_size=16, patch_size=8, width=32, layers=2, heads=4), vision_layer=5)


def _tiny_resnet(**kw) -> Llava:
    from mmlm.config import ModifiedResNetConfig

    lm = LMConfig(vocab_size=64, width=32, layers=2, heads=4, kv_heads=2, mlp_dim=48, max_seq_len=128, eos_token_id=1)
    cfg = LlavaConfig(vision=ModifiedResNetConfig(image_size=32, layers=(1, 1, 1, 1), width=8), lm=lm,
                      image_token_id=63, **kw)
    torch.manual_seed(0)
    return Llava(cfg)


def test_resnet_tower_reads_a_stage_feature_map_as_tokens():
    """A ModifiedResNet tower: layer -2 is the third stage (stride 16: a 2x2 grid at 32 px, 16*width channels),
    one token per cell in row-major order; mixed batches, gradients and cached generation work as with a ViT."""
    model = _tiny_resnet().eval()
    assert model.config.image_tokens == 4 and model.config.vision_feature_dim == 8 * 16
    assert not any(n.startswith("vision.attn_pool") for n, _ in model.named_parameters())
    rows, ids, mask, _ = _mixed_batch(model)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stage3 = model.vision.forward_stages(pixels)[3]  # (3, 128, 2, 2)
        feats = model.encode_images(pixels)
        torch.testing.assert_close(feats, model.projector(stage3.flatten(2).transpose(1, 2)))
        batched = model(ids, attention_mask=mask, pixel_values=pixels).logits
        alone = model(torch.tensor([rows[2]]), pixel_values=pixels[2:3]).logits[0]
        torch.testing.assert_close(batched[2, : len(rows[2])], alone, atol=1e-5, rtol=0)
    model.train().vision.requires_grad_(False)
    logits = model(ids, attention_mask=mask, pixel_values=pixels).logits
    logits.logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if p.requires_grad)
    model.eval()
    out = mmlm.generate(model, torch.tensor([rows[2]]), pixel_values=pixels[2:3], max_new_tokens=3, eos_token_id=[])
    assert out.shape == (1, 3)
    with pytest.raises(ValueError, match="cannot export"):
        export_hf(model, "/nonexistent/never-written")
    with pytest.raises(ValueError, match="different sizes"):
        _tiny_resnet(vision_layer=[-2, -1])


def test_image_position_embedding(tmp_path):
    """image_pos_embed: one learned row per image-token position, added after the projector (so a convolutional
    tower's tokens say where they lie); it learns with the projector, round-trips, and blocks transformers export."""
    model = _tiny_resnet(image_pos_embed=True)
    pos = model.projector.pos
    assert pos.shape == (model.config.image_tokens, model.config.lm.width)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        without = model.projector.fc2(torch.nn.functional.gelu(model.projector.fc1(
            model.vision.forward_stages(pixels)[3].flatten(2).transpose(1, 2))))
        torch.testing.assert_close(model.encode_images(pixels), without + pos)
    rows, ids, mask, _ = _mixed_batch(model)
    model.train().vision.requires_grad_(False)
    model(ids, attention_mask=mask, pixel_values=torch.cat([pixels, pixels[:1]])).logits.logsumexp(-1).mean().backward()
    assert pos.grad is not None and pos.grad.abs().sum(-1).gt(0).all()  # every position's row learns
    mmlm.save(model.eval(), tmp_path / "m")
    again = mmlm.load(tmp_path / "m")
    assert again.config.image_pos_embed and torch.equal(again.projector.pos, pos)
    vit = _tiny(image_pos_embed=True)
    with pytest.raises(ValueError, match="no image position embedding"):
        export_hf(vit, tmp_path / "hf")

