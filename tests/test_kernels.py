"""Every fast kernel of models/kernels equals the plain formula it replaces: values and gradients, in float32
and under bf16 autocast; and whole models give the same outputs and gradients in reference mode."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import mmlm
from mmlm.config import LMConfig, clip_preset
from mmlm.models import kernels
from mmlm.models.attention import Attention
from mmlm.models.blocks import MLP, RMSNorm, SwiGLU, Transformer
from mmlm.models.clip import CLIP
from mmlm.models.kernels import pooling
from mmlm.models.lm import LM
from mmlm.models.lora import LoRALinear, add_lora
from mmlm.models.positions import rope_cos_sin, rope_inv_freq


def _run(fn, params, weights=None):
    """fn() in fast and in reference mode -> [(output, grads of params)] for both; None grads where none flow."""
    results = []
    for ref in (False, True):
        with mmlm.reference_mode(ref):
            out = fn()
        if not params:
            results.append((out.detach(), []))
            continue
        w = weights if weights is not None else torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
        grads = torch.autograd.grad((out.float() * w).sum(), params, allow_unused=True)
        results.append((out.detach(), grads))
    return results


def _assert_agree(results, atol=1e-5, rtol=1e-5, grad_scale=False):
    """Outputs within atol/rtol; gradients too, each divided by the reference gradient's largest magnitude
    when `grad_scale` (float32 summation order differs between the paths)."""
    (fast, fast_grads), (ref, ref_grads) = results
    assert fast.dtype == ref.dtype and fast.shape == ref.shape
    torch.testing.assert_close(fast, ref, atol=atol, rtol=rtol)
    for a, b in zip(fast_grads, ref_grads):
        assert (a is None) == (b is None)
        if a is None:
            continue
        scale = b.abs().max().clamp_min(1e-12) if grad_scale else 1.0
        torch.testing.assert_close(a / scale, b / scale, atol=atol, rtol=rtol)


def test_switch_context_manager_and_environment(monkeypatch):
    monkeypatch.delenv("MMLM_REFERENCE", raising=False)
    assert not kernels.reference()
    with mmlm.reference_mode():
        assert kernels.reference()
        with mmlm.reference_mode(False):
            assert not kernels.reference()
        assert kernels.reference()
    assert not kernels.reference()
    monkeypatch.setenv("MMLM_REFERENCE", "1")
    assert kernels.reference()
    with mmlm.reference_mode(False):
        assert not kernels.reference()
    monkeypatch.setenv("MMLM_REFERENCE", "0")
    assert not kernels.reference()


# ----------------------------------------------------------------------------- one kernel at a time

@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("mask_kind,kv_heads,queries", [("none", 4, 6), ("causal", 2, 6), ("causal", 4, 3), ("bool", 1, 6),
                                                      ("additive", 4, 6)])
def test_attention(grad, mask_kind, kv_heads, queries):
    """Every path against the formula; causal with fewer queries than keys: the queries are the last ones (a
    prompt's continuation over a cache), on every path (PyTorch's fused kernel would align them with the first)."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, queries, 8, requires_grad=grad)
    k, v = (torch.randn(2, kv_heads, 6, 8, requires_grad=grad) for _ in range(2))
    mask = None
    if mask_kind in ("bool", "additive"):
        keep = (torch.rand(2, 1, 6, 6) > 0.3) | torch.eye(6, dtype=torch.bool)
        mask = keep if mask_kind == "bool" else torch.zeros(2, 1, 6, 6).masked_fill(~keep, float("-inf"))
    with torch.set_grad_enabled(grad):
        results = _run(lambda: kernels.attention(q, k, v, mask, mask_kind == "causal"), [q, k, v] if grad else [])
    _assert_agree(results)


def test_training_attention_over_many_keys_takes_the_fused_kernel(monkeypatch):
    """With a gradient on a CPU, unmasked attention over MANY_KEYS keys or more (a UNet's over 16 x 16 positions)
    runs PyTorch's fused kernel, its values and gradients the formula's; fewer keys, a mask or causality keep the
    three ops."""
    fast = importlib.import_module("mmlm.models.kernels.attention")
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(fast.F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    torch.manual_seed(0)
    n = fast.MANY_KEYS
    q, k, v = (torch.randn(2, 4, n, 16, requires_grad=True) for _ in range(3))
    _assert_agree(_run(lambda: kernels.attention(q, k, v), [q, k, v]), grad_scale=True)
    assert calls == [1]
    calls.clear()
    few = [t[:, :, : n - 1].detach().requires_grad_() for t in (q, k, v)]
    kernels.attention(*few)
    kernels.attention(q, k, v, is_causal=True)
    kernels.attention(q, k, v, attn_mask=torch.ones(n, n, dtype=torch.bool))
    assert calls == []


def test_rope_in_float64_and_its_gradient():
    """Training rotates with its own backward (the inverse rotation): the formula's values, and the gradient
    passes torch's numerical check."""
    x = torch.randn(2, 7, 3, 16, dtype=torch.float64, requires_grad=True)
    cos, sin = rope_cos_sin(rope_inv_freq(16, 10000.0), torch.arange(7).expand(2, 7) + 3, torch.float64)
    _assert_agree(_run(lambda: kernels.apply_rope(x, cos, sin), [x]), atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda t: kernels.apply_rope(t, cos, sin), (x,))


@pytest.mark.parametrize("autocast,dtype", [(False, torch.float32), (True, torch.float32), (False, torch.float64)])
def test_rms_norm(autocast, dtype):
    """RMSNorm's training function == transformers' formula differentiated op by op, in float32, under bf16
    autocast (the output is in bf16 there: what the next matmul casts it to) and in float64 (which it keeps)."""
    torch.manual_seed(0)
    norm = RMSNorm(48, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    x = (torch.randn(3, 5, 48, dtype=dtype) * 3).requires_grad_()
    outs = []
    for ref in (False, True):
        with mmlm.reference_mode(ref), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = norm(x)
            outs.append(y.to(torch.bfloat16) if autocast else y)  # what the next matmul does under autocast
    assert outs[0].dtype == (torch.bfloat16 if autocast else dtype)
    tol = dict(atol=1e-2, rtol=1e-2) if autocast else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0].to(dtype), outs[1].to(dtype), **tol)
    w = torch.randn(outs[0].shape, dtype=dtype)
    grads = [torch.autograd.grad((y.to(dtype) * w).sum(), [x, norm.weight]) for y in outs]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # the inference path (PyTorch's fused op)
        _assert_agree(_run(lambda: norm(x), []), atol=1e-6)


