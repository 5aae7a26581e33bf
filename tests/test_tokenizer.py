"""Tokenizer parity: mmlm's Rust-backed CLIP tokenizer against OpenAI's SimpleTokenizer and transformers.

The reference is OpenAI's SimpleTokenizer as shipped in the open-clip-torch wheel, loaded by file path
(importing the open_clip package would need torchvision).
"""

import gzip
import importlib.util
import json
import os
import random
from pathlib import Path

import pytest
import regex
import torch

from mmlm.formats import load_tokenizer
from mmlm.tokenizer import CLIP_PATTERN, EOT_TOKEN, SOT_TOKEN, Tokenizer, find_clip_bpe

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("open_clip") is None, reason="needs `pip install --no-deps open-clip-torch`"
)


@pytest.fixture(scope="module")
def reference_module():
    path = Path(importlib.util.find_spec("open_clip").submodule_search_locations[0]) / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("open_clip_reference_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    spec.loader.exec_module(module)  # it sets TOKENIZERS_PARALLELISM=false for the process: undo that
    if saved is None:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)
    else:
        os.environ["TOKENIZERS_PARALLELISM"] = saved
    return module


@pytest.fixture(scope="module")
def open_clip_ref(reference_module):
    """open_clip's copy as shipped: it spells the special tokens <start_of_text>/<end_of_text>."""
    return reference_module._tokenizer


@pytest.fixture(scope="module")
def openai_ref(reference_module):
    """OpenAI's own SimpleTokenizer: open_clip's copy with OpenAI's special-token spelling and regex
    (the ids 49406/49407 are the same; only which literal text maps to them differs)."""
    ref = reference_module.SimpleTokenizer()
    for old, new in (("<start_of_text>", SOT_TOKEN), ("<end_of_text>", EOT_TOKEN)):
        ref.encoder[new] = ref.encoder.pop(old)
        ref.decoder[ref.encoder[new]] = new
    ref.cache = {SOT_TOKEN: SOT_TOKEN, EOT_TOKEN: EOT_TOKEN}
    ref.pat = regex.compile(CLIP_PATTERN, regex.IGNORECASE)
    return ref


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.clip()


def _mojibake(s: str) -> str:
    return s.encode("utf-8").decode("cp1252", errors="ignore")


FRAGMENTS = {
    "ascii": ["a photo of a cat", "The quick brown fox jumps over the lazy dog.", "hello world", "x", "A",
              "a diagram of a neural network", "Two dogs playing in the snow", "an aerial view of Paris"],
    "punct": ["!", "?!", "...", "--", "(", ")", "[x]", "{}", "@#$%^&*", "~`|\\/", ";:", "\"quoted\"", "''", "'",
              "_", "__init__", "a_b-c", "<>", "</w>", "+-*/=", "!!!???..."],
    "numbers": ["0", "7", "42", "3.14159", "1,000,000", "2024-01-02", "0x1F", "1e-5", "42nd", "v2", "100%",
                "$9.99", "½", "²", "٣", "१२३", "Ⅻ"],
    "contractions": ["it's", "don't", "we're", "I've", "I'm", "they'll", "he'd", "IT'S", "rock'n'roll", "'s'",
                     "o'clock", "y'all", "'tis", "'re'", "can't've"],
    "case": ["HeLLo WoRLD", "iPhone", "NASA", "McDonald's", "ΟΔΟΣ", "İstanbul", "STRASSE"],
    "unicode": ["café", "naïve", "Straße", "façade", "Ελληνικά", "Русский язык", "中文字符", "日本語のテキスト",
                "한국어", "العربية", "हिन्दी", "עברית", "ไทย", "e\u0301", "Å", "ﬁne", "ſ", "'ſ", "ǅ", "Ⓐ"],
    "emoji": ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "❤️", "🇫🇷", "🤷🏻‍♀️", "✨🎉", "☃"],
    "html": ["&amp;", "&lt;b&gt;bold&lt;/b&gt;", "&#39;", "&nbsp;", "&amp;amp;", "&quot;hi&quot;", "&#x263A;",
             "&eacute;", "&#8217;", "&copy; 2024", "<b>tag</b>"],
    "mojibake": [_mojibake(s) for s in ("café", "über", "“quoted”", "don’t", "naïve", "€5")] + ["Ã©", "â€™"],
    "space": ["\t", "\n", "  ", "\r\n", "\u3000", "\xa0", " \t\n ", "\u2028", "\u200b"],
    "special": [EOT_TOKEN, SOT_TOKEN, "hello<|endoftext|>world", ".<|endoftext|>", "'<|endoftext|>",
                "<|endoftext|><|endoftext|>", "9<|startoftext|>", "<|ENDOFTEXT|>", "<|endoftext", "<end_of_text>"],
}
SEPARATORS = [" ", " ", " ", "", "\t", "\n", "  ", ", "]


