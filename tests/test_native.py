"""mmlm's compiled loops (`csrc/weight_only.c` through `mmlm.native`) against their plain formulas: the int4 and int8
matmuls, RMSNorm, one-query, many-query and tiled attention, GEGLU, a float32 matmul (and GEGLU in it), GroupNorm + SiLU,
Winograd's convolution, and a whole quantized decoding step against `LM.decode_step`'s own loop.
Each check runs on the library as built for this machine (-march=native: AVX-512 VNNI or AVX2 loops), on an AVX2
build where the CPU has AVX2 and the native build is not already that, and on a plain-C build of the same file
(what a CPU without those instructions runs)."""

from __future__ import annotations

import copy

import pytest
import torch

import mmlm
from mmlm import native
from mmlm.config import LMConfig
from mmlm.models.kernels.attention import attention_reference
from mmlm.models.kernels.norms import rms_norm_reference
from mmlm.models.lm import LM
from mmlm.quant import (QuantLinear, pack_q4_1, q4_1_reference, quantize_q4_1, round_to_int8_blocks,
                        unpack_q4_1)

pytestmark = pytest.mark.skipif(native.kernels() is None, reason=f"no compiled loops: {native.error()}")


def _cpu_has(*flags: str) -> bool:
    return set(flags) <= set(native._cpu().split())


@pytest.fixture(scope="module", params=["native", "avx2", "plain-c"])
def lib(request):
    if request.param == "native":
        return native.kernels()
    if request.param == "avx2":
        if not _cpu_has("avx2", "fma", "f16c"):
            pytest.skip("this CPU has no AVX2 (with FMA and F16C)")
        if native.kernels().mmlm_simd() == 1:
            pytest.skip("the native build is the AVX2 one")
        built = native.load(native.build(native._compiler(), [["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"]]))
        assert built.mmlm_simd() == 1
        return built
    return native.load(native.build(native._compiler(), [["-O2"]]))  # no -march: no SIMD path


def test_native_build_takes_the_widest_loops_this_cpu_has():
    """-march=native picks AVX-512 VNNI where the CPU has it, else AVX2 (+FMA, F16C), else the plain C loops."""
    level = native.kernels().mmlm_simd()
    if _cpu_has("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c"):
        assert level == 2
    elif _cpu_has("avx2", "fma", "f16c"):
        assert level == 1
    elif native._cpu().startswith("flags"):  # an x86 CPU with neither
        assert level == 0