def test_quick_gelu_mlp_folds_its_scalings_into_the_matmuls():
    """MLP(act="quick_gelu") == fc2(z sigmoid(1.702 z)), z = fc1(x), for (B, T, C) and (N, C) inputs, in the
    training form (scalings on the weights) and the inference form (as addmm's alpha and beta)."""
    torch.manual_seed(0)
    mlp = MLP(16, 48, act="quick_gelu")
    for shape in ((3, 5, 16), (7, 16)):
        x = torch.randn(*shape, requires_grad=True)
        _assert_agree(_run(lambda: mlp(x), [x, *mlp.parameters()]), atol=1e-6)
        with torch.no_grad():
            _assert_agree(_run(lambda: mlp(x), []), atol=1e-6)
    with mmlm.reference_mode():  # the reference is the textbook formula
        z = mlp.fc1(x)
        torch.testing.assert_close(mlp(x), mlp.fc2(z * torch.sigmoid(1.702 * z)))


@pytest.mark.parametrize("rows,width,out", [(64, 32, 48), (70, 20, 13), (5, 16, 16)])
def test_linear_is_its_formula(rows, width, out):
    """linear: x W^T + b without a gradient (the compiled matmul on AVX2 builds from 64 rows: rows and columns past
    its tiles; fewer rows, a gradient or the reference switch: PyTorch's), with and without a bias; the packed
    weight follows an in-place change."""
    torch.manual_seed(rows)
    layer, x = torch.nn.Linear(width, out), torch.randn(rows, width)
    with torch.no_grad():
        torch.testing.assert_close(kernels.linear(layer, x), layer(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kernels.linear(layer, x.view(rows, 1, width)), layer(x).view(rows, 1, out),
                                   atol=1e-5, rtol=1e-5)
        layer.weight.mul_(-2)
        torch.testing.assert_close(kernels.linear(layer, x), layer(x), atol=1e-5, rtol=1e-5)
        bare = torch.nn.Linear(width, out, bias=False)
        torch.testing.assert_close(kernels.linear(bare, x), bare(x), atol=1e-5, rtol=1e-5)
        with mmlm.reference_mode():
            assert torch.equal(kernels.linear(layer, x), layer(x))
        from mmlm import native
        from mmlm.models.kernels.mlp import compiled_matmul
        assert compiled_matmul(x, layer) == (native.simd() == 1 and rows >= 64)  # the C path is what ran above
    assert torch.equal(kernels.linear(layer, x), layer(x))  # a gradient: PyTorch's
    with torch.inference_mode():  # weights made here keep no version counter: packed at every call
        made, conv = torch.nn.Linear(width, out), torch.nn.Conv2d(32, 32, 3, padding=1)
        torch.testing.assert_close(kernels.linear(made, x), made(x), atol=1e-5, rtol=1e-5)
        image = torch.randn(1, 32, 8, 8)
        torch.testing.assert_close(kernels.conv_add(conv, image), conv(image), atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_mlp_at_inference_is_its_formula(act):
    """MLP without a gradient (embedding): fc2(act(fc1(x))) as two compiled matmuls with the activation in the
    first's registers on AVX2 builds (69 rows: past a multiple of six; widths past the 16-column panels); under
    FlopCounterMode, with a gradient or the reference switch: PyTorch's."""
    torch.manual_seed(0)
    mlp = MLP(20, 72, act=act)
    x = torch.randn(3, 23, 20) * 2
    with mmlm.reference_mode(), torch.no_grad():
        want = mlp(x)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), want, atol=2e-5, rtol=1e-5)
        mlp.fc1.weight.mul_(2)  # in place: the packed weight follows
        with mmlm.reference_mode():
            want = mlp(x)
        torch.testing.assert_close(mlp(x), want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(mlp(x), want, atol=1e-5, rtol=1e-5)  # with a gradient: PyTorch's matmuls
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():  # a dispatch mode sees PyTorch's matmuls
        mlp(x)
    assert counter.get_total_flops() == 2 * 69 * (20 * 72 + 72 * 20)


@pytest.mark.parametrize("autocast", [False, True])
def test_swiglu(autocast):
    torch.manual_seed(0)
    mlp = SwiGLU(16, 24)
    x = torch.randn(2, 5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        results = _run(lambda: mlp(x), [x, *mlp.parameters()])
    _assert_agree(results, atol=1e-2 if autocast else 1e-6, rtol=1e-2 if autocast else 1e-6)


def test_lora_reference_is_the_weight_plus_its_low_rank_update():
    """LoRALinear(x) == x (W + alpha/r B A)^T + b, and so are the gradients of A and B (float64)."""
    torch.manual_seed(0)
    lin = LoRALinear(12, 10, bias=True, rank=4, alpha=8.0).double()
    torch.nn.init.normal_(lin.lora_b)
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    y = lin(x)
    ref = F.linear(x, lin.weight + 2.0 * lin.lora_b @ lin.lora_a, lin.bias)
    torch.testing.assert_close(y, ref)
    ga, gb = torch.autograd.grad(y.square().sum(), (lin.lora_a, lin.lora_b))
    ra, rb = torch.autograd.grad(ref.square().sum(), (lin.lora_a, lin.lora_b))
    torch.testing.assert_close(ga, ra)
    torch.testing.assert_close(gb, rb)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("bias,frozen", [(True, True), (False, True), (True, False)])
def test_lora_function(autocast, bias, frozen):
    """LoRALinear's autograd function (one output buffer, dx accumulated in place) gives the formula's values
    and gradients (x, bias, A, B and, when it is trained, W), in float32 and under bf16 autocast."""
    torch.manual_seed(0)
    lin = LoRALinear(24, 20, bias=bias, rank=4, alpha=8.0)
    torch.nn.init.normal_(lin.lora_b)
    lin.weight.requires_grad_(not frozen)
    x = torch.randn(3, 5, 24, requires_grad=True)
    params = [x, lin.lora_a, lin.lora_b] + ([lin.bias] if bias else []) + ([] if frozen else [lin.weight])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        results = _run(lambda: lin(x), params)
    assert results[0][0].dtype == (torch.bfloat16 if autocast else torch.float32)
    tol = dict(atol=0.05, rtol=0.02) if autocast else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[0][0], results[1][0], **tol)
    for a, b in zip(results[0][1], results[1][1]):
        assert a.dtype == b.dtype
        scale = b.abs().max()
        torch.testing.assert_close(a / scale, b / scale, atol=2e-2 if autocast else 1e-6, rtol=0)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_with_a_frozen_lora_down_projection(autocast, bias):
    """A LoRA SwiGLU (frozen weights): the gate and down projection as one function that keeps only z give
    exactly the gate and LoRA functions' values and gradients taken apart, and the formula's within rounding."""
    torch.manual_seed(0)
    mlp = SwiGLU(16, 24, bias=bias)
    add_lora(mlp, rank=4, alpha=8.0)
    for lin in (mlp.fc1, mlp.fc2):
        torch.nn.init.normal_(lin.lora_b)
        lin.weight.requires_grad_(False)
    x = torch.randn(3, 5, 16, requires_grad=True)
    params = [x, mlp.fc1.lora_a, mlp.fc1.lora_b, mlp.fc2.lora_a, mlp.fc2.lora_b] + \
        ([mlp.fc1.bias, mlp.fc2.bias] if bias else [])
    w = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(3))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        fused = mlp(x)
        apart = mlp.fc2(kernels.swiglu(mlp.fc1(x), 24, F.silu))
    assert fused.dtype == apart.dtype and torch.equal(fused, apart)
    for a, b in zip(torch.autograd.grad((fused.float() * w).sum(), params),
                    torch.autograd.grad((apart.float() * w).sum(), params)):
        assert torch.equal(a, b)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        (fast, fast_grads), (ref, ref_grads) = _run(lambda: mlp(x), params, w)
    tol = 2e-2 if autocast else 1e-6  # relative to each tensor's largest magnitude (bf16 rounds in another order)
    for a, b in zip([fast, *fast_grads], [ref, *ref_grads]):
        scale = b.abs().max()
        torch.testing.assert_close(a / scale, b / scale, atol=tol, rtol=0)


