"""Weight-only int8/int4 quantization (mmlm.quantize): what each layer computes, what a quantized model decodes.

The SmolLM2 GGUF checks (its Q4_1 blocks kept at their own precision, the same greedy answers as float32) are in
tests/test_gguf_smollm2.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mmlm
from mmlm.config import LMConfig
from mmlm.models.lm import LM
from mmlm.quant import GROUP, QuantLinear, is_quantized

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"),
                                reason="this torch lacks the CPU weight-only kernels")


@pytest.fixture(autouse=True, params=["native", "torch-kernels"])
def kernels(request, monkeypatch):
    """Every test twice: with mmlm's compiled loops (mmlm/native.py) and with PyTorch's kernels, what a machine
    without a C compiler runs."""
    from mmlm import native

    if request.param == "torch-kernels":
        monkeypatch.setattr(native, "kernels", lambda: None)
    elif native.kernels() is None:
        pytest.skip(f"no compiled loops: {native.error()}")
    return request.param


def _effective_weight(layer: nn.Module, in_features: int) -> torch.Tensor:
    """The (out, in) matrix a layer applies, read back through the identity (exact in bfloat16)."""
    with torch.no_grad():
        return layer(torch.eye(in_features)).T


def _linear(out_f: int, in_f: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    nn.init.normal_(lin.weight, std=0.05)
    return lin


def test_int8_is_per_row_rounding():
    lin = _linear(48, 64, bias=False)
    w = lin.weight.detach()
    eff = _effective_weight(QuantLinear(lin, 8), 64)
    step = w.abs().amax(1, keepdim=True) / 127  # one int8 step of each row
    # half a step of rounding, plus bfloat16's (8 significant bits) on the scale and on the output
    assert bool(((eff - w).abs() <= step / 2 + w.abs().amax(1, keepdim=True) * 2 ** -7).all())
    assert (eff - w).abs().mean() / w.abs().mean() < 0.01


def test_int4_keeps_a_4bit_grid_exactly():
    """Weights already on a Q4_1 grid (per 32: scale * code + min, codes 0..15 all used) come back to bfloat16
    precision; ordinary Gaussian weights lose ~8% (what 16 levels per group cost)."""
    torch.manual_seed(1)
    out_f, in_f = 32, 4 * GROUP
    scale = torch.rand(out_f, in_f // GROUP, 1) * 0.01 + 0.001
    low = -torch.rand(out_f, in_f // GROUP, 1) * 0.05
    codes = torch.randint(0, 16, (out_f, in_f // GROUP, GROUP))
    codes[..., 0], codes[..., 1] = 0, 15  # the block's min and max are on the grid, as llama.cpp's Q4_1 makes them
    grid = (scale * codes + low).view(out_f, in_f)
    lin = nn.Linear(in_f, out_f, bias=False)
    lin.weight.data.copy_(grid)
    eff = _effective_weight(QuantLinear(lin, 4), in_f)
    assert (eff - grid).abs().mean() / grid.abs().mean() < 0.006
    gauss = _linear(out_f, in_f, bias=False)
    err = (_effective_weight(QuantLinear(gauss, 4), in_f) - gauss.weight).abs().mean() / gauss.weight.abs().mean()
    assert 0.03 < err < 0.15


def test_quant_linear_keeps_bias_shape_and_dtype():
    lin = _linear(32, 64)
    x = torch.randn(2, 3, 64)
    for bits in (8, 4):
        q = QuantLinear(lin, bits)
        y = q(x)
        assert y.shape == (2, 3, 32) and y.dtype == torch.float32
        ref = lin(x)
        assert (y - ref).norm() / ref.norm() < (0.02 if bits == 8 else 0.15)
    q8, many = QuantLinear(lin, 8), torch.randn(100, 64)  # over DENSE_ROWS: the dequantized-GEMM path
    torch.testing.assert_close(q8(many), torch.cat([q8(many[i:i + 10]) for i in range(0, 100, 10)]), atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="int4 needs"):
        QuantLinear(_linear(30, 64), 4)  # 30 output rows: not a multiple of 16


def _tiny_lm(seed: int = 0, sharp: float = 20.0) -> LM:
    torch.manual_seed(seed)
    lm = LM(LMConfig(vocab_size=256, width=64, layers=2, heads=4, kv_heads=2, mlp_dim=160, max_seq_len=96))
    with torch.no_grad():
        lm.lm_head.weight.mul_(sharp)  # decisive argmaxes: greedy choices are not near-ties
    return lm.eval()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_lm_close_to_float_and_cache_consistent(mode):
    lm = _tiny_lm()
    q = mmlm.quantize(copy.deepcopy(lm), mode)
    assert is_quantized(q) and q.quantized == mode and not is_quantized(lm)
    kinds = {m.bits for m in q.modules() if isinstance(m, QuantLinear)}
    assert kinds == ({8} if mode == "int8" else {4, 8})  # int4: fc2 (160 in) does not fit groups of 32 -> int8
    ids = torch.randint(3, 256, (3, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # left padding
    with torch.no_grad():
        a, b = lm(ids, attention_mask=mask).logits, q(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (a[real].argmax(-1) == b[real].argmax(-1)).float().mean() >= 0.9
    assert (a - b)[real].abs().max() / a[real].abs().max() < (0.05 if mode == "int8" else 0.15)
    # the cached decoding of the quantized model is its own full forward, token by token
    new = mmlm.generate(q, ids, mask, max_new_tokens=12, eos_token_id=[])
    full_ids, full_mask = torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1)
    with torch.no_grad():
        full = q(full_ids, attention_mask=full_mask).logits[:, ids.shape[1] - 1: -1].argmax(-1)
    assert torch.equal(full, new)


def test_quantized_llava_with_tied_embeddings_and_lora(tmp_path):
    from mmlm.config import LlavaConfig, ViTConfig
    from mmlm.models.llava import Llava

    lm_cfg = LMConfig(vocab_size=96, width=64, layers=2, heads=4, kv_heads=2, mlp_dim=128, max_seq_len=128,
                      tie_embeddings=True)
    torch.manual_seed(0)
    model = Llava(LlavaConfig(vision=ViTConfig(image_size=16, patch_size=8, width=32, layers=2, heads=4), lm=lm_cfg,
                              image_token_id=95)).eval()
    model.add_lora(4, 8.0)
    with torch.no_grad():
        model.lm.embed.weight.mul_(20)
        for m in model.lm.modules():
            if hasattr(m, "lora_b"):
                m.lora_b.normal_(std=0.05)  # a real update to fold in
    merged = copy.deepcopy(model.lm.blocks[0].attn.qkv).merged_weight().detach()
    ids = torch.tensor([[5, 6] + [95] * model.config.image_tokens + [7, 8, 9]])
    pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids, pixel_values=pixels).logits
    mmlm.quantize(model, "int4")
    qkv = model.lm.blocks[0].attn.qkv
    assert isinstance(qkv, QuantLinear) and qkv.bits == 4
    assert (_effective_weight(qkv, 64) - merged).abs().mean() / merged.abs().mean() < 0.15  # LoRA folded in
    assert not is_quantized(model.vision) and not is_quantized(model.projector)  # run once per image: left float
    assert model.lm.embed.weight.dtype == torch.float32 and isinstance(model.lm.lm_head, QuantLinear)  # tie split
    with torch.no_grad():
        got = model(ids, pixel_values=pixels).logits
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8
    new = mmlm.generate(model, ids, pixel_values=pixels, max_new_tokens=6, eos_token_id=[])
    with torch.no_grad():
        full = model(torch.cat([ids, new], 1), pixel_values=pixels).logits[:, ids.shape[1] - 1: -1].argmax(-1)
    assert torch.equal(full, new)
    with pytest.raises(ValueError, match="quantized"):
        mmlm.save(model, tmp_path / "q")


def test_quantize_refuses_clip_and_unknown_modes():
    from mmlm.config import clip_preset
    from mmlm.models.clip import CLIP

    with pytest.raises(ValueError, match="language model"):
        mmlm.quantize(CLIP(clip_preset("tiny-vit")), "int8")  # a tiny CLIP: building ViT-B/32 took seconds
    with pytest.raises(ValueError, match="unknown quantization"):
        mmlm.quantize(_tiny_lm(), "int2")
    with pytest.raises(ValueError, match="already quantized"):
        mmlm.quantize(mmlm.quantize(_tiny_lm(), "int8"), "int4")


def test_auto_weights_keeps_what_is_loaded_unless_the_file_is_a_quantized_gguf(tmp_path):
    from mmlm.formats import auto_weights, stored_weights

    lm = _tiny_lm()
    mmlm.save(lm, tmp_path / "lm")
    assert stored_weights(tmp_path / "lm") is None  # a checkpoint directory: float weights
    assert auto_weights("auto", tmp_path / "lm", lm) is None
    assert auto_weights("none", tmp_path / "lm", lm) is None and auto_weights(None, tmp_path / "lm", lm) is None
    assert auto_weights("int8", tmp_path / "lm", lm) == "int8"
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ValueError, match="fake.gguf"):
        stored_weights(tmp_path / "fake.gguf")  # a broken file is an error, not silently "float"