@pytest.mark.parametrize("out_f,in_f", [(48, 64), (16, 96), (32, 160), (64, 576)])  # 2, 3, 5, 18 blocks per row
@pytest.mark.parametrize("rows", [1, 3, 8, 11])
def test_q4_1_matmul_is_its_formula(lib, out_f, in_f, rows):
    """Blocks in groups of four and the 1-3 after them, 1 to 11 rows (8 share one pass over the weights, then 3):
    y = round_to_int8_blocks(x) W^T to float32 rounding; packing is lossless."""
    torch.manual_seed(rows)
    w = torch.randn(out_f, in_f) * 0.05
    codes, d, m = quantize_q4_1(w)
    blocks = pack_q4_1(codes, d, m)
    assert blocks.shape == (out_f, in_f // 32 * 20)
    for a, b in zip(unpack_q4_1(blocks, out_f, in_f), (codes, d, m)):
        assert torch.equal(a, b)
    x = torch.randn(rows, in_f)
    x[0, :32] = 0  # an all-zero block: dx = 0
    got = native.q4_1_matmul(x, blocks, out_f, lib=lib)
    torch.testing.assert_close(got, q4_1_reference(x, codes, d, m), atol=2e-5, rtol=1e-5)
    # the weights are the Q4_1 grid (within a step of w); the input within half a step of its second digit
    assert ((codes.float() * d.float()[..., None] + m.float()[..., None]).view(out_f, in_f) - w).abs().max() \
        <= d.float().max() * 0.51 + 1e-3
    step = x.view(rows, -1, 32).abs().amax(-1, keepdim=True) / 127
    assert ((round_to_int8_blocks(x) - x).view(rows, -1, 32).abs() <= step / 254 * 0.51 + 1e-6).all()  # 2 digits


def test_int8_matmul_and_dequantize_are_their_formulas(lib):
    """int8 rows: x as two int8 digits per block where in_features % 32 == 0 (the VNNI loop: 64 bytes at a time,
    then a lone block), float32 x otherwise (six 16-wide steps and a tail of 4)."""
    torch.manual_seed(0)
    for in_f, rounded in ((100, False), (96, True), (128, True)):
        q8 = QuantLinear(torch.nn.Linear(in_f, 40, bias=False), 8)
        for rows in (1, 5, 9):
            x = torch.randn(rows, in_f)
            xr = round_to_int8_blocks(x) if rounded else x
            want = xr.double() @ (q8.qweight.double() * q8.scales.double()[:, None]).T
            torch.testing.assert_close(native.int8_matmul(x, q8.qweight, q8.scales, lib=lib).double(), want,
                                       atol=2e-5, rtol=1e-5)
            torch.testing.assert_close(q8.reference_forward(x).double(), want, atol=2e-5, rtol=1e-5)
    q4 = QuantLinear(torch.nn.Linear(160, 32), 4)
    codes, d, m = unpack_q4_1(q4.blocks, 32, 160)
    dense = (codes.float() * d.float()[..., None] + m.float()[..., None]).view(32, 160)
    assert torch.equal(native.q4_1_dequantize(q4.blocks, 32, 160, torch.float32), dense)
    assert torch.equal(native.q4_1_dequantize(q4.blocks, 32, 160), dense.to(torch.bfloat16))


def test_rms_norm_is_its_formula(lib):
    torch.manual_seed(0)
    x, w = torch.randn(3, 5, 72), torch.randn(72)
    torch.testing.assert_close(native.rms_norm(x, w, 1e-5, lib=lib), rms_norm_reference(x, w, 1e-5))


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_one_query_attention_is_its_formula(lib, heads, kv_heads):
    """One query per row over a cache's filled slots (strided views), grouped-query heads, a per-row key mask
    (left padding) or a shared one or none; 7 keys (the softmax's scalar loop) and 19 (eight at a time, then 3)."""
    torch.manual_seed(heads)
    B, d = 3, 16
    for S in (7, 19):
        q = torch.randn(B, 1, heads + 2 * kv_heads, d).transpose(1, 2)[:, :heads]  # the projection's view
        cache_k, cache_v = torch.randn(B, kv_heads, 24, d) * 3, torch.randn(B, kv_heads, 24, d)
        k, v = cache_k[:, :, :S], cache_v[:, :, :S]
        keys = torch.ones(B, 24, dtype=torch.bool)
        keys[1, :3] = keys[2, :5] = False
        for mask in (keys[:, None, None, :S], keys[:1, None, None, :S], None):
            want = attention_reference(q, k, v, mask, False)
            got = native.decode_attention(q, k, v, None if mask is None else mask[:, 0, 0], lib=lib)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("d", [4, 5, 8, 16, 32])
def test_many_query_attention_is_its_formula(lib, d):
    """Unmasked attention over many queries (a UNet's self- and cross-attention): q, k, v as strided views of
    (B, N, H, d) projections, keys a multiple of 32, of 8 and neither (the padded tail), head dims the AVX2 loop
    unrolls (4, 8, 16, 32) and one it does not; nine queries (d = 4 takes them in pairs: four and one left over);
    scores far apart (one key dominating) stay finite."""
    torch.manual_seed(d)
    B, H, T = 2, 3, 9
    for S in (64, 40, 13, 1):
        q = torch.randn(B, T, H, d).transpose(1, 2)
        k, v = (torch.randn(B, S, 2 * H, d).transpose(1, 2)[:, ::2] for _ in range(2))
        for scale in (1.0, 30.0):
            got = native.attention(q * scale, k, v, lib=lib)
            want = attention_reference(q * scale, k, v, None, False)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("d", [16, 40, 64, 80])
@pytest.mark.parametrize("causal", [False, True])
def test_tiled_attention_is_its_formula(lib, d, causal):
    """Unmasked or causal attention in blocks of queries and keys: q, k, v as strided views of a fused (B, T, 3 H,
    d) projection (cross-attention: k and v of their own length); queries fewer than six, a block of 48 and more
    (a second block, a tail of rows), keys fewer than sixteen, a multiple of it and neither, and more than a block
    of 256 (the softmax carried from block to block); head dims of whole sixteens and not; causal with the T
    queries the last T of S positions; scores far apart stay finite."""
    torch.manual_seed(d + causal)
    B, H = 2, 3
    for T, S in ((1, 1), (5, 13), (17, 17), (50, 50), (50, 64), (7, 100), (60, 600), (600, 600)):
        if causal and T > S:
            continue
        qkv = torch.randn(B, max(T, S), 3 * H, d)
        q = qkv[:, -T:, :H].transpose(1, 2)
        k, v = (qkv[:, :S, i * H:(i + 1) * H].transpose(1, 2) for i in (1, 2))
        for scale in (1.0, 30.0):
            got = native.tiled_attention(q * scale, k, v, causal, lib=lib)
            want = attention_reference(q * scale, k, v, None, causal)
            assert got.shape == want.shape  # scores of ~30 sqrt(d): float32's rounding of them shows in the output
            torch.testing.assert_close(got, want, atol=3e-5 if scale == 1 else 2e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="no more queries than keys"):
        native.tiled_attention(torch.randn(1, 1, 3, 8), torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8), True, lib=lib)


