"""Flamingo's connector: gates at 0 leave the LM exact, a token never sees later media, IDEFICS parity of the
resampler, the gated cross-attention block and the media mask, gradients."""

from __future__ import annotations

import pytest
import torch

import mmlm
from mmlm.config import LMConfig
from mmlm.models.flamingo import (FlamingoConnectorConfig, FlamingoLM, GatedCrossAttentionBlock, PerceiverResampler,
                                  media_attention_mask)
from mmlm.convert.hf import export_hf
from mmlm.models.lm import LM

MEDIA = 60  # the media token's id
EOS = 1


def _model(interval: int = 1, only_last: bool = True, gates: float = 0.0, offset: int = 0) -> FlamingoLM:
    torch.manual_seed(0)
    lm = LM(LMConfig(vocab_size=64, width=32, layers=4, heads=4, kv_heads=2, mlp_dim=48, max_seq_len=64,
                     eos_token_id=EOS)).eval()
    cfg = FlamingoConnectorConfig(media_dim=24, latents=3, resampler_depth=2, resampler_heads=2,
                                  resampler_head_dim=8, interval=interval, only_last_media=only_last,
                                  offset=offset)
    model = FlamingoLM(lm, cfg, MEDIA).eval()
    with torch.no_grad():
        for block in model.cross:
            block.alpha_cross_attn.fill_(gates)
            block.alpha_dense.fill_(gates)
    return model


def _batch():
    """Row 0: text, media, text, media, text; row 1: text only then one media at the end; row 2: no media."""
    rows = [[5, 6, MEDIA, 7, 8, 9, MEDIA, 10, 11], [5, 6, 7, 8, 9, 10, 11, MEDIA, 12], [5, 6, 7, 8, 9, 10, 11, 12, 13]]
    ids = torch.tensor(rows)
    media = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(1))  # 3 items, 5 tokens each
    return ids, media


def test_gates_at_zero_give_the_bare_lm_exactly():
    model = _model(interval=2)
    ids, media = _batch()
    with torch.no_grad():
        got = model(ids, media).logits
        bare = model.lm(ids).logits
    assert torch.equal(got, bare)
    assert all(not p.requires_grad for p in model.lm.parameters())


@pytest.mark.parametrize("interval, offset, order", [
    (1, 0, ["x0", "b0", "x1", "b1", "x2", "b2", "x3", "b3"]),
    (2, 0, ["x0", "b0", "b1", "x1", "b2", "b3"]),  # IDEFICS: before blocks 0, 2
    (2, 1, ["b0", "x0", "b1", "b2", "x1", "b3"]),  # OpenFlamingo: before blocks 1, 3
    (3, 2, ["b0", "b1", "x0", "b2", "b3"]),
])
def test_cross_attention_blocks_sit_before_every_interval_th_lm_block_from_offset(interval, offset, order):
    """The gated blocks run before LM blocks offset, offset + interval, ...; with the first one after block 0 no
    gradient is asked of block 0 (its input never depended on a trainable weight)."""
    model = _model(interval=interval, offset=offset, gates=0.5)
    seen = []
    for i, block in enumerate(model.lm.blocks):
        block.register_forward_hook(lambda *_, i=i: seen.append(f"b{i}"))
    for j, block in enumerate(model.cross):
        block.register_forward_hook(lambda *_, j=j: seen.append(f"x{j}"))
    ids, media = _batch()
    model(ids, media)
    assert seen == order
    if offset:
        outputs = []
        model.lm.blocks[0].register_forward_hook(lambda _m, _i, out: outputs.append(out))
        model.train()
        model(ids, media).logits.sum().backward()
        assert not outputs[0].requires_grad and all(p.grad is not None for p in model.cross.parameters())


def test_an_offset_model_does_not_export_to_idefics(tmp_path):
    from mmlm.models.llava import Llava
    from mmlm.serve.tiny import tiny_llava

    model = mmlm.load(tiny_llava(tmp_path / "m", connector="flamingo"))
    cfg = model.config
    cfg.flamingo.interval, cfg.flamingo.offset = 2, 1
    with pytest.raises(ValueError, match="offset 1 cannot export"):
        export_hf(Llava(cfg), tmp_path / "out")
    with pytest.raises(ValueError, match="offset must be in 0..interval - 1 = 1, got 2"):
        FlamingoConnectorConfig(media_dim=8, interval=2, offset=2)


