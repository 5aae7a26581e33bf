"""Model-level properties: gradients reach every parameter, strict loading names offenders, init, config io."""

from __future__ import annotations

import math

import pytest
import torch

import mmlm
from mmlm.checkpoint import load_state_dict_strict
from mmlm.config import CLIPConfig, apply_overrides, clip_preset, to_dict
from mmlm.models.clip import CLIP


def _batch(cfg: CLIPConfig, n: int = 3):
    g = torch.Generator().manual_seed(0)
    s = cfg.vision.image_size
    pixels = torch.randn(n, 3, s, s, generator=g)
    ids = torch.randint(1, cfg.text.eot_token_id, (n, cfg.text.context_length), generator=g)
    for row in range(n):
        length = 3 + row
        ids[row, length - 1] = cfg.text.eot_token_id
        ids[row, length:] = 0
    return pixels, ids


@pytest.mark.parametrize("preset", ["tiny-vit", "tiny-rn"])
def test_every_parameter_gets_a_gradient(preset):
    cfg = clip_preset(preset)
    cfg.logit_bias_init = -10.0
    model = CLIP(cfg).train()
    # OpenAI's init zeroes each bottleneck's last BN weight, which blocks gradients to the convs before it
    # at step 0; perturb so the test sees every path.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    pixels, ids = _batch(cfg)
    # SigLIP's loss: with softmax cross-entropy a shared logit_bias has an exactly zero gradient.
    from mmlm.train.objectives import contrastive_loss

    loss = contrastive_loss("siglip", model.encode_image(pixels), model.encode_text(ids), model.logit_scale,
                            model.logit_bias)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().sum() == 0]
    assert no_grad == []


def test_openai_init():
    model = CLIP(clip_preset("tiny-vit"))
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert model.logit_bias is None
    w = model.config.text.width
    assert model.text.token_embed.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert model.text.transformer.blocks[0].attn.qkv.weight.std().item() == pytest.approx(w**-0.5, rel=0.1)
    rn = CLIP(clip_preset("tiny-rn"))
    assert all(b.bn3.weight.abs().sum() == 0 for b in rn.visual.layer1)


def test_save_load_round_trip(tmp_path):
    model = CLIP(clip_preset("tiny-rn")).eval()
    pixels, ids = _batch(model.config)
    mmlm.save(model, tmp_path / "ck")
    again = mmlm.load(tmp_path / "ck")
    with torch.no_grad():
        torch.testing.assert_close(again(pixels, ids).logits_per_image, model(pixels, ids).logits_per_image, atol=0, rtol=0)