def test_frozen_weight_cast_is_reused_until_the_weight_changes():
    """Under autocast a frozen weight is cast once and reused (not at every call), and an in-place change of
    the weight (an optimizer step, load_state_dict) makes the next call cast it again."""
    weight_in = kernels.weight_in
    lin = torch.nn.Linear(8, 4)
    lin.weight.requires_grad_(False)
    first = weight_in(lin, lin.weight, torch.bfloat16)
    assert first.dtype == torch.bfloat16 and weight_in(lin, lin.weight, torch.bfloat16) is first
    with torch.no_grad():
        lin.weight.mul_(2)
    again = weight_in(lin, lin.weight, torch.bfloat16)
    assert again is not first
    torch.testing.assert_close(again, (lin.weight).to(torch.bfloat16))
    lin.load_state_dict({"weight": torch.ones(4, 8), "bias": torch.zeros(4)})
    assert bool((weight_in(lin, lin.weight, torch.bfloat16) == 1).all())
    lin.weight.requires_grad_(True)  # a trained weight: cast at each call, and its gradient flows back
    cast = weight_in(lin, lin.weight, torch.bfloat16)
    assert cast.requires_grad and weight_in(lin, lin.weight, torch.float32) is lin.weight
    with torch.inference_mode():  # a model built under inference_mode: its tensors have no version counter
        frozen = torch.nn.Linear(8, 4).requires_grad_(False)
    assert weight_in(frozen, frozen.weight, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("autocast,dtype", [(False, torch.float32), (True, torch.float32), (False, torch.float64)])
def test_next_token_loss_and_head_logits(autocast, dtype, monkeypatch):
    """LM.forward(logits_at=, targets=) (projection and cross-entropy in one function, float32 softmax a block
    of rows at a time, the gradient written over the saved logits) == F.cross_entropy of the logits: values and
    the gradients of every parameter, with tied embeddings (the lm_head is the embedding)."""
    from mmlm.models.kernels import loss
    from mmlm.train.objectives import next_token_targets

    monkeypatch.setattr(loss._LinearCrossEntropy, "BLOCK", 7 * 300)  # several blocks of rows, a ragged last one
    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=300, width=32, layers=2, heads=4, kv_heads=2, mlp_dim=64, tie_embeddings=True)
    model = LM(cfg).to(dtype)
    ids = torch.randint(0, 300, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[0, :4] = 0
    labels = ids.masked_fill(torch.rand(3, 11) < 0.4, -100)
    at, targets = next_token_targets(labels)
    params = list(model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(ids, attention_mask=mask, logits_at=at, targets=targets)
        assert out.logits is None and out.token_loss.shape == targets.shape
        results = _run(lambda: model(ids, attention_mask=mask, logits_at=at, targets=targets).token_loss, params)
        logits = _run(lambda: model(ids, attention_mask=mask, logits_at=at).logits, params)
    tol = dict(atol=1e-2, rtol=0) if autocast else dict(atol=1e-6, rtol=1e-5)
    _assert_agree(results, grad_scale=True, **tol)
    _assert_agree(logits, grad_scale=True, **tol)
    with pytest.raises(ValueError, match="targets need logits_at"):
        model(ids, targets=targets)


def test_patch_embedding_is_the_strided_convolution():
    """The patches' matmul (and without a gradient, with 64 patches or more, the compiled one) equals the strided
    convolution, with and without a bias."""
    model = CLIP(clip_preset("tiny-vit"))
    pixels = torch.randn(3, 3, 32, 32)
    conv = model.visual.patch_embed
    w = conv.weight
    _assert_agree(_run(lambda: kernels.patch_embed(pixels, conv), [w]), atol=1e-5)
    with mmlm.reference_mode():
        want = F.conv2d(pixels, w, stride=8).flatten(2).transpose(1, 2)
        torch.testing.assert_close(kernels.patch_embed(pixels, conv), want)
    many = torch.randn(8, 3, 32, 32)  # 128 patches
    biased = torch.nn.Conv2d(3, 24, 8, stride=8)
    with torch.no_grad():
        for layer in (conv, biased):
            want = F.conv2d(many, layer.weight, layer.bias, stride=8).flatten(2).transpose(1, 2)
            torch.testing.assert_close(kernels.patch_embed(many, layer), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_conv_bn_folds_an_eval_batchnorm_into_the_convolution(autocast, bias):
    """conv_bn: an eval-mode BatchNorm (random running statistics and affine) folded into the convolution gives
    bn(conv(x)), values and gradients (input, conv and BN weights), float32 and under bf16 autocast, channels-last
    too; in training mode it is bn(conv(x)) itself, running statistics updated the same."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=bias)
    bn = torch.nn.BatchNorm2d(8, eps=1e-5)
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5), bn.running_var.uniform_(0.5, 2), bn.weight.normal_(1, 0.3), bn.bias.normal_()
    bn.eval()
    x = torch.randn(3, 6, 10, 10, requires_grad=True)
    params = [x, conv.weight, bn.weight, bn.bias] + ([conv.bias] if bias else [])
    tol = dict(atol=5e-2, rtol=5e-2) if autocast else dict(atol=1e-5, rtol=1e-5)
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        def fn(inp=inp):
            with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                return kernels.conv_bn(inp, conv, bn)
        _assert_agree(_run(fn, params), grad_scale=True, **tol)
    with mmlm.reference_mode():
        torch.testing.assert_close(kernels.conv_bn(x, conv, bn), bn(conv(x)))
    bn.train()
    twin = torch.nn.BatchNorm2d(8, eps=1e-5)
    twin.load_state_dict(bn.state_dict())
    assert torch.equal(kernels.conv_bn(x, conv, bn), twin(conv(x)))
    assert torch.equal(bn.running_mean, twin.running_mean) and torch.equal(bn.running_var, twin.running_var)


@pytest.mark.parametrize("cin,cout,size", [(96, 64, 16), (128, 128, 8), (32, 32, 32), (160, 96, (8, 12)),
                                            (36, 20, 8), (48, 40, 12), (256, 112, 8), (64, 48, (6, 10))])
def test_conv_add_winograd_equals_the_direct_convolution(cin, cout, size):
    """conv_add: conv(x) + shift + residual, without a gradient, on feature maps where the Winograd path runs
    (AVX2 builds; elsewhere the direct form, which this checks too), in one pass (up to 192 x 128 channels; 36 -> 20
    and 48 -> 40 leave channel tails past the vectors and the padded 16 columns, 12x12 maps a last block of 3 of 6
    tiles) or around PyTorch's GEMM (256 -> 112): NCHW and channels-last inputs, with and
    without shift / skip / bias; the kernels' transform is kept until the weight changes in place; with a
    gradient, autocast, sides not multiples of 4, fewer than 32 channels in or a map over 512x512 the direct form runs
    (its values equal exactly). F(4x4, 3x3)'s float32 error: ~1e-5 of conv outputs of ~1."""
    from mmlm.models.kernels import images

    torch.manual_seed(cin)
    h, w = (size, size) if isinstance(size, int) else size
    conv = torch.nn.Conv2d(cin, cout, 3, padding=1)
    x = torch.randn(3, cin, h, w)
    shift, skip = torch.randn(3, cout), torch.randn(3, cout, h, w)
    with torch.no_grad():
        for inp in (x, x.contiguous(memory_format=torch.channels_last)):
            for extra in ({}, {"shift": shift}, {"residual": skip}, {"shift": shift, "residual": skip}):
                want = kernels.conv_add_reference(conv, x, **extra)
                torch.testing.assert_close(kernels.conv_add(conv, inp, **extra), want, atol=5e-5, rtol=1e-5)
        conv.bias = None
        torch.testing.assert_close(kernels.conv_add(conv, x, shift=shift), conv(x) + shift[:, :, None, None],
                                   atol=5e-5, rtol=1e-5)
        conv.weight.mul_(2)  # in place: the kept transform must follow
        torch.testing.assert_close(kernels.conv_add(conv, x), conv(x), atol=1e-4, rtol=1e-5)
    takes = images._winograd(conv, x.contiguous(memory_format=torch.channels_last), None, None)
    assert not takes  # a gradient on the weight
    with torch.no_grad():
        from mmlm import native
        avx2 = native.kernels() is not None and native.kernels().mmlm_simd() == 1
        assert images._winograd(conv, x, None, None) == (avx2 and h % 4 == 0 and w % 4 == 0)
        assert not images._winograd(conv, torch.zeros(1, 1, 1, 1).expand(1, cin, 1024, 1024), None, None)
        assert not images._winograd(torch.nn.Conv2d(16, cout, 3, padding=1), torch.randn(1, 16, h, w), None, None)
        with torch.autocast("cpu", torch.bfloat16):
            assert not images._winograd(conv, x, None, None)
        with mmlm.reference_mode():
            assert torch.equal(kernels.conv_add(conv, x, residual=skip), skip + conv(x))


def test_a_kept_transform_follows_the_training_loops_fused_optimizer():
    """The loop's AdamW (fused on CPU) writes the weights without PyTorch bumping their version counters; the kept
    Winograd transform and packed linear weight must still follow each step, as an evaluation during training reads
    them (it once computed with the weights of the first evaluation)."""
    from mmlm.train.optim import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"conv": torch.nn.Conv2d(32, 32, 3, padding=1), "linear": torch.nn.Linear(64, 64)})
    opt = build_optimizer(model, lr=0.1, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    assert opt.defaults["fused"]
    x, h = torch.randn(2, 32, 8, 8), torch.randn(64, 64)
    for _ in range(2):
        with torch.no_grad():  # the fast paths, which keep weight-derived tensors between calls
            torch.testing.assert_close(kernels.conv_add(model["conv"], x), model["conv"](x), atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(kernels.linear(model["linear"], h), model["linear"](h), atol=1e-4, rtol=1e-5)
        (model["conv"](x).square().mean() + model["linear"](h).square().mean()).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("cin,cout,size", [(64, 64, 16), (20, 36, (5, 3)), (8, 3, 4)])
def test_conv_add_pointwise_equals_the_convolution(cin, cout, size):
    """conv_add with a 1x1 convolution without a gradient: the matmul over channels-last positions (AVX2 builds;
    rows and columns past its tiles; fewer than 4 outputs: oneDNN's), with and without the skip, NCHW or
    channels-last input; a shift or a gradient take the formula itself (equal exactly)."""
    from mmlm.models.kernels import images

    torch.manual_seed(cin)
    h, w = (size, size) if isinstance(size, int) else size
    conv = torch.nn.Conv2d(cin, cout, 1)
    x, skip = torch.randn(2, cin, h, w), torch.randn(2, cout, h, w)
    with torch.no_grad():
        for inp in (x, x.contiguous(memory_format=torch.channels_last)):
            torch.testing.assert_close(kernels.conv_add(conv, inp), conv(x), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(kernels.conv_add(conv, inp, residual=skip), skip + conv(x), atol=1e-5,
                                       rtol=1e-5)
        conv.weight.mul_(2)  # in place: the packed weight must follow
        torch.testing.assert_close(kernels.conv_add(conv, x), conv(x), atol=1e-5, rtol=1e-5)
        from mmlm import native
        avx2 = native.kernels() is not None and native.kernels().mmlm_simd() == 1
        assert images._pointwise(conv, x, None, skip) == (avx2 and cout >= 4)
        assert not images._pointwise(conv, x, torch.zeros(2, cout), None)
    assert not images._pointwise(conv, x, None, None)  # a gradient on the weight
    assert torch.equal(kernels.conv_add(conv, x, residual=skip), skip + conv(x))


def test_geglu_is_its_formula():
    """geglu: h * GELU(gate) of z = [h, gate] without a gradient (the C loop on AVX2 builds), and with one (the
    formula itself, its gradient autograd's)."""
    torch.manual_seed(0)
    z = torch.randn(2, 9, 2 * 24) * 3
    with torch.no_grad():
        torch.testing.assert_close(kernels.geglu(z), kernels.geglu_reference(z), atol=2e-5, rtol=1e-5)
    _assert_agree(_run(lambda: kernels.geglu(z), [z.requires_grad_()]), atol=1e-6)


@pytest.mark.parametrize("dim,hidden,rows", [(64, 256, (2, 256)), (24, 20, (3, 23)), (13, 8, (67,)), (16, 16, (1, 1))])
def test_linear_geglu_is_its_formula(dim, hidden, rows):
    """linear_geglu: geglu(proj(x)) without a gradient (one C pass on AVX2 builds from 64 rows: rows past a
    multiple of six, gates past a multiple of eight; a single row: PyTorch's), with and without a bias; the packed
    weight follows an in-place change; with a gradient or under the reference switch the formula itself (equal
    exactly)."""
    torch.manual_seed(dim)
    proj, x = torch.nn.Linear(dim, 2 * hidden), torch.randn(*rows, dim)
    with torch.no_grad():
        torch.testing.assert_close(kernels.linear_geglu(proj, x), kernels.linear_geglu_reference(proj, x), atol=2e-5,
                                   rtol=1e-5)
        proj.weight.mul_(3)
        torch.testing.assert_close(kernels.linear_geglu(proj, x), kernels.linear_geglu_reference(proj, x), atol=5e-5,
                                   rtol=1e-5)
        bare = torch.nn.Linear(dim, 2 * hidden, bias=False)
        torch.testing.assert_close(kernels.linear_geglu(bare, x), kernels.linear_geglu_reference(bare, x), atol=2e-5,
                                   rtol=1e-5)
        with mmlm.reference_mode():
            assert torch.equal(kernels.linear_geglu(proj, x), kernels.geglu_reference(proj(x)))
    assert torch.equal(kernels.linear_geglu(proj, x), kernels.geglu_reference(proj(x)))  # a gradient: the formula


@pytest.mark.parametrize("channels,groups,size", [(32, 8, 16), (96, 8, 8), (12, 3, 5), (64, 32, 4)])
def test_group_norm_silu_is_its_formula(channels, groups, size):
    """group_norm_silu: silu(GroupNorm(x)) on channels-last maps without a gradient (the C loop on AVX2 builds),
    values far from zero mean and unit scale, affine or not; NCHW input, a gradient or autocast take the formula
    itself (equal exactly)."""
    torch.manual_seed(channels)
    x = (torch.randn(3, channels, size, size) * 3 + 2).contiguous(memory_format=torch.channels_last)
    for affine in (True, False):
        norm = torch.nn.GroupNorm(groups, channels, eps=1e-5, affine=affine)
        if affine:
            torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
        with torch.no_grad():
            want = kernels.group_norm_silu_reference(norm, x)
            got = kernels.group_norm_silu(norm, x)
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
            assert got.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(kernels.group_norm_silu(norm, x.contiguous()), F.silu(norm(x.contiguous())))
        if affine:
            assert torch.equal(kernels.group_norm_silu(norm, x), F.silu(norm(x)))  # a gradient: the formula


def test_channels_last_convolutions_give_the_nchw_results_and_leave_the_model_as_it_was():
    """conv_layout / conv_weights_layout: a text-to-image UNet with a VAE sampled (and trained) on channels-last
    activations and weights gives the reference's NCHW results; the weights are contiguous again afterwards."""
    from mmlm.config import TextConfig
    from mmlm.diffusion_config import DiffusionConfig, UNetConfig, VAEConfig
    from mmlm.models.diffusion import TextToImage
    from mmlm.tokenizer import Tokenizer

    unet = UNetConfig(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                      cross_attention=(True, True), heads=2, norm_num_groups=4, cross_attention_dim=0)
    vae = VAEConfig(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4, sample_size=16)
    text = TextConfig(vocab_size=530, eot_token_id=529, context_length=8, width=16, layers=1, heads=2)
    cfg = DiffusionConfig(text=text, unet=unet, vae=vae)
    tok = Tokenizer.train_bpe(["a red circle", "a blue square"] * 8, vocab_size=530, context_length=8)
    cfg.text.vocab_size, cfg.text.eot_token_id = tok.vocab_size, tok.eot_id
    torch.manual_seed(0)
    pipe = TextToImage(cfg).eval()
    pipe.tokenizer = tok
    images = _run(lambda: mmlm.generate_image(pipe, ["a red circle", "a blue square"], steps=3, guidance=2.0), [])
    _assert_agree(images, atol=1e-5)
    assert images[0][0].is_contiguous()  # handed back NCHW
    assert all(p.is_contiguous() for p in pipe.parameters())
    w = pipe.unet.conv_in.weight
    for ref in (False, True):
        with mmlm.reference_mode(ref), kernels.conv_weights_layout(pipe.unet, None):
            assert w.is_contiguous(memory_format=torch.channels_last) != ref and w.is_contiguous() == ref
            assert kernels.conv_layout(torch.randn(1, 4, 8, 8)).is_contiguous() == ref
    assert w.is_contiguous()
    x, t, ctx = torch.randn(2, 4, 8, 8, requires_grad=True), torch.tensor([3, 500]), torch.randn(2, 5, cfg.text.width)
    _assert_agree(_run(lambda: pipe.unet(x, t, ctx), [x, *pipe.unet.parameters()]), atol=1e-5, grad_scale=True)


def test_packing_rounds_its_row_count():
    """Packing(multiple=m) keeps every real token and adds dropped ones until the count is a multiple of m (few
    distinct matmul shapes); round_rows pads with zero rows."""
    keep = torch.arange(10)[None] < torch.tensor([[3], [7], [1]])  # 11 real tokens of 30
    p = kernels.Packing.from_mask(keep, multiple=8)
    assert len(p.index) == 16 and set(keep.flatten().nonzero().flatten().tolist()) <= set(p.index.tolist())
    assert sorted(p.index.tolist() + p.dropped.tolist()) == list(range(30))
    assert len(kernels.Packing.from_mask(keep, multiple=64).index) == 30  # never more than the batch holds
    x = torch.randn(5, 3)
    rr = kernels.round_rows
    assert rr(x, 4).shape == (8, 3) and torch.equal(rr(x, 4)[:5], x) and rr(x, 5) is x


@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool", "additive"])
@pytest.mark.parametrize("grad", [True, False])
def test_pooled_last_block_computes_only_the_pooled_rows(mask_kind, grad):
    """pooled() computes one token per row in the last block; values and the gradients of the input and every
    weight equal running every token and indexing afterwards. grad=False runs the inference attention kernel."""
    torch.manual_seed(0)
    B, T, C = 4, 9, 32
    net = Transformer(C, layers=2, heads=4, mlp_dim=64, act="quick_gelu", norm_eps=1e-5)
    x = torch.randn(B, T, C, requires_grad=grad)
    rows = torch.tensor([0, 8, 3, 5])
    mask, causal = None, mask_kind == "causal"
    if mask_kind in ("bool", "additive"):
        keep = (torch.rand(B, 1, T, T) > 0.3) | torch.eye(T, dtype=torch.bool)
        mask = keep if mask_kind == "bool" else torch.zeros(B, 1, T, T).masked_fill(~keep, float("-inf"))
    with torch.set_grad_enabled(grad):
        results = _run(lambda: kernels.pooled(net, x, rows, mask, causal), [x, *net.parameters()] if grad else [])
    _assert_agree(results, atol=1e-6)


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("pack_below", [0.0, 1.0])
def test_text_tower_cut_and_packed_gives_the_padded_features(with_mask, pack_below, monkeypatch):
    """The text tower cut after its last end-of-text token, packed (pack_below 1.0: always) or not (0.0), changes
    the work, not the numbers or the gradients."""
    monkeypatch.setattr(pooling, "PACK_BELOW", pack_below)
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
    results = _run(lambda: model.encode_text(ids, attention_mask=mask), list(model.text.parameters()))
    _assert_agree(results, atol=1e-5, rtol=1e-4, grad_scale=True)


@pytest.mark.parametrize("kv_heads,bias,lora", [(4, True, False), (2, False, False), (2, True, False), (4, True, True)])
def test_one_query_attention_equals_the_full_attention_row(kv_heads, bias, lora):
    """The pooled attention never projects keys or values (the query goes back to the input width); with grouped
    k/v heads, without biases, and through the generic path (a LoRA q/k/v projection) it equals the full
    attention's row, values and gradients, under a padding mask and causality."""
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
    pooled = pooling._pooled_attention(attn, x, rows, mask, True, None)
    torch.testing.assert_close(pooled, full, atol=1e-6, rtol=1e-5)
    w = torch.randn_like(full)
    params = [x, *attn.parameters()]
    for a, b in zip(torch.autograd.grad((full * w).sum(), params), torch.autograd.grad((pooled * w).sum(), params)):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- whole models

def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter nudged (zero-initialised BN weights and LoRA B would hide paths from the comparison)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


@pytest.mark.parametrize("preset", ["tiny-vit", "tiny-rn"])
@pytest.mark.parametrize("train", [True, False])
def test_clip_reference_mode_gives_the_fast_outputs_and_gradients(preset, train):
    torch.manual_seed(0)  # the weights do not depend on which tests ran before
    model = _perturbed(CLIP(clip_preset(preset))).train(train)
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(4, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    ids = torch.randint(1, cfg.text.eot_token_id, (4, cfg.text.context_length), generator=g)
    for row, length in enumerate([3, 7, 5, 12]):
        ids[row, length - 1], ids[row, length:] = cfg.text.eot_token_id, 0
    params = [p for p in model.parameters() if p is not model.logit_scale]
    for fn in (lambda: model.encode_image(pixels), lambda: model.encode_text(ids),
               lambda: model(pixel_values=pixels, input_ids=ids).logits_per_image):
        if train:
            _assert_agree(_run(fn, params), atol=1e-5, rtol=1e-4, grad_scale=True)
        else:
            with torch.no_grad():
                _assert_agree(_run(fn, []), atol=1e-5, rtol=1e-4)
    if train:
        # d/ds sum(w * exp(s) cos) = sum(w * logits): one scalar from terms of both signs that cancel, so its
        # rounding is relative to the sum of their magnitudes, not to itself
        (logits, (fast,)), (_, (ref,)) = _run(lambda: model(pixel_values=pixels, input_ids=ids).logits_per_image,
                                              [model.logit_scale])
        w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3))  # the weights _run used
        assert (fast - ref).abs() <= 1e-5 * (w * logits).abs().sum(), (fast, ref)


def test_lm_reference_mode_gives_the_fast_outputs_and_gradients():
    cfg = LMConfig(vocab_size=128, width=32, layers=2, heads=4, kv_heads=2, mlp_dim=56)
    model = LM(cfg)
    ids = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    _assert_agree(_run(lambda: model(ids, attention_mask=mask).logits, list(model.parameters())), atol=1e-5,
                  grad_scale=True)
    with torch.no_grad():
        _assert_agree(_run(lambda: model(ids, attention_mask=mask).logits, []), atol=1e-5)


@pytest.mark.parametrize("vision", ["vit", "resnet"])
def test_llava_with_lora_reference_mode_gives_the_fast_outputs_and_gradients(vision):
    from mmlm.config import LlavaConfig, ModifiedResNetConfig, ViTConfig
    from mmlm.models.llava import Llava

    lm = LMConfig(vocab_size=128, width=32, layers=2, heads=4, kv_heads=2, mlp_dim=56)
    if vision == "vit":
        tower = ViTConfig(image_size=16, patch_size=8, width=32, layers=2, heads=4)
    else:
        tower = ModifiedResNetConfig(image_size=32, layers=(1, 1, 1, 1), width=8)
    cfg = LlavaConfig(vision=tower, lm=lm, image_token_id=127)
    model = Llava(cfg)
    model.add_lora(4, 8.0)
    _perturbed(model)
    model.vision.requires_grad_(False)  # frozen tower, as in training
    per_image = cfg.image_tokens
    ids = torch.randint(0, 120, (2, per_image + 6), generator=torch.Generator().manual_seed(0))
    ids[0, 2 : 2 + per_image] = 127
    ids[1, 1 : 1 + per_image] = 127
    pixels = torch.randn(2, 3, tower.image_size, tower.image_size, generator=torch.Generator().manual_seed(1))
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        _assert_agree(_run(lambda: model(ids, pixel_values=pixels).logits, params), atol=1e-5, rtol=1e-4,
                      grad_scale=True)


@pytest.mark.parametrize("preset", ["tiny-vit", "tiny-rn"])
def test_clip_training_in_reference_mode_follows_the_fast_run(preset):
    """Four SGD steps of the contrastive loss from the same weights: the fast and the reference run give the
    same losses and end with the same weights (float32). (Not Adam: it divides by the gradient's own size, so
    a gradient that is zero in exact arithmetic, as a key bias's, turns rounding noise into full steps.)"""
    import copy

    from mmlm.train.objectives import contrastive_loss

    torch.manual_seed(0)
    base = _perturbed(CLIP(clip_preset(preset))).train()
    cfg = base.config
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(8, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    ids = torch.randint(1, cfg.text.eot_token_id, (8, cfg.text.context_length), generator=g)
    for row in range(8):
        ids[row, 3 + row], ids[row, 4 + row :] = cfg.text.eot_token_id, 0
    runs = []
    for ref in (False, True):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        with mmlm.reference_mode(ref):
            for step in range(4):
                half = slice(0, 4) if step % 2 == 0 else slice(4, 8)
                image, text = model.encode_image(pixels[half]), model.encode_text(ids[half])
                loss = contrastive_loss("clip", image, text, model.logit_scale)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        runs.append((losses, model.state_dict()))
    (fast_losses, fast_sd), (ref_losses, ref_sd) = runs
    # (a ResNet's BatchNorm over 4 samples amplifies rounding from step to step: a few steps, then it drifts)
    assert fast_losses == pytest.approx(ref_losses, abs=3e-5 if preset == "tiny-vit" else 3e-4, rel=0)
    assert fast_losses[2] < fast_losses[0] - 1e-3  # it trains (steps 0 and 2 see the same batch)
    # the weights of the ResNet's stem sit behind four BatchNorms over 4 samples: they drift apart by rounding
    # (measured up to 4e-4 after 4 steps), so only the ViT's are compared weight by weight
    for k in ref_sd if preset == "tiny-vit" else ():
        torch.testing.assert_close(fast_sd[k], ref_sd[k], atol=1e-4, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