@pytest.mark.parametrize("only_last", [True, False])
def test_a_token_never_sees_media_placed_after_it(only_last):
    model = _model(only_last=only_last, gates=0.7)
    ids, media = _batch()
    changed = media.clone()
    changed[1] += 3.0  # row 0's second item (at position 6)
    with torch.no_grad():
        a, b = model(ids, media).logits, model(ids, changed).logits
    moved = (a - b).abs().amax(dim=-1)  # (B, T)
    assert moved[0, :6].max() == 0  # before the second media token: unchanged
    assert moved[0, 6:].min() > 0  # from it on: it sees it
    assert moved[1:].max() == 0  # other rows never see row 0's media
    # tokens that see no media (row 1 before position 7, row 2) take nothing from any: the same with other media
    with torch.no_grad():
        other = model(ids, torch.randn(media.shape)).logits
    torch.testing.assert_close(a[1, :7], other[1, :7], atol=0, rtol=0)
    torch.testing.assert_close(a[2], other[2], atol=0, rtol=0)
    # the cross-attention after row 0's second item reads the first one's latents only when not only_last
    # (the first still reaches those tokens through the LM's self-attention over the tokens that saw it)
    _, mask = model.media_context(ids, media)  # (B, T, M L), M = 2, L = 3
    assert mask[0, 6:, :3].any() == (not only_last) and mask[0, 6:, 3:].all()
    assert mask[0, 2:6, :3].all() and not mask[0, :2].any() and not mask[0, :6, 3:].any()


def test_media_count_must_match_the_media_tokens():
    model = _model()
    ids, media = _batch()
    with pytest.raises(ValueError, match="3 media tokens .* but 2 media items"):
        model(ids, media[:2])


def test_gradients_reach_the_connector_and_not_the_lm():
    model = _model(interval=2, gates=0.0).train()
    ids, media = _batch()
    model(ids, media).logits.square().mean().backward()
    # at init only the gates learn (the blocks' outputs are multiplied by tanh(0)); the resampler waits for them
    for block in model.cross:
        assert block.alpha_cross_attn.grad.abs().item() > 0
    model.zero_grad()
    with torch.no_grad():
        for block in model.cross:
            block.alpha_cross_attn.fill_(0.5)
            block.alpha_dense.fill_(0.5)
    model(ids, media).logits.square().mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert name.startswith("lm.") and p.grad is None


def test_resampler_gives_a_fixed_number_of_latents():
    r = PerceiverResampler(dim=16, depth=1, heads=2, head_dim=8, n_latents=4)
    for p in (1, 7, 50):
        assert r(torch.randn(3, p, 16)).shape == (3, 4, 16)


# ----------------------------------------------------------------------------- parity with transformers' IDEFICS

transformers = pytest.importorskip("transformers")


def _idefics_config(**kw):
    from transformers.models.idefics.configuration_idefics import IdeficsConfig

    return IdeficsConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, vision_config=dict(embed_dim=24, image_size=16, patch_size=8,
                                                                    num_hidden_layers=1, num_attention_heads=2,
                                                                    intermediate_size=32),
                         perceiver_config=dict(use_resampler=True, resampler_n_latents=3, resampler_depth=2,
                                               resampler_n_heads=2, resampler_head_dim=8), **kw)


def _perturb(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # norms away from 1, biases away from 0: a wrong mapping cannot pass
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


def test_resampler_matches_idefics():
    from transformers.models.idefics.perceiver import IdeficsPerceiverResampler

    cfg = _idefics_config()
    torch.manual_seed(0)
    ref = IdeficsPerceiverResampler(cfg, 24, 2, 2, 8, 3).eval()
    _perturb(ref, 1)
    ours = PerceiverResampler(dim=24, depth=2, heads=2, head_dim=8, n_latents=3)
    ours.load_state_dict(ref.state_dict(), strict=True)  # the same names and shapes
    x = torch.randn(2, 9, 24)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)


