"""Text tokenizers: OpenAI CLIP's byte-level BPE and any Hugging Face `tokenizers` tokenizer.

`Tokenizer` wraps a Rust `tokenizers.Tokenizer` (which runs the BPE, in batches) and adds what CLIP
needs around it: OpenAI's text cleaning, `SOT ... EOT` framing, padding and truncation to a fixed
context length. `Tokenizer.clip()` rebuilds OpenAI's `SimpleTokenizer` (clip/simple_tokenizer.py)
id for id; tests/test_tokenizer.py checks that on a thousand varied strings.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import json
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Literal, Sequence

import ftfy
import regex
import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
# OpenAI's pre-tokenizer regex. OpenAI compiles it with IGNORECASE; the text is lower-cased first, so
# the flag only shows on letters that case-fold to s/t/d/m ("'ſ" is one contraction chunk).
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

Clean = Literal["clip", "none"]


@lru_cache(maxsize=1 << 16)
def clean_clip_text(text: str) -> str:
    """OpenAI CLIP's cleaning: fix mojibake, unescape HTML twice, collapse whitespace, lower-case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's byte -> printable character map (printable bytes map to themselves)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:  # unprintable bytes go to chr(256), chr(257), ...
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def find_clip_bpe() -> Path:
    """The path of `bpe_simple_vocab_16e6.txt.gz` inside the installed open-clip-torch (not imported)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"CLIP's {CLIP_BPE_FILE} ships in open-clip-torch: `pip install --no-deps open-clip-torch`, "
            "or pass its path as bpe_path"
        )
    path = Path(spec.submodule_search_locations[0]) / CLIP_BPE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed open-clip-torch; pass bpe_path")
    return path


def _clip_bpe(vocab: dict[str, int], merges: list[tuple[str, str]]) -> tokenizers.Tokenizer:
    """The Rust pipeline of OpenAI's SimpleTokenizer: regex split, bytes -> chars, BPE with `</w>`."""
    for token in (SOT_TOKEN, EOT_TOKEN):
        if token not in vocab:
            raise ValueError(f"a CLIP vocabulary needs {token!r}; this one lacks it")
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [  # keep the regex matches, drop what lies between them (whitespace)
            pre_tokenizers.Split(tokenizers.Regex("(?i)" + CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([tokenizers.AddedToken(t, normalized=False, special=True) for t in (SOT_TOKEN, EOT_TOKEN)])
    return tok


def _encode_batch(tok: tokenizers.Tokenizer, inputs: list, is_pretokenized: bool = False) -> list:
    """Encode without special tokens; `encode_batch_fast` (tokenizers >= 0.20) skips the offsets."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    return encode(inputs, is_pretokenized=is_pretokenized, add_special_tokens=False)


@lru_cache(maxsize=1)
def _clip_chunker() -> regex.Pattern:
    return regex.compile(CLIP_PATTERN, regex.IGNORECASE)


class Tokenizer:
    """A `tokenizers.Tokenizer` (`.tokenizer`) plus the settings that turn text into fixed-length CLIP inputs.

    clean="clip" is OpenAI CLIP's text handling for its byte-level BPE: its cleaning and its regex split
    run in Python (see `_word_tokenizer`), the Rust tokenizer does the BPE. clean="none" hands text to the
    Rust tokenizer as is. sot_id may be None (LLM tokenizers); pad_id=0 is OpenAI's convention, Hugging
    Face's CLIP pads with the EOT id instead.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        sot_id: int | None = None,
        eot_id: int | None = None,
        pad_id: int = 0,
        clean: Clean = "none",
        context_length: int = 77,
        chat_template: str | None = None,
    ) -> None:
        if clean not in ("clip", "none"):
            raise ValueError(f"clean must be 'clip' or 'none', got {clean!r}")
        tokenizer.no_padding()  # framing, padding and truncation are this class's job
        tokenizer.no_truncation()
        self.tokenizer = tokenizer
        self.sot_id, self.eot_id, self.pad_id = sot_id, eot_id, pad_id
        self.clean: Clean = clean
        self.context_length = context_length
        self.chat_template = chat_template  # a Jinja template (Hugging Face / GGUF convention), for LLMs

    # --- constructors ---------------------------------------------------------------------------

    @classmethod
    def clip(cls, bpe_path: str | Path | None = None, context_length: int = 77) -> Tokenizer:
        """OpenAI CLIP's tokenizer from `bpe_simple_vocab_16e6.txt.gz` (open-clip-torch's copy if None)."""
        lines = gzip.open(bpe_path or find_clip_bpe()).read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
        chars = list(bytes_to_unicode().values())
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
        return cls._clip({t: i for i, t in enumerate(vocab)}, merges, context_length)

    @classmethod
    def from_vocab_merges(cls, vocab_json: str | Path, merges_txt: str | Path, context_length: int = 77) -> Tokenizer:
        """OpenAI CLIP's tokenizer from a Hugging Face CLIP `vocab.json` + `merges.txt`."""
        vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
        lines = Path(merges_txt).read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
        return cls._clip(vocab, merges, context_length)

    @classmethod
    def train_bpe(cls, texts: Sequence[str], vocab_size: int = 1024, context_length: int = 77) -> Tokenizer:
        """A CLIP-style byte-level BPE (same cleaning, split and `</w>` words) fitted to `texts`.

        For from-scratch runs on a narrow domain: a vocabulary of a few hundred tokens covers captions
        that OpenAI's 49k-token vocabulary would spend most of its embedding table on. Every byte stays
        encodable; SOT and EOT come last, so EOT is the largest id, as in OpenAI's vocabulary.
        """
        chars = list(bytes_to_unicode().values())
        base = chars + [c + "</w>" for c in chars]
        if vocab_size < len(base) + 2:
            raise ValueError(f"a byte-level BPE needs vocab_size >= {len(base) + 2}, got {vocab_size}")
        chunker = _clip_chunker()
        words = (chunker.findall(clean_clip_text(t)) for t in texts)
        trainer_tok = tokenizers.Tokenizer(models.BPE(end_of_word_suffix="</w>"))
        trainer_tok.pre_tokenizer = pre_tokenizers.Sequence(  # chunks arrive space-joined: split them again
            [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size - 2, initial_alphabet=chars,
                                                 end_of_word_suffix="</w>", show_progress=False, min_frequency=2)
        trainer_tok.train_from_iterator((" ".join(w) for w in words), trainer=trainer)
        model = json.loads(trainer_tok.to_str())["model"]
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        vocab = {t: i for i, t in enumerate(base)}
        for token in sorted(model["vocab"], key=model["vocab"].get):  # learned merges, in training order
            vocab.setdefault(token, len(vocab))
        vocab[SOT_TOKEN], vocab[EOT_TOKEN] = len(vocab), len(vocab) + 1
        return cls._clip(vocab, merges, context_length)

    @classmethod
    def train_byte_level(cls, texts: Sequence[str], vocab_size: int = 512, special_tokens: Sequence[str] = ("<s>", "</s>"),
                         sot: str | None = "<s>", eot: str | None = "</s>", chat_template: str | None = None) -> Tokenizer:
        """A GPT-2-style byte-level BPE for a small LM, fitted to `texts`: no cleaning, so every text decodes
        back exactly (case, spaces, punctuation), which chat training needs. `special_tokens` take the
        first ids and are never split; `sot`/`eot` name the start and end tokens among them."""
        missing = [t for t in (sot, eot) if t is not None and t not in special_tokens]
        if missing:
            raise ValueError(f"sot/eot {missing} must be among special_tokens {list(special_tokens)}")
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet) + len(special_tokens):
            raise ValueError(f"a byte-level BPE needs vocab_size >= {len(alphabet) + len(special_tokens)}, got {vocab_size}")
        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False,
                                                 special_tokens=[tokenizers.AddedToken(t, normalized=False, special=True)
                                                                 for t in special_tokens])
        tok.train_from_iterator(texts, trainer=trainer)
        ids = {t: tok.token_to_id(t) for t in special_tokens}
        return cls(tok, sot_id=ids.get(sot), eot_id=ids.get(eot), pad_id=ids.get(eot, 0), clean="none",
                   context_length=2048, chat_template=chat_template)

    @classmethod
    def _clip(cls, vocab: dict[str, int], merges: list, context_length: int) -> Tokenizer:
        return cls(
            _clip_bpe(vocab, merges),
            sot_id=vocab[SOT_TOKEN],
            eot_id=vocab[EOT_TOKEN],
            pad_id=0,
            clean="clip",
            context_length=context_length,
        )

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a directory holding `tokenizer.json` (+ `tokenizer_config.json`), or a bare `tokenizer.json`."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        tok = tokenizers.Tokenizer.from_file(str(file))
        config_file = file.parent / CONFIG_FILE
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        chat_template = config.get("chat_template")  # mmlm's and Hugging Face's tokenizer_config.json both keep it here
        if "clean" not in config:  # no mmlm settings beside it (maybe HF's): guess from the special tokens
            config = _default_config(tok)

        def token_id(key: str) -> int | None:
            name = config.get(key)
            if name is None:
                return None
            if (i := tok.token_to_id(name)) is None:
                raise ValueError(f"{config_file}: {key}={name!r} is not in the vocabulary of {file}")
            return i

        return cls(
            tok,
            sot_id=token_id("sot_token"),
            eot_id=token_id("eot_token"),
            pad_id=token_id("pad_token") if config.get("pad_token") is not None else 0,
            clean=config.get("clean", "none"),
            context_length=int(config.get("context_length", 77)),
            chat_template=chat_template,
        )

    def save(self, directory: str | Path) -> None:
        """Write `tokenizer.json` (the Rust tokenizer) and `tokenizer_config.json` (these settings)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(directory / TOKENIZER_FILE))
        name = lambda i: None if i is None else self.tokenizer.id_to_token(i)  # noqa: E731
        config = {
            "clean": self.clean,
            "sot_token": name(self.sot_id),
            "eot_token": name(self.eot_id),
            "pad_token": name(self.pad_id),
            "context_length": self.context_length,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    # --- text <-> ids ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, no special tokens added."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts (the Rust tokenizer runs them in parallel), no special tokens added."""
        if self.clean == "clip":
            chunker = _clip_chunker()
            words = [chunker.findall(clean_clip_text(t)) for t in texts]
            encodings = _encode_batch(self._word_tokenizer, words, is_pretokenized=True)
        else:
            encodings = _encode_batch(self.tokenizer, list(texts))
        return [e.ids for e in encodings]

    @cached_property
    def _word_tokenizer(self) -> tokenizers.Tokenizer:
        """The Rust tokenizer minus its normalizer and regex split, for OpenAI's pre-split chunks.

        With clean="clip" the chunks come from OpenAI's regex run by the `regex` module in Python, as
        in OpenAI's code. The Rust regex (Oniguruma) sees the same chunks except where the two disagree
        on Unicode: letters newer than Oniguruma's tables, U+0345 under IGNORECASE, and a special token
        inside a punctuation run (".<|endoftext|>" stays text for OpenAI; Rust would take the id).
        """
        tok = tokenizers.Tokenizer.from_str(self.tokenizer.to_str())
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        return tok

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of ids; for CLIP's BPE each `</w>` becomes a space and the result is stripped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        text = self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        suffix = getattr(self.tokenizer.model, "end_of_word_suffix", None)
        return text.replace(suffix, " ").strip() if suffix else text

    def apply_chat_template(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render `messages` ([{"role": "user", "content": "..."}, ...]) with the model's chat template.

        The text holds the special tokens written out (e.g. ChatML's `<|im_start|>`); `encode` maps them to
        their ids. Rendered in Jinja's sandbox, as transformers does (a template is data from a file).
        """
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        name = lambda i: "" if i is None else self.tokenizer.id_to_token(i)  # noqa: E731
        return _jinja_template(self.chat_template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=name(self.sot_id), eos_token=name(self.eot_id))

    def __call__(
        self, texts: str | Sequence[str], context_length: int | None = None, truncate: bool = True
    ) -> torch.Tensor:
        """CLIP inputs: each text as `SOT ids... EOT`, padded with pad_id -> LongTensor (B, context_length).

        A text too long is cut to its first context_length tokens with the last one set to EOT (as
        open_clip does) when truncate=True, else it raises ValueError.
        """
        if isinstance(texts, str):
            texts = [texts]
        n = context_length or self.context_length
        if self.eot_id is None:
            raise ValueError("this tokenizer has no end-of-text token (eot_id); set one to frame texts")
        sot = [] if self.sot_id is None else [self.sot_id]
        rows = []
        for i, ids in enumerate(self.encode_batch(texts)):
            ids = sot + ids + [self.eot_id]
            if len(ids) > n:
                if not truncate:
                    raise ValueError(
                        f"text {i} has {len(ids)} tokens (with start/end tokens), more than context_length={n}"
                    )
                ids = ids[: n - 1] + [self.eot_id]
            rows.append(ids + [self.pad_id] * (n - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), n)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, sot_id={self.sot_id}, eot_id={self.eot_id}, "
            f"pad_id={self.pad_id}, clean={self.clean!r}, context_length={self.context_length})"
        )


@lru_cache(maxsize=8)
def _jinja_template(source: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def _default_config(tok: tokenizers.Tokenizer) -> dict:
    """Settings for a bare tokenizer.json: CLIP's when it holds CLIP's special tokens, else plain text."""
    vocab = tok.get_vocab(with_added_tokens=True)
    if SOT_TOKEN in vocab and EOT_TOKEN in vocab:
        return {"clean": "clip", "sot_token": SOT_TOKEN, "eot_token": EOT_TOKEN}
    eot = next((t for t in (EOT_TOKEN, "</s>", "<|end_of_text|>", "<|im_end|>", "<eos>") if t in vocab), None)
    sot = next((t for t in ("<s>", "<|begin_of_text|>", "<bos>") if t in vocab), None)
    return {"clean": "none", "sot_token": sot, "eot_token": eot}
