"""mmlm LM == transformers LlamaForCausalLM / Qwen2ForCausalLM (load HF dir, export to HF), tiny random weights."""

from __future__ import annotations

import pytest
import torch

import mmlm
from hf_round_trip import hf_round_trip
from mmlm.config import LMConfig
from mmlm.models.lm import LM, position_ids_from_mask

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=128, hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, rms_norm_eps=1e-6)
CASES = {
    # name: (transformers class name, config kwargs)
    "llama_mha_untied": ("Llama", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "llama_gqa_tied_bias": ("Llama", dict(num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True,
                                          mlp_bias=True, rope_theta=500.0)),
    "llama_mqa_linear_rope": ("Llama", dict(num_key_value_heads=1, head_dim=16,
                                            rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama3_rope": ("Llama", dict(num_key_value_heads=2, rope_theta=50000.0,
                                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "qwen2_gqa_untied": ("Qwen2", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2_gqa_tied": ("Qwen2", dict(num_key_value_heads=1, tie_word_embeddings=True, rope_theta=1e6)),
}


def _hf_model(case: str, seed: int = 0):
    family, kw = CASES[case]
    cfg = getattr(transformers, f"{family}Config")(**BASE, **kw)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{family}ForCausalLM")(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # move norms away from 1 and biases away from 0 so a wrong mapping cannot pass
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _batch(vocab: int = 128, seed: int = 1):
    """Three rows of 9 tokens: full, left-padded by 3, left-padded by 6."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return ids, mask


def _hf_logits(hf, ids, mask=None):
    kw = {} if mask is None else dict(attention_mask=mask, position_ids=position_ids_from_mask(mask))
    with torch.no_grad():
        return hf(input_ids=ids, **kw).logits


def _assert_same(ours, hf):
    ids, mask = _batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, _hf_logits(hf, ids), atol=1e-4, rtol=0)
        got = ours(ids, attention_mask=mask).logits
    ref = _hf_logits(hf, ids, mask)
    real = mask.bool()  # logits at padded slots mean nothing in either library
    torch.testing.assert_close(got[real], ref[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_hf_directory_matches_transformers(case, tmp_path):
    hf = _hf_model(case)
    hf.save_pretrained(tmp_path / "hf")
    ours = mmlm.load(tmp_path / "hf")
    assert isinstance(ours, LM) and not ours.training and next(ours.parameters()).dtype == torch.float32
    _assert_same(ours, hf)


@pytest.mark.parametrize("case", ["llama_gqa_tied_bias", "qwen2_gqa_untied", "llama3_rope"])
def test_export_hf_round_trip(case, tmp_path):
    hf = _hf_model(case, seed=3)
    ours, again = hf_round_trip(hf, tmp_path, transformers.AutoModelForCausalLM)
    assert type(again) is type(hf)
    _assert_same(ours, again)
    ref = hf.state_dict()
    for k, v in again.state_dict().items():
        torch.testing.assert_close(v, ref[k], atol=0, rtol=0)


def test_left_padding_equals_unpadded_rows():
    """A left-padded row's logits equal those of the same tokens alone (positions count real tokens)."""
    model = LM(LMConfig(vocab_size=64, width=32, layers=2, heads=4, kv_heads=2, mlp_dim=48)).eval()
    ids, mask = _batch(vocab=64)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        for row in range(3):
            alone = model(ids[row : row + 1, mask[row].bool()]).logits[0]
            torch.testing.assert_close(batched[row, mask[row].bool()], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tie", [False, True])
def test_every_parameter_gets_a_gradient(tie):
    cfg = LMConfig(vocab_size=64, width=32, layers=2, heads=4, kv_heads=2, mlp_dim=48, qkv_bias=True, out_bias=True,
                   mlp_bias=True, tie_embeddings=tie)
    model = LM(cfg).train()
    ids, mask = _batch(vocab=64)
    logits = model(ids, attention_mask=mask).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
           or p.grad.abs().sum() == 0]
    assert bad == []


def test_save_load_round_trip_and_strict(tmp_path):
    cfg = LMConfig(vocab_size=64, width=32, layers=2, heads=4, kv_heads=1, mlp_dim=48, tie_embeddings=True,
                   rope_scaling={"type": "linear", "factor": 4.0}, eos_token_id=3)
    model = LM(cfg).eval()
    mmlm.save(model, tmp_path / "m")
    again = mmlm.load(tmp_path / "m")
    assert again.config == cfg and again.lm_head.weight is again.embed.weight
    ids, _ = _batch(vocab=64)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=0, rtol=0)
    from safetensors.torch import load_file, save_file

    sd = load_file(tmp_path / "m" / "model.safetensors")
    del sd["blocks.1.mlp.fc2.weight"]
    save_file(sd, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match="blocks.1.mlp.fc2.weight"):
        mmlm.load(tmp_path / "m")


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="kv_heads"):
        LMConfig(width=32, heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="yarn"):
        LMConfig(width=32, heads=4, rope_scaling={"rope_type": "yarn", "factor": 2.0})


def test_rope_training_path_equals_inference_path_and_its_gradient():
    """Training rotates q/k with its own backward (the inverse rotation): same values as the plain formula,
    and the gradient passes torch's numerical check."""
    from mmlm.models.layers import apply_rope, rope_cos_sin, rope_inv_freq

    x = torch.randn(2, 7, 3, 16, dtype=torch.float64, requires_grad=True)
    cos, sin = rope_cos_sin(rope_inv_freq(16, 10000.0), torch.arange(7).expand(2, 7) + 3, torch.float64)
    with torch.no_grad():
        plain = apply_rope(x, cos, sin)
    torch.testing.assert_close(apply_rope(x, cos, sin), plain, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: apply_rope(t, cos, sin), (x,))


@pytest.mark.parametrize("autocast,dtype", [(False, torch.float32), (True, torch.float32), (False, torch.float64)])
def test_rmsnorm_training_function_equals_the_op_chain(autocast, dtype):
    """RMSNorm's training path (one autograd function) == transformers' formula differentiated op by op:
    values and gradients of input and weight, in float32, under bf16 autocast (output in bf16 there) and in
    float64 (which it keeps)."""
    from mmlm.models.layers import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(48, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    x = (torch.randn(3, 5, 48, dtype=dtype) * 3).requires_grad_()

    def reference(x):
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        return norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps))

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = norm(x)
    ref = reference(x)
    if autocast:  # what the next matmul does to the float32 output under autocast (and to its gradient)
        ref = ref.to(torch.bfloat16)
    assert out.dtype == (torch.bfloat16 if autocast else dtype)
    tol = dict(atol=1e-2, rtol=1e-2) if autocast else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.to(dtype), ref.to(dtype), **tol)
    w = torch.randn_like(ref, dtype=dtype)
    grads = [torch.autograd.grad((y.to(dtype) * w).sum(), [x, norm.weight]) for y in (ref, out)]
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("autocast,dtype", [(False, torch.float32), (True, torch.float32), (False, torch.float64)])
def test_loss_at_targets_equals_cross_entropy_of_the_logits(autocast, dtype):
    """LM.forward(logits_at=, targets=) (projection and cross-entropy in one function, float32 softmax a block
    of rows at a time, the gradient written over the saved logits) == F.cross_entropy of the logits it would
    return: values and the gradients of every parameter, tied embeddings (the lm_head is the embedding)."""
    from mmlm.models import lm as lm_module
    from mmlm.train.objectives import next_token_targets

    torch.manual_seed(0)
    cfg = LMConfig(vocab_size=300, width=32, layers=2, heads=4, kv_heads=2, mlp_dim=64, tie_embeddings=True)
    model = LM(cfg).to(dtype)
    ids = torch.randint(0, 300, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[0, :4] = 0
    labels = ids.masked_fill(torch.rand(3, 11) < 0.4, -100)
    at, targets = next_token_targets(labels)
    block = lm_module._LinearCrossEntropy.BLOCK
    lm_module._LinearCrossEntropy.BLOCK = 7 * 300  # several blocks of rows (and a ragged last one)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            ours = model(ids, attention_mask=mask, logits_at=at, targets=targets)
            logits = model(ids, attention_mask=mask, logits_at=at).logits
    finally:
        lm_module._LinearCrossEntropy.BLOCK = block
    assert ours.logits is None and ours.token_loss.shape == targets.shape
    ref = torch.nn.functional.cross_entropy(logits.to(torch.promote_types(dtype, torch.float32)), targets,
                                            reduction="none")
    assert ours.token_loss.dtype == ref.dtype
    tol = dict(atol=1e-5, rtol=1e-5) if not autocast else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.token_loss, ref, **tol)
    w = torch.rand(len(targets), dtype=ref.dtype)
    params = [p for p in model.parameters()]
    for a, b in zip(torch.autograd.grad((ours.token_loss * w).sum(), params), torch.autograd.grad((ref * w).sum(), params)):
        scale = b.abs().max()
        torch.testing.assert_close(a / scale, b / scale, atol=1e-2 if autocast else 1e-6, rtol=0)
    with pytest.raises(ValueError, match="targets need logits_at"):
        model(ids, targets=targets)


@pytest.mark.parametrize("autocast", [False, True])
def test_swiglu_training_function_equals_autograd(autocast):
    """SwiGLU's training path (silu(gate) * up with its gradient written into one [gate, up] buffer) == the
    formula differentiated by autograd: values and the gradients of x and both linears."""
    from mmlm.models.layers import SwiGLU

    torch.manual_seed(0)
    mlp = SwiGLU(16, 24)
    x = torch.randn(2, 5, 16, requires_grad=True)

    def reference(x):
        gate, up = mlp.fc1(x).split(24, dim=-1)
        return mlp.fc2(torch.nn.functional.silu(gate) * up)

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, ref = mlp(x), reference(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    params = [x] + list(mlp.parameters())
    w = torch.randn(out.shape)
    for a, b in zip(torch.autograd.grad((out.float() * w).sum(), params), torch.autograd.grad((ref.float() * w).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-2 if autocast else 1e-6, atol=1e-2 if autocast else 1e-6)
