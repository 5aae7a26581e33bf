"""llama.cpp GGUF files (llama architecture) -> mmlm LM and Tokenizer.

Tensors are dequantised to float32 with the `gguf` package (F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q4_K/Q6_K, ...).
llama.cpp's converter permutes the rows of q and k so that each head's rotary pairs sit side by side
(interleaved RoPE); mmlm uses transformers' half-split layout, so those rows are permuted back.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import mmap
import os
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..checkpoint import build_model, load_state_dict_strict
from ..config import LMConfig
from ..tokenizer import Tokenizer
from .mapping import Rule, fill, layer_indices, rename

_L, _T = "blocks.{i}", "blk.{i}"
RULES: list[Rule] = [
    Rule("embed.weight", "token_embd.weight"),
    Rule(f"{_L}.norm1.weight", f"{_T}.attn_norm.weight"),
    *[Rule(f"{_L}.attn.qkv.{p}", tuple(f"{_T}.attn_{x}.{p}" for x in "qkv")) for p in ("weight", "bias")],
    Rule(f"{_L}.attn.proj.weight", f"{_T}.attn_output.weight"),
    Rule(f"{_L}.norm2.weight", f"{_T}.ffn_norm.weight"),
    Rule(f"{_L}.mlp.fc1.weight", (f"{_T}.ffn_gate.weight", f"{_T}.ffn_up.weight")),
    Rule(f"{_L}.mlp.fc2.weight", f"{_T}.ffn_down.weight"),
    Rule("norm.weight", "output_norm.weight"),
    Rule("lm_head.weight", "output.weight"),
]


def _reader(path: str | Path):
    try:
        import gguf
    except ImportError:
        raise ImportError("reading .gguf files needs the `gguf` package: pip install gguf "
                          "(or pip install 'mmlm[interop]')") from None
    return gguf.GGUFReader(str(path))


def read_metadata(reader: Any) -> dict[str, Any]:
    """Every key/value of the file's header as plain Python values."""
    return {name: field.contents() for name, field in reader.fields.items()}


# The gguf package parses the whole header, the tokenizer's ~100k strings included, in Python (~2 s for SmolLM2):
# a file's header is read once per process, by whichever of the model, its tokenizer and `weights="auto"` asks
# first, and kept (key: path, modification time, size) for the others.
_HEADERS: OrderedDict[tuple, tuple[dict[str, Any], Counter]] = OrderedDict()