def _texts() -> list[str]:
    """1000+ varied strings, the same on every run."""
    rng = random.Random(0)
    kinds = sorted(FRAGMENTS)
    texts = ["", " ", "   \t\n  "] + [f for k in kinds for f in FRAGMENTS[k]]
    while len(texts) < 1100:
        parts = [rng.choice(FRAGMENTS[rng.choice(kinds)]) for _ in range(rng.randint(1, 6))]
        text = parts[0]
        for part in parts[1:]:
            text += rng.choice(SEPARATORS) + part
        if rng.random() < 0.3:
            text = text.upper() if rng.random() < 0.5 else text.title()
        texts.append(text)
    long = " ".join(rng.choice(FRAGMENTS["ascii"] + FRAGMENTS["unicode"]) for _ in range(40))
    texts += [long, long.upper(), "a " * 80, "😀 " * 80, "1" * 100]  # > 77 tokens
    return texts


TEXTS = _texts()


def test_texts_are_varied_and_long_enough(openai_ref):
    assert len(TEXTS) >= 1000 and len(set(TEXTS)) > 900
    assert sum(len(openai_ref.encode(t)) + 2 > 77 for t in TEXTS) >= 5  # truncated at 77


def test_encode_matches_openai(tok, openai_ref):
    got = tok.encode_batch(TEXTS)
    for text, ids in zip(TEXTS, got):
        assert ids == openai_ref.encode(text), repr(text)
    assert tok.encode("hello<|endoftext|>world") == openai_ref.encode("hello<|endoftext|>world")


def test_encode_matches_open_clip_as_shipped(tok, open_clip_ref):
    # open_clip spells its special tokens <start_of_text>/<end_of_text>; away from those, it is OpenAI's
    texts = [t for t in TEXTS if "<|" not in t and "_of_text>" not in t.lower()]
    for text, ids in zip(texts, tok.encode_batch(texts)):
        assert ids == open_clip_ref.encode(text), repr(text)


@pytest.mark.parametrize("context_length", [77, 16])
def test_padded_batch_matches_openai(tok, openai_ref, context_length):
    got = tok(TEXTS, context_length=context_length)
    want = openai_ref(TEXTS, context_length=context_length)  # OpenAI pads with 0, truncates to ... EOT
    assert got.dtype == torch.long and got.shape == (len(TEXTS), context_length)
    assert torch.equal(got, want)
    assert (got[:, -1] == tok.eot_id).any()  # some texts were cut


def test_single_string_and_default_context(tok, openai_ref):
    assert torch.equal(tok("a photo of a dog"), openai_ref("a photo of a dog"))
    assert tok("a photo of a dog").shape == (1, 77)


def test_truncate_false_raises(tok):
    tok(["short", "a " * 75])  # 75 + SOT + EOT == 77 fits
    with pytest.raises(ValueError, match=r"text 1 has 78 tokens .* context_length=77"):
        tok(["short", "a " * 76], truncate=False)


def test_special_token_quirks(tok):
    # a special token counts where OpenAI's regex starts a chunk, and not inside a punctuation run
    assert tok.encode("hello<|endoftext|>world") == [3306, 49407, 1002]
    assert tok.encode("<|startoftext|> <|endoftext|>") == [49406, 49407]
    assert 49407 not in tok.encode(".<|endoftext|>")
    assert tok.encode("<|ENDOFTEXT|>") == [49407]  # lower-cased first
    assert tok.encode("it's") == tok.encode("IT'S") == [585, 568]


def test_decode_round_trip(tok):
    for text in ["a photo of a cat", "hello world", "two dogs playing in the snow", "café"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok("a cat")[0, :4]) == "<|startoftext|>a cat <|endoftext|>"
    assert tok.decode(tok("a cat")[0, :4], skip_special_tokens=True) == "a cat"


