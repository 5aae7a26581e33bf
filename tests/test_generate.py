"""Generation: KV-cache decoding equals a full forward, greedy equals transformers' generate, batching and
left padding change nothing, sampling is seedable, stop conditions and errors."""

from __future__ import annotations

import pytest
import torch

from mmlm.config import LMConfig
from mmlm.generation import generate
from mmlm.models.lm import LM

CFG = dict(vocab_size=96, width=32, layers=2, heads=4, kv_heads=2, mlp_dim=48, max_seq_len=64, qkv_bias=True)


def _model(seed: int = 0, **kw) -> LM:
    torch.manual_seed(seed)
    model = LM(LMConfig(**{**CFG, **kw})).eval()
    with torch.no_grad():  # a sharper random model: greedy choices are not near-ties
        model.lm_head.weight.mul_(20)
    return model


def _left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def test_kv_cache_steps_equal_full_forward():
    """Prefill, then one token at a time, then a chunk of 3: every step's logits equal a full forward's."""
    model = _model()
    ids, mask = _left_pad([[5, 6, 7, 8, 9, 10], [11, 12, 13]])
    ids = torch.cat([ids, torch.randint(0, 96, (2, 7))], dim=1)
    mask = torch.cat([mask, torch.ones(2, 7, dtype=torch.long)], dim=1)
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = model.new_cache(2, ids.shape[1])
        chunks, start = [6, 1, 1, 1, 1, 3, 1], 0
        for n in chunks:
            step = model(ids[:, start : start + n], attention_mask=mask[:, : start + n], cache=cache).logits
            real = mask[:, start : start + n].bool()
            torch.testing.assert_close(step[real], full[:, start : start + n][real], atol=1e-5, rtol=0)
            start += n
        assert cache.pos == ids.shape[1]


def test_batched_left_padded_equals_per_row():
    model = _model(1)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13]]
    ids, mask = _left_pad(prompts)
    batched = generate(model, ids, mask, max_new_tokens=12)
    assert batched.shape == (3, 12)
    for row, p in enumerate(prompts):
        alone = generate(model, torch.tensor([p]), max_new_tokens=12)
        assert batched[row].tolist() == alone[0].tolist()


def test_greedy_equals_transformers_generate(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _model(2)
    from mmlm.convert.hf import export_hf

    export_hf(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids, mask = _left_pad([[3, 1, 4, 1, 5], [9, 2, 6]])
    ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[:, ids.shape[1]:]
    assert generate(model, ids, mask, max_new_tokens=16).tolist() == ref.tolist()


def test_eos_ends_rows_and_pads():
    model = _model(3)
    ids, mask = _left_pad([[1, 2, 3], [4, 5, 6, 7]])
    free = generate(model, ids, mask, max_new_tokens=10)
    eos = int(free[0, 2])  # the third token row 0 produces
    got = generate(model, ids, mask, max_new_tokens=10, eos_token_id=[eos])
    row0 = free[0].tolist()
    end = row0.index(eos)
    assert got[0, : end + 1].tolist() == row0[: end + 1] and (got[0, end + 1 :] == eos).all()
    row1 = free[1].tolist()  # the other row is unaffected until it meets eos itself
    n = row1.index(eos) + 1 if eos in row1 else len(row1)
    assert got[1, :n].tolist() == row1[:n]


def test_sampling_is_seedable_and_filters():
    model = _model(4)
    ids = torch.tensor([[1, 2, 3]])
    kw = dict(max_new_tokens=20, temperature=1.0, top_k=5, top_p=0.9, repetition_penalty=1.3)
    a, b = generate(model, ids, seed=7, **kw), generate(model, ids, seed=7, **kw)
    assert a.tolist() == b.tolist()
    assert generate(model, ids, seed=8, **kw).tolist() != a.tolist()
    # top_k=1 is greedy whatever the temperature
    assert generate(model, ids, max_new_tokens=8, temperature=2.0, top_k=1, seed=0).tolist() == \
        generate(model, ids, max_new_tokens=8).tolist()


def test_stream_sees_every_token():
    model = _model(5)
    ids, mask = _left_pad([[1, 2], [3, 4, 5]])
    seen: dict[int, list[int]] = {0: [], 1: []}
    out = generate(model, ids, mask, max_new_tokens=6, stream=lambda row, t: seen[row].append(t))
    assert [seen[0], seen[1]] == out.tolist()


def test_stop_strings():
    class CharTokenizer:  # id -> one letter
        def decode(self, ids):
            return "".join(chr(ord("a") + i % 26) for i in ids)

    model = _model(6)
    ids = torch.tensor([[1, 2, 3]])
    free = generate(model, ids, max_new_tokens=12)
    text = CharTokenizer().decode(free[0].tolist())
    stop = text[3:5]
    end = next(k for k in range(1, 13) if stop in text[:k])  # the first prefix that holds the stop string
    got = generate(model, ids, max_new_tokens=12, stop=[stop], tokenizer=CharTokenizer(), eos_token_id=[])
    assert got[0].tolist() == free[0, :end].tolist()
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, ids, stop=["x"])


def test_clear_errors():
    model = _model()
    with pytest.raises(ValueError, match="context of 64"):
        generate(model, torch.zeros(1, 40, dtype=torch.long), max_new_tokens=30)
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, torch.zeros(1, 4, dtype=torch.long), torch.tensor([[1, 1, 0, 0]]))
    with pytest.raises(ValueError, match="temperature"):
        generate(model, torch.zeros(1, 4, dtype=torch.long), temperature=-1.0)


def test_repetition_penalty_marks_exactly_the_real_prompt_tokens():
    """Token 0 in a left-padded prompt is penalised (the padding, also id 0, must not clear its mark), and an
    image-token id outside the vocabulary (LLaVA's -200) is ignored rather than indexing out of range."""
    from mmlm.generation import apply_repetition_penalty

    model = _model()
    V = model.config.vocab_size
    ids, mask = _left_pad([[5, 0, 7, 9], [3, 4]])
    first = generate(model, ids, attention_mask=mask, max_new_tokens=1, repetition_penalty=3.0, eos_token_id=[])
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits[:, -1]
    seen = torch.zeros(2, V, dtype=torch.bool)
    seen[0, [5, 0, 7, 9]] = True
    seen[1, [3, 4]] = True
    expected = apply_repetition_penalty(logits, seen, 3.0).argmax(-1)
    assert torch.equal(first[:, 0], expected)
    # A LLaVA prompt whose image tokens use an id outside the vocabulary (LLaVA's -200): only text is marked.
    from mmlm.config import LlavaConfig, ViTConfig
    from mmlm.models.llava import Llava

    torch.manual_seed(0)
    llava = Llava(LlavaConfig(vision=ViTConfig(image_size=16, patch_size=8, width=32, layers=1, heads=4),
                              lm=LMConfig(**CFG), image_token_id=-200)).eval()
    prompt = torch.tensor([[5] + [-200] * llava.config.image_tokens + [7]])
    pixels = torch.randn(1, 3, 16, 16)
    got = generate(llava, prompt, pixel_values=pixels, max_new_tokens=1, repetition_penalty=3.0, eos_token_id=[])
    with torch.no_grad():
        logits = llava(prompt, pixel_values=pixels).logits[:, -1]
    text_only = torch.zeros(1, V, dtype=torch.bool)
    text_only[0, [5, 7]] = True
    assert torch.equal(got[:, 0], apply_repetition_penalty(logits, text_only, 3.0).argmax(-1))