def _file_key(path: str | Path) -> tuple:
    st = os.stat(path)
    return (str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


def _remember(key: tuple, reader: Any) -> tuple[dict[str, Any], Counter]:
    types = Counter(t.tensor_type.name for t in reader.tensors
                    if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2)
    _HEADERS[key] = (read_metadata(reader), types)
    while len(_HEADERS) > 2:
        _HEADERS.popitem(last=False)
    return _HEADERS[key]


# the quantization a file's block linears imply (their most common tensor type): what `weights="auto"` runs
STORED_MODES = {"Q4_0": "int4", "Q4_1": "int4", "Q4_K": "int4", "Q8_0": "int8"}


def stored_mode(types: Counter) -> str | None:
    """"int4" / "int8" for a file whose block linears are mostly 4-bit / 8-bit; None for float ones."""
    return STORED_MODES.get(types.most_common(1)[0][0]) if types else None


def header(path: str | Path) -> tuple[dict[str, Any], Counter]:
    """(the header's key/values, a count of the block linears' tensor types, e.g. {"Q4_1": 210}) of a .gguf file."""
    key = _file_key(path)
    if key not in _HEADERS:
        _remember(key, _reader(path))
    _HEADERS.move_to_end(key)
    return _HEADERS[key]


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order (per head: [pair0 (a, b), pair1 (a, b), ...] -> [a..., b...])."""
    rest = w.shape[1:]
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def config_from_gguf(meta: dict[str, Any], path: str = "gguf") -> LMConfig:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    a = lambda key, default=None: meta.get(f"llama.{key}", default)  # noqa: E731
    width, heads = int(a("embedding_length")), int(a("attention.head_count"))
    scaling = None
    kind = a("rope.scaling.type")
    if kind not in (None, "none"):
        if kind != "linear":
            raise ValueError(f"{path}: GGUF rope scaling {kind!r} is not supported (only 'linear')")
        scaling = {"rope_type": "linear", "factor": float(a("rope.scaling.factor"))}
    tokens = meta.get("tokenizer.ggml.tokens")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return LMConfig(
        vocab_size=int(a("vocab_size") or len(tokens)), width=width, layers=int(a("block_count")), heads=heads,
        kv_heads=int(a("attention.head_count_kv", heads)), head_dim=int(a("rope.dimension_count", width // heads)),
        mlp_dim=int(a("feed_forward_length")), norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(a("rope.freq_base", 10000.0)), rope_scaling=scaling,
        max_seq_len=int(a("context_length", 2048)), bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=None if eos is None else [int(eos)],
    )


def dequantise_into(out: torch.Tensor, data: np.ndarray, kind: Any, chunk_values: int = 1 << 16) -> None:
    """Write a GGUF tensor's stored rows, dequantised, into the contiguous float32 tensor `out`, a few rows at
    a time: the `gguf` package's dequantisation makes temporaries several times its input, which done in one
    go for a big tensor (the token embedding) would briefly take a few times its float32 size."""
    from gguf.quants import dequantize

    rows = data.reshape(-1, data.shape[-1]) if data.ndim > 1 else data[None]
    out_np = out.view(len(rows), -1).numpy()  # the same memory: numpy writes (and casts F16/BF16) into it
    step = max(1, chunk_values // out_np.shape[1])
    for i in range(0, len(rows), step):
        out_np[i : i + step] = dequantize(rows[i : i + step], kind)


def _release_pages(record: Any) -> None:
    """Let the OS drop the file pages of a tensor already read (they would count as resident memory until the
    file is unmapped; a page shared with a neighbour is simply read again if needed)."""
    mapping = getattr(record.data.base, "_mmap", None) if isinstance(record.data.base, np.memmap) else None
    if mapping is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = record.data_offset - record.data_offset % mmap.PAGESIZE
    mapping.madvise(mmap.MADV_DONTNEED, start, record.data_offset + record.n_bytes - start)


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _trim_heap() -> None:
    """Give the heap's free memory back to the OS (glibc's `malloc_trim`; elsewhere nothing). Quantizing layer by
    layer frees a few MB of float32 temporaries each time, and glibc keeps such pieces scattered across its
    arenas: without this the peak of a streamed SmolLM2 load varied from 0.69 to 0.92 GB run to run, with it
    0.58 GB every time."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(ctypes.c_size_t(0))


def state_dict_from_gguf(tensors: dict[str, Any], cfg: LMConfig, path: str = "gguf",
                         finish: Callable[[str, torch.Tensor], torch.Tensor | None] | None = None) -> dict[str, torch.Tensor]:
    """The file's tensors (name -> the reader's tensor record) dequantised to float32 under mmlm's names; q/k
    rows back in transformers' order.

    Each weight is dequantised straight into its place in the fused mmlm tensor (q/k/v, gate/up): no
    per-name float32 copies to concatenate and free, which would leave the heap fragmented (measured:
    ~200 MB more peak memory for SmolLM2). `finish(name, tensor)`, when given, sees each tensor as soon as it is
    complete and returns what to keep under that name (None: nothing; it took the tensor elsewhere).
    """
    if "rope_freqs.weight" in tensors:
        raise ValueError(f"{path}: per-dimension RoPE frequency factors (rope_freqs, Llama 3.1 scaling) are not supported")
    if "output.weight" not in tensors:  # no output matrix: the head shares the token embedding
        cfg.tie_embeddings = True
    shapes = {name: tuple(int(n) for n in reversed(t.shape)) for name, t in tensors.items()}  # GGUF: fastest dim first
    # the renaming on shapes alone (meta tensors): checks every name both ways and gives the fused shapes
    planned = rename({n: torch.empty(s, device="meta") for n, s in shapes.items()}, RULES, "to_ours", path)
    sd: dict[str, torch.Tensor] = {}
    for rule in RULES:
        for i in layer_indices(rule.their_names[0], tensors):
            ours = fill(rule.ours, i)
            if ours not in planned:
                continue
            out = torch.empty(planned[ours].shape)
            row = 0
            for name in (fill(n, i) for n in rule.their_names):
                part = out[row : row + shapes[name][0]]  # (rows of this name, ...)
                row += shapes[name][0]
                dequantise_into(part, tensors[name].data, tensors[name].tensor_type)
                _release_pages(tensors[name])
                heads = cfg.heads if ".attn_q." in name else cfg.kv_heads if ".attn_k." in name else None
                if heads:
                    part.copy_(unpermute_rope(part, heads))
            kept = out if finish is None else finish(ours, out)
            if kept is not None:
                sd[ours] = kept
    return sd