def test_geglu_is_its_formula(lib):
    """h * GELU(gate) for z = [h, gate]: widths the eight-wide loop covers and ones with a tail, gates far into
    both tails (where GELU is ~0 and ~the identity)."""
    torch.manual_seed(0)
    for n in (64, 13):
        z = torch.randn(5, 7, 2 * n) * 4
        h, gate = z.chunk(2, dim=-1)
        torch.testing.assert_close(native.geglu(z, lib=lib), h * torch.nn.functional.gelu(gate), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("cin,cout,size,tiles", [(32, 32, (8, 8), 6), (20, 24, (12, 8), 12), (13, 40, (4, 12), 6)])
def test_winograd_loops_are_the_convolution(lib, cin, cout, size, tiles):
    """A 3x3 convolution (zero padding 1) + bias + shift + skip over channels-last maps, both ways the C file computes
    it: its input and output transforms around a batched matmul, and in one pass `tiles` 4x4 tiles at a time (a
    last block of tiles short of it; output channels short of the padded 16; channel counts with tails past the
    eight-wide vectors)."""
    from mmlm.models.kernels import images

    torch.manual_seed(cin)
    (h, w), n = size, 2
    x, weight = torch.randn(n, h, w, cin), torch.randn(cout, cin, 3, 3) / (3 * cin ** 0.5)
    bias, shift, skip = torch.randn(cout), torch.randn(n, cout), torch.randn(n, h, w, cout)
    want = torch.nn.functional.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=1).permute(0, 2, 3, 1)
    want = want + shift[:, None, None, :] + skip
    u = (images._G @ weight.double() @ images._G.T).float().reshape(cout, cin, 36).permute(2, 1, 0)  # (36, C, O)
    m = torch.bmm(native.winograd_input(x.contiguous(), lib=lib), u)
    torch.testing.assert_close(native.winograd_output(m, (n, h, w), bias, shift, skip, lib=lib), want, atol=5e-5,
                               rtol=1e-5)
    padded = torch.nn.functional.pad(u, (0, -cout % 16)).contiguous()
    torch.testing.assert_close(native.winograd_conv(x, padded, cout, tiles, bias, shift, skip, lib=lib), want,
                               atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(native.winograd_conv(x, padded, cout, tiles, lib=lib), want - shift[:, None, None, :]
                               - skip - bias, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("rows,k,n", [(12, 32, 48), (7, 13, 20), (1, 8, 5), (61, 40, 16), (1091, 64, 40)])
def test_linear_is_its_formula(lib, rows, k, n, monkeypatch):
    """x w^T + bias + residual through the register-tiled matmul, GELU and quick_gelu of x w^T + bias, and h GELU(gate)
    of its [h, gate] (GEGLU's projection): rows past a multiple of six, columns past the panels' sixteen (eight for
    GEGLU), no bias; enough rows for chunks shared among two threads (unequal chunks, a short last one)."""
    from mmlm.models.kernels.mlp import packed_linear

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # what native.linear hands the loop
    torch.manual_seed(rows)
    x, layer, residual = torch.randn(rows, k), torch.nn.Linear(k, n), torch.randn(rows, n)
    w, b = packed_linear(layer)
    want = layer(x).detach()
    torch.testing.assert_close(native.linear(x, w, n, b, residual, lib=lib), want + residual, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(native.linear(x, w, n, lib=lib), want - layer.bias.detach(), atol=1e-5, rtol=1e-5)
    z = want * 3  # activations far into both tails
    w, b = packed_linear(layer)
    w, b = w * 3, b * 3
    torch.testing.assert_close(native.linear(x, w, n, b, act="gelu", lib=lib), torch.nn.functional.gelu(z), atol=2e-5,
                               rtol=1e-5)
    torch.testing.assert_close(native.linear(x, w, n, b, act="quick_gelu", lib=lib), z * torch.sigmoid(1.702 * z),
                               atol=2e-5, rtol=1e-5)
    proj = torch.nn.Linear(k, 2 * n)
    w, b = packed_linear(proj, geglu=True)
    h, gate = proj(x).detach().chunk(2, dim=-1)
    torch.testing.assert_close(native.linear(x, w, n, b, act="geglu", lib=lib), h * torch.nn.functional.gelu(gate),
                               atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("channels,groups", [(32, 8), (12, 3), (20, 5)])
def test_group_norm_silu_is_its_formula(lib, channels, groups):
    """silu(GroupNorm(x)) and GroupNorm alone over channels-last maps: channel counts the eight-wide loop covers
    and ones it leaves a tail of, affine parameters or none, and scales that take SiLU's input to +-300 (its
    exponential's exponent clamped: z and 0 there)."""
    torch.manual_seed(channels)
    x = (torch.randn(2, channels, 6, 5) * 3 + 2).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(channels), torch.randn(channels)
    for weight, bias in ((w, b), (None, None), (w * 100, b)):
        norm = torch.nn.functional.group_norm(x, groups, weight, bias, 1e-5)
        torch.testing.assert_close(native.group_norm_silu(x, groups, weight, bias, 1e-5, lib=lib),
                                   torch.nn.functional.silu(norm), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(native.group_norm_silu(x, groups, weight, bias, 1e-5, silu=False, lib=lib), norm,
                                   atol=2e-5, rtol=1e-5)


def _counted(monkeypatch, name: str):
    """(the attention kernels' module, a list that gets an entry per call of `native.<name>`)."""
    import importlib

    calls = []
    real = getattr(native, name)
    monkeypatch.setattr(native, name, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return importlib.import_module("mmlm.models.kernels.attention"), calls


def test_attention_takes_the_c_loop_for_small_heads_only_without_gradients(monkeypatch):
    """`kernels.attention` hands unmasked small-head attention to the C loop (AVX2 builds) and its values equal
    the formula; with a gradient, a mask or large heads it does not."""
    fast, calls = _counted(monkeypatch, "attention")
    q, k, v = torch.randn(2, 4, 50, 8), torch.randn(2, 4, 20, 8), torch.randn(2, 4, 20, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast.attention(q, k, v), attention_reference(q, k, v, None, False),
                                   atol=2e-5, rtol=1e-5)
    assert len(calls) == (native.kernels().mmlm_simd() == 1)
    calls.clear()
    with torch.no_grad():
        fast.attention(torch.randn(2, 4, 50, 64), torch.randn(2, 4, 20, 64), torch.randn(2, 4, 20, 64))
        fast.attention(q, k, v, attn_mask=torch.ones(50, 20, dtype=torch.bool))
        fast.attention(q, q, q, is_causal=True)
    fast.attention(q.requires_grad_(), k, v)
    assert calls == []


def test_attention_takes_the_tiled_loop_for_few_keys_only_without_gradients(monkeypatch):
    """`kernels.attention` hands unmasked or causal attention with heads of 16 dims or more over at most FEW_KEYS
    keys to the tiled C loop (AVX2 builds), its values the formula's; with a gradient, a mask, more keys, grouped
    k/v heads or smaller heads it does not."""
    fast, calls = _counted(monkeypatch, "tiled_attention")
    q, k, v = torch.randn(2, 4, 17, 64), torch.randn(2, 4, 17, 64), torch.randn(2, 4, 17, 64)
    with torch.no_grad():
        for causal in (False, True):
            torch.testing.assert_close(fast.attention(q, k, v, is_causal=causal),
                                       attention_reference(q, k, v, None, causal), atol=2e-5, rtol=1e-5)
    assert len(calls) == 2 * (native.kernels().mmlm_simd() == 1)
    calls.clear()
    many = torch.randn(1, 4, fast.FEW_KEYS + 1, 64)
    with torch.no_grad():
        fast.attention(q, k, v, attn_mask=torch.ones(17, 17, dtype=torch.bool))
        fast.attention(q, many, many)
        fast.attention(q, k[:, :2], v[:, :2])
        fast.attention(q[..., :8], k[..., :8], v[..., :8], is_causal=True)
    fast.attention(q.requires_grad_(), k, v)
    assert calls == []


def _lm(**kw) -> LM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=128, width=64, layers=2, heads=4, kv_heads=2, head_dim=16, mlp_dim=96, max_seq_len=64)
    model = LM(LMConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)  # norms and biases away from their init
    return model


@pytest.mark.parametrize("mode,kw,window", [("int4", {}, False), ("int4", {"qkv_bias": True, "kv_heads": 4}, False),
                                            ("int8", {"tie_embeddings": True}, False), ("int4", {}, True)])
def test_fused_decoding_step_equals_the_blocks_loop(mode, kw, window, monkeypatch):
    """`LM.decode_step` on a quantized model (each block one compiled call) against the same step through the
    blocks' plain formulas: logits and every cache slot written agree, over left-padded rows and 4 steps; also on
    a window of a larger pool (columns 3.. of 4 rows' buffers, 3 rows), as continuous batching decodes."""
    model = mmlm.quantize(_lm(**kw), mode)
    calls, layer = [], native.decoder_layer
    monkeypatch.setattr(native, "decoder_layer", lambda *a: calls.append(1) or layer(*a))
    ids = torch.randint(3, 128, (3, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[2, :4] = 0
    fused, plain = model.new_cache(3, 12), model.new_cache(3, 12)
    if window:
        fused, plain = ((type(c)([t[:3, :, 3:] for t in c.k], [t[:3, :, 3:] for t in c.v]))
                        for c in (model.new_cache(4, 15), model.new_cache(4, 15)))
    with torch.no_grad():
        for cache in (fused, plain):
            model(ids, attention_mask=mask, cache=cache)
        key_mask = torch.zeros(3, 12, dtype=torch.bool)
        key_mask[:, :6] = mask.bool()
        pos = mask.sum(1, keepdim=True) - 1
        token = torch.randint(3, 128, (3, 1))
        for slot in range(6, 10):
            key_mask[:, slot] = True
            pos = pos + 1
            got = model.decode_step(token, pos, key_mask, fused, slot)
            assert len(calls) == 2 * (slot - 5)  # the compiled step ran, one call per block
            with mmlm.reference_mode():
                want = model.decode_step(token, pos, key_mask, plain, slot)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            for a, b in zip(fused.k + fused.v, plain.k + plain.v):
                torch.testing.assert_close(a[:, :, : slot + 1], b[:, :, : slot + 1], atol=1e-4, rtol=1e-4)
            token = got.argmax(-1, keepdim=True)


def test_fused_decoding_steps_aside_where_it_does_not_apply():
    """A float model, a model with a trainable parameter, and a tensor slot run the blocks as written."""
    from mmlm.models.kernels.decode import decode_step

    float_model = _lm()
    cache = float_model.new_cache(1, 4)
    args = (torch.tensor([[5]]), torch.tensor([[0]]), torch.ones(1, 4, dtype=torch.bool), cache)
    assert decode_step(float_model, *args, 0) is None
    q = mmlm.quantize(copy.deepcopy(float_model), "int4")
    assert decode_step(q, *args, torch.tensor([0])) is None
    assert decode_step(q, *args, 0) is not None
    layers = q.__dict__["_fused_decode"][1]
    assert decode_step(q, *args, 0) is not None and q.__dict__["_fused_decode"][1] is layers  # kept
    q.blocks[1].attn.qkv.blocks = q.blocks[1].attn.qkv.blocks.clone()  # a buffer replaced: the pointers rebuilt
    assert decode_step(q, *args, 0) is not None and q.__dict__["_fused_decode"][1] is not layers
    q.norm.weight.requires_grad_(True)
    assert decode_step(q, *args, 0) is None
    with torch.no_grad():
        assert decode_step(q, *args, 0) is not None
