"""mmlm LM == transformers LlamaForCausalLM / Qwen2ForCausalLM (load HF dir, export to HF), tiny random weights."""

from __future__ import annotations

import pytest
import torch

import mmlm
from hf_round_trip import hf_round_trip
from mmlm.config import LMConfig
from mmlm.models.lm import LM, position_ids_from_mask

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("kernel_mode")  # fast kernels and reference formulas

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