def load_gguf(path: str | Path, weights: str | None = None) -> torch.nn.Module:
    """A llama-architecture .gguf file -> mmlm LM (float32).

    The model is built on the meta device and takes the dequantised tensors as its parameters (no random
    init, no second copy): peak memory is about one float32 model plus the file's mapping.

    `weights` "int8" / "int4" gives the model `quant.quantize(model, weights)` would, without ever holding it in
    float32: each block linear is quantized as soon as it is read (the vocabulary projection too when it has its
    own matrix), so peak memory is the embedding table, the quantized weights and one layer in float32.
    "auto" picks the file's own precision (`stored_mode`; float files load in float32).
    """
    reader = _reader(path)
    key = _file_key(path)
    meta, types = _HEADERS[key] if key in _HEADERS else _remember(key, reader)  # parsed once per process
    if weights == "auto":
        weights = stored_mode(types)
    if weights is not None:
        from ..quant import MODES, cpu_kernels

        if weights not in MODES:
            raise ValueError(f"unknown quantization {weights!r}; known: {', '.join(MODES)}")
        if not cpu_kernels():
            raise RuntimeError(f"this torch ({torch.__version__}) lacks the CPU weight-only kernels {weights} needs")
    cfg = config_from_gguf(meta, str(path))
    tensors = {t.name: t for t in reader.tensors}
    # the reader holds the header parsed into many small arrays (the tokenizer's vocabulary: ~150 MB for
    # SmolLM2); the tensor records keep only the file mapping alive
    del reader
    gc.collect()  # the reader's objects sit in reference cycles: free them now, before the big allocations
    cfg.tie_embeddings = "output.weight" not in tensors  # no output matrix: the head shares the token embedding
    cfg.qkv_bias = any(name.endswith("attn_q.bias") for name in tensors)
    with torch.device("meta"):
        model = build_model(cfg)
    packed: dict[str, torch.nn.Module] = {}
    finish = None
    if weights is not None:
        from ..quant import QuantLinear, block_bits

        def finish(name: str, tensor: torch.Tensor) -> torch.Tensor | None:
            module = name.removesuffix(".weight")
            if not (name.endswith(".weight") and isinstance(model.get_submodule(module), torch.nn.Linear)):
                return tensor
            bits = 8 if module == "lm_head" else block_bits(weights, *tensor.shape)
            packed[module] = QuantLinear.from_weight(tensor, None, bits)
            _trim_heap()
            return None  # the float32 weight is dropped here

    sd = state_dict_from_gguf(tensors, cfg, str(path), finish)
    del tensors  # unmaps the file
    for name, layer in packed.items():
        bias = sd.pop(f"{name}.bias", None)
        if bias is not None:
            layer.bias = bias
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, layer)
        sd.update({f"{name}.{k}": v for k, v in layer.state_dict().items()})
    load_state_dict_strict(model, sd, str(path), assign=True)
    if cfg.tie_embeddings and "lm_head" not in packed:  # assign gives each name its own Parameter: tie them again
        model.lm_head.weight = model.embed.weight
    if weights is not None:
        if cfg.tie_embeddings:  # the head's own int8 copy of the (float) embedding table, as quantize makes it
            model.lm_head = QuantLinear(model.lm_head, 8)
        model.eval().requires_grad_(False)
        model.quantized = weights
    return model


# ----------------------------------------------------------------------------- tokenizer

def tokenizer_from_gguf(path: str | Path):
    """The file's byte-level BPE (`tokenizer.ggml.model == "gpt2"`), special tokens and chat template."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers

    meta, _ = header(path)
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{path}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    tok = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    # llama.cpp's "smollm" / "starcoder"-style pre-tokenizers split digits one by one before GPT-2's regex.
    if meta.get("tokenizer.ggml.pre") in ("smollm", "starcoder", "refact", "qwen2"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    # token_type 3 = CONTROL, 4 = USER_DEFINED: matched whole in text, never split by the BPE
    tok.add_special_tokens([tokenizers.AddedToken(t, normalized=False, special=(ty == 3))
                            for t, ty in zip(tokens, types) if ty in (3, 4)])
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    pad = meta.get("tokenizer.ggml.padding_token_id", eos)
    return Tokenizer(tok, sot_id=bos if meta.get("tokenizer.ggml.add_bos_token", False) else None, eot_id=eos,
                     pad_id=pad if pad is not None else 0, clean="none", context_length=meta.get("llama.context_length", 2048),
                     chat_template=meta.get("tokenizer.chat_template"))