def _write_hf_files(directory: Path, tok: Tokenizer) -> None:
    """HF CLIP's vocab.json + merges.txt, written from OpenAI's BPE file."""
    lines = gzip.open(find_clip_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    (directory / "vocab.json").write_text(json.dumps(tok.tokenizer.get_vocab(with_added_tokens=True)), "utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n", "utf-8")


def test_from_vocab_merges_matches_transformers(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    _write_hf_files(tmp_path, tok)
    hf = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    mine = Tokenizer.from_vocab_merges(tmp_path / "vocab.json", tmp_path / "merges.txt")
    mine.pad_id = hf.pad_token_id  # Hugging Face pads with <|endoftext|>
    assert (mine.sot_id, mine.eot_id, mine.vocab_size) == (hf.bos_token_id, hf.eos_token_id, len(hf))
    # Ordinary text only: transformers' CLIPTokenizer skips OpenAI's ftfy/html cleaning (it normalizes with
    # NFC, whitespace and a per-character Rust lowercase), so mojibake, entities, final sigma etc. differ.
    texts = [t for k in ("ascii", "punct", "numbers", "contractions") for t in FRAGMENTS[k]]
    texts += ["A Photo of a Cat, it's RED!", "two  dogs\tin the\nsnow", "café naïve", "a " * 90]
    want = hf(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(mine(texts), want)
    assert mine.encode_batch(TEXTS) == tok.encode_batch(TEXTS)  # the same tokenizer as Tokenizer.clip()
    # transformers' own tokenizer.json loads as OpenAI's tokenizer (settings detected from its special tokens)
    hf.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    from_hf_json = load_tokenizer(tmp_path / "tokenizer.json")
    assert repr(from_hf_json) == repr(tok)
    assert from_hf_json.encode_batch(TEXTS) == tok.encode_batch(TEXTS)


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config == {"clean": "clip", "sot_token": SOT_TOKEN, "eot_token": EOT_TOKEN, "pad_token": "!",
                      "context_length": 77}
    for loaded in (Tokenizer.load(tmp_path), Tokenizer.load(tmp_path / "tokenizer.json"), load_tokenizer(tmp_path)):
        assert repr(loaded) == repr(tok)
        assert torch.equal(loaded(TEXTS[:300]), tok(TEXTS[:300]))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_bytes((tmp_path / "tokenizer.json").read_bytes())
    assert repr(Tokenizer.load(bare / "tokenizer.json")) == repr(tok)  # CLIP settings detected
    custom = Tokenizer(tok.tokenizer, sot_id=tok.sot_id, eot_id=tok.eot_id, pad_id=tok.eot_id, clean="clip",
                       context_length=32)
    custom.save(tmp_path / "custom")
    assert repr(Tokenizer.load(tmp_path / "custom")) == repr(custom)


def test_load_tokenizer_dispatch(tok, tmp_path):
    assert repr(load_tokenizer(find_clip_bpe())) == repr(tok)
    _write_hf_files(tmp_path, tok)
    from_hf = load_tokenizer(tmp_path)
    assert repr(from_hf) == repr(tok) and from_hf.encode("a photo, it's 3.5") == tok.encode("a photo, it's 3.5")
    tok.save(tmp_path / "ckpt")
    assert repr(load_tokenizer(tmp_path / "ckpt" / "tokenizer.json")) == repr(tok)
    with pytest.raises(FileNotFoundError, match="model.gguf"):  # .gguf tokenizers: tests/test_gguf_smollm2.py
        load_tokenizer(tmp_path / "model.gguf")


def test_load_tokenizer_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty.*expected a directory with tokenizer.json"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="notes.txt"):
        load_tokenizer(tmp_path / "notes.txt")


def test_plain_tokenizer_without_clip_settings():
    import tokenizers

    vocab = {"<s>": 0, "</s>": 1, "a": 2, "b": 3}
    rust = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<s>"))
    rust.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    plain = Tokenizer(rust, eot_id=1)
    assert plain.encode("a b A") == [2, 3, 0]  # no cleaning, no lower-casing
    assert plain(["a b"], context_length=4).tolist() == [[2, 3, 1, 0]]
    with pytest.raises(ValueError, match="eot_id"):
        Tokenizer(rust)(["a"])


def test_train_bpe_on_captions_round_trips_and_keeps_every_byte(tmp_path):
    from mmlm.tokenizer import Tokenizer

    captions = [f"a {c} {s} in the {p}." for c in ("red", "green", "blue") for s in ("circle", "star")
                for p in ("top left", "center")] * 20
    tok = Tokenizer.train_bpe(captions, vocab_size=600, context_length=16)
    assert tok.eot_id == tok.vocab_size - 1 and tok.sot_id == tok.vocab_size - 2  # EOT is the largest id
    assert len(tok.encode("a green star in the center.")) <= 7  # whole words became single tokens
    assert tok.decode(tok.encode("a red circle")) == "a red circle"
    assert tok.decode(tok.encode("ünïcode ✨")) == "ünïcode ✨"  # unseen bytes still encode
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again("a blue star").tolist() == tok("a blue star").tolist()