def test_gated_cross_attention_matches_idefics():
    from transformers.models.idefics.modeling_idefics import IdeficsGatedCrossAttentionLayer

    cfg = _idefics_config()  # alphas at 0, then perturbed below like every weight
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = IdeficsGatedCrossAttentionLayer(cfg, layer_idx=0).eval()
    _perturb(ref, 2)
    sd = ref.state_dict()
    ours = GatedCrossAttentionBlock(32, 24, 4, 48, cfg.rms_norm_eps)
    mapped = {
        "input_layernorm.weight": sd["input_layernorm.weight"],
        "post_attention_layernorm.weight": sd["post_attention_layernorm.weight"],
        "cross_attn.q.weight": sd["cross_attn.q_proj.weight"],
        "cross_attn.kv.weight": torch.cat([sd["cross_attn.k_proj.weight"], sd["cross_attn.v_proj.weight"]]),
        "cross_attn.proj.weight": sd["cross_attn.o_proj.weight"],
        "mlp.fc1.weight": torch.cat([sd["mlp.gate_proj.weight"], sd["mlp.up_proj.weight"]]),
        "mlp.fc2.weight": sd["mlp.down_proj.weight"],
        "alpha_cross_attn": sd["alpha_cross_attn"], "alpha_dense": sd["alpha_dense"],
    }
    ours.load_state_dict(mapped, strict=True)
    ids, _ = _batch()
    x = torch.randn(3, ids.shape[1], 32)
    media = torch.randn(3, 2 * 3, 24)  # two items of 3 latents per row
    mask = media_attention_mask(ids, MEDIA, 2).repeat_interleave(3, dim=-1)  # (B, T, 6)
    sees = mask.any(-1)
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)[:, None]
    with torch.no_grad():
        want = ref(x, image_hidden_states=media, image_attention_mask=additive, cross_attention_gate=sees.float())
        got = ours(x, media, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("with_eos", [False, True])
def test_media_mask_matches_idefics_processing(with_eos):
    from transformers.models.idefics.processing_idefics import (image_attention_mask_for_packed_input_ids_pt,
                                                                incremental_to_binary_attention_mask)

    class Tok:  # what the processor reads of a tokenizer
        eos_token_id = EOS

        @staticmethod
        def convert_tokens_to_ids(token):
            return MEDIA

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 20, (6, 24), generator=g)
    ids[torch.rand(ids.shape, generator=g) < 0.15] = MEDIA
    if with_eos:
        ids[torch.rand(ids.shape, generator=g) < 0.1] = EOS
    n = int((ids == MEDIA).sum(1).max())
    incremental, _ = image_attention_mask_for_packed_input_ids_pt(ids, Tok)
    want = incremental_to_binary_attention_mask(incremental, "pt", num_classes=n).bool()
    got = media_attention_mask(ids, MEDIA, n, only_last=True, eos_token_id=EOS if with_eos else None)
    if not with_eos:  # the processor always resets at its tokenizer's eos: keep ids free of it
        assert not (ids == EOS).any()
    assert torch.equal(got, want)


@pytest.mark.parametrize("interval", [1, 2])
def test_idefics_directory_loads_with_parity_and_exports_back(tmp_path, interval):
    """A tiny random IdeficsForVisionText2Text (decoupled vocabulary, resampler, gates away from 0) -> mmlm.load ->
    the same logits; mmlm's export -> transformers loads it -> the same logits again."""
    from transformers import IdeficsForVisionText2Text

    import mmlm
    from mmlm.convert.hf import export_hf

    cfg = _idefics_config(additional_vocab_size=2, use_resampler=True, cross_layer_interval=interval)
    cfg.num_hidden_layers = 4
    torch.manual_seed(0)
    ref = IdeficsForVisionText2Text(cfg).eval()
    _perturb(ref, 3)  # the gates too: the media change the answer
    ref.save_pretrained(tmp_path / "idefics")
    ours = mmlm.load(tmp_path / "idefics").eval()
    assert ours.config.connector == "flamingo" and ours.config.lm.vocab_size == 66 and ours.config.image_token_id == 65
    img = 65
    ids = torch.tensor([[5, img, 6, 7, img, 8, 9, 10], [5, 6, 7, img, 8, 9, 64, 11], [5, 6, 7, 8, 9, 10, 11, 12]])
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(4))  # row 0: two, row 1: one
    per_row = torch.zeros(3, 2, 3, 16, 16)  # IDEFICS's (B, images, C, H, W), unused slots zero
    per_row[0, :2], per_row[1, 0] = images[:2], images[2]
    seen = media_attention_mask(ids, img, 2, only_last=True).long()  # (B, T, 2): as IDEFICS's processor makes it
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=per_row, image_attention_mask=seen).logits
        got = ours(ids, pixel_values=images).logits
        assert (want[0] - ref(input_ids=ids, pixel_values=torch.randn(per_row.shape), image_attention_mask=seen)
                .logits[0]).abs().max() > 1e-3  # the images matter
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    export_hf(ours, tmp_path / "out")
    back = IdeficsForVisionText2Text.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        again = back(input_ids=ids, pixel_values=per_row, image_attention_mask=seen).logits
    torch.testing.assert_close(again, want, atol=1e-4, rtol=0)