def test_strict_loading_names_the_offending_key(tmp_path):
    model = CLIP(clip_preset("tiny-vit"))
    sd = model.state_dict()
    missing = {k: v for k, v in sd.items() if k != "text.norm_final.bias"}
    with pytest.raises(ValueError, match=r"missing tensor\(s\) \['text.norm_final.bias'\]"):
        load_state_dict_strict(CLIP(clip_preset("tiny-vit")), missing, "x.safetensors")
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) \['visual.extra'\]"):
        load_state_dict_strict(CLIP(clip_preset("tiny-vit")), {**sd, "visual.extra": torch.zeros(1)}, "x")
    bad = dict(sd, **{"visual.proj.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"mis-shaped.*visual.proj.weight"):
        load_state_dict_strict(CLIP(clip_preset("tiny-vit")), bad, "x")
    # Through the public loader too: the error names the file.
    mmlm.save(model, tmp_path / "ck")
    from mmlm.checkpoint import save_tensors

    save_tensors(tmp_path / "ck" / "model.safetensors", missing)
    with pytest.raises(ValueError, match=r"model.safetensors.*text.norm_final.bias"):
        mmlm.load(tmp_path / "ck")


def test_config_round_trip_and_overrides():
    for name in ["RN50", "ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14-336", "tiny-vit", "tiny-rn"]:
        cfg = clip_preset(name)
        assert CLIPConfig.from_dict(to_dict(cfg)) == cfg
    assert clip_preset("ViT-L/14-336").vision.grid == 24
    assert clip_preset("RN50").vision.heads == 32 and clip_preset("RN50").vision.feature_dim == 2048
    d = apply_overrides(to_dict(clip_preset("tiny-vit")), ["vision.width=128", "text.act=gelu"])
    cfg = CLIPConfig.from_dict(d)
    assert cfg.vision.width == 128 and cfg.vision.mlp_dim == 256 and cfg.text.act == "gelu"
    with pytest.raises(ValueError, match="no such field"):
        apply_overrides(to_dict(clip_preset("tiny-vit")), ["vision.widht=3"])
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['colour'\]"):
        CLIPConfig.from_dict({**to_dict(clip_preset("tiny-vit")), "colour": 1})
    with pytest.raises(ValueError, match="'kind' must be one of"):
        CLIPConfig.from_dict({**to_dict(clip_preset("tiny-vit")), "vision": {"kind": "swin"}})
    with pytest.raises(ValueError, match="not a multiple"):
        CLIPConfig.from_dict(apply_overrides(to_dict(clip_preset("tiny-vit")), {"vision.patch_size": 7}))


def test_vit_hidden_states_and_text_pooling_errors():
    model = CLIP(clip_preset("tiny-vit")).eval()
    pixels, ids = _batch(model.config)
    hidden: list[torch.Tensor] = []
    tokens = model.visual.forward_tokens(pixels, hidden_states=hidden)
    assert len(hidden) == model.config.vision.layers + 1 and hidden[-1] is tokens
    assert tokens.shape == (3, 1 + model.config.vision.num_patches, model.config.vision.width)
    model.text.cfg.pool = "eot"
    with pytest.raises(ValueError, match="no end-of-text token"):
        model.encode_text(torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="expects 32x32"):
        model.encode_image(torch.zeros(1, 3, 30, 30))


@pytest.mark.parametrize("with_mask", [False, True])
def test_text_packing_gives_the_padded_features_and_gradients(with_mask, monkeypatch):
    """Packing the tokens up to each row's EOT (text.PACK_BELOW) changes the work, not the numbers."""
    import mmlm.models.text as text

    cfg = clip_preset("tiny-vit")
    model = CLIP(cfg).train()
    g = torch.Generator().manual_seed(1)
    n, T = 6, cfg.text.context_length
    ids = torch.randint(1, cfg.text.eot_token_id, (n, T), generator=g)
    lengths = [3, 9, 4, T, 12, 5]
    for row, length in enumerate(lengths):
        ids[row, length - 1] = cfg.text.eot_token_id
        ids[row, length:] = 0
    mask = (torch.arange(T) < torch.tensor(lengths)[:, None]).long() if with_mask else None
    weights = torch.randn(n, cfg.embed_dim, generator=g)

    def run(pack_below: float):
        monkeypatch.setattr(text, "PACK_BELOW", pack_below)
        model.zero_grad(set_to_none=True)
        out = model.encode_text(ids, attention_mask=mask)
        (out * weights).sum().backward()
        return out.detach(), {k: p.grad.clone() for k, p in model.text.named_parameters()}

    padded, padded_grads = run(0.0)  # never packs
    packed, packed_grads = run(1.0)  # always packs (the rows fill 70 of 6 * 32 slots)
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
    for k, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[k], grad, atol=1e-5, rtol=1e-4, msg=k)


def test_packing_rounds_its_row_count():
    """Packing(multiple=m) keeps every real token and adds dropped ones until the count is a multiple of m (few
    distinct matmul shapes); round_rows pads with zero rows."""
    from mmlm.models.layers import Packing, round_rows

    keep = torch.arange(10)[None] < torch.tensor([[3], [7], [1]])  # 11 real tokens of 30
    p = Packing.from_mask(keep, multiple=8)
    assert len(p.index) == 16 and set(keep.flatten().nonzero().flatten().tolist()) <= set(p.index.tolist())
    assert sorted(p.index.tolist() + p.dropped.tolist()) == list(range(30))
    assert len(Packing.from_mask(keep, multiple=64).index) == 30  # never more than the batch holds
    x = torch.randn(5, 3)
    assert round_rows(x, 4).shape == (8, 3) and torch.equal(round_rows(x, 4)[:5], x) and round_rows(x, 5) is x


@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool", "additive"])
@pytest.mark.parametrize("grad", [True, False])
def test_last_block_computing_only_the_pooled_rows_changes_nothing(mask_kind, grad):
    """Transformer(rows=...) computes one token per row in its last block (the pooled one); its values and the
    gradients of the input and every weight equal running every token and indexing afterwards. grad=False runs
    the inference attention kernel, grad=True the training one."""
    from mmlm.models.layers import Transformer

    torch.manual_seed(0)
    B, T, C = 4, 9, 32
    net = Transformer(C, layers=2, heads=4, mlp_dim=64, act="quick_gelu", norm_eps=1e-5)
    x = torch.randn(B, T, C, requires_grad=grad)
    rows = torch.tensor([0, 8, 3, 5])
    mask, causal = None, mask_kind == "causal"
    if mask_kind in ("bool", "additive"):
        keep = torch.rand(B, 1, T, T) > 0.3
        keep |= torch.eye(T, dtype=torch.bool)
        mask = keep if mask_kind == "bool" else torch.zeros(B, 1, T, T).masked_fill(~keep, float("-inf"))
    with torch.set_grad_enabled(grad):
        full = net(x, attn_mask=mask, is_causal=causal)[torch.arange(B), rows]
        pooled = net(x, attn_mask=mask, is_causal=causal, rows=rows)
    torch.testing.assert_close(pooled, full, atol=1e-6, rtol=1e-5)
    if not grad:
        return
    w = torch.randn(B, C)
    grads = [torch.autograd.grad((out * w).sum(), [x, *net.parameters()]) for out in (full, pooled)]
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_vision_tower_pools_the_class_token_of_every_token():
    """The ViT's pooled output (last block on the class token alone) == every token computed, token 0 read."""
    model = CLIP(clip_preset("tiny-vit")).train()
    pixels, _ = _batch(model.config)
    pooled = model.encode_image(pixels)
    full = model.visual.proj(model.visual.norm_post(model.visual.forward_tokens(pixels)[:, 0]))
    torch.testing.assert_close(pooled, full, atol=1e-6, rtol=1e-5)
    params = list(model.visual.parameters())
    w = torch.randn_like(full)
    for a, b in zip(torch.autograd.grad((full * w).sum(), params), torch.autograd.grad((pooled * w).sum(), params)):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_quick_gelu_mlp_folds_its_scalings_into_the_matmuls():
    """MLP(act="quick_gelu") computes fc2(z * sigmoid(1.702 z)), z = fc1(x), with the 1.702 scalings inside
    the matmuls: same values and gradients as the textbook formula, for (B, T, C) and (N, C) inputs."""
    from mmlm.models.layers import MLP

    torch.manual_seed(0)
    mlp = MLP(16, 48, act="quick_gelu")
    for shape in ((3, 5, 16), (7, 16)):
        x = torch.randn(*shape, requires_grad=True)
        z = mlp.fc1(x)
        ref = mlp.fc2(z * torch.sigmoid(1.702 * z))
        out = mlp(x)
        assert out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
        with torch.no_grad():  # the inference form (scalings as addmm's alpha and beta)
            torch.testing.assert_close(mlp(x), ref, atol=1e-6, rtol=1e-5)
        w = torch.randn_like(ref)
        params = [x, *mlp.parameters()]
        for a, b in zip(torch.autograd.grad((ref * w).sum(), params), torch.autograd.grad((out * w).sum(), params)):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_patch_embedding_is_the_strided_convolution():
    """ViT.embed_patches (one matmul over flattened patches) == the stride-p convolution it replaces."""
    import torch.nn.functional as F

    model = CLIP(clip_preset("tiny-vit"))
    pixels, _ = _batch(model.config)
    conv = F.conv2d(pixels, model.visual.patch_embed.weight, stride=model.config.vision.patch_size)
    torch.testing.assert_close(model.visual.embed_patches(pixels), conv.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_heads,bias,lora", [(4, True, False), (2, False, False), (2, True, False), (4, True, True)])
def test_one_query_attention_equals_the_full_attention_row(kv_heads, bias, lora):
    """Attention(rows=...) never projects keys or values (the query goes back to the input width); with grouped
    k/v heads, without biases, and through the generic path (a LoRA q/k/v projection) it equals the full
    attention's row, values and gradients, under a padding mask and causality."""
    from mmlm.models.layers import Attention
    from mmlm.models.lora import add_lora

    torch.manual_seed(0)
    B, T, C = 3, 7, 32
    attn = Attention(C, 4, n_kv_heads=kv_heads, qkv_bias=bias)
    if lora:
        add_lora(attn, rank=2, alpha=4)
        torch.nn.init.normal_(attn.qkv.lora_b)
    x = torch.randn(B, T, C, requires_grad=True)
    rows = torch.tensor([6, 2, 4])
    mask = (torch.arange(T) < torch.tensor([7, 5, 5])[:, None])[:, None, None, :]  # (B, 1, 1, T) padded keys
    full = attn(x, attn_mask=mask & torch.ones(T, T, dtype=torch.bool).tril())[torch.arange(B), rows]
    pooled = attn(x, attn_mask=mask, is_causal=True, rows=rows)
    torch.testing.assert_close(pooled, full, atol=1e-6, rtol=1e-5)
    w = torch.randn_like(full)
    params = [x, *attn.parameters()]
    for a, b in zip(torch.autograd.grad((full * w).sum(), params), torch.autograd.grad((pooled * w).sum(), params)):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
