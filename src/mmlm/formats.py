"""Open and write every model format mmlm knows, in one place.

`checkpoint.py` is mmlm's own format (a directory: config.json + model.safetensors + ...); `convert/` turns
the formats people already have (transformers directories, OpenAI / open_clip state dicts, llama.cpp GGUF)
into mmlm models and back. This module sits above both: it looks at a path, picks the reader, and is what
`mmlm.load`, `mmlm.load_tokenizer`, `mmlm convert` and `mmlm export` call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .assets import resolve
from .checkpoint import CONFIG_NAME, PREPROCESS_NAME, load_model, read_json, save
from .config import CLIPConfig
from .convert import from_open_clip, from_openai
from .convert.diffusers_pipeline import export_pipeline, is_pipeline_dir, is_vae_dir, load_pipeline, load_vae
from .convert.diffusers_pipeline import load_checkpoint as load_diffusion_checkpoint
from .convert.gguf import header, load_gguf, stored_mode, tokenizer_from_gguf
from .convert.hf import export_hf, load_hf
from .data.transforms import PreprocessConfig
from .tokenizer import CLIP_BPE_FILE, TOKENIZER_FILE, Tokenizer
from .quant import cpu_kernels
from .weights import parse_device, parse_dtype, place


def load(path: str | Path, dtype: torch.dtype | str | None = torch.float32,
         device: torch.device | str | None = "cpu") -> nn.Module:
    """Open a model: an mmlm checkpoint dir, a transformers CLIPModel / LlamaForCausalLM / Qwen2ForCausalLM /
    LlavaForConditionalGeneration dir, a diffusers Stable Diffusion pipeline dir (a `TextToImage` with its parts),
    an autoencoder (`AutoencoderKL`: mmlm's checkpoint or a diffusers folder), or a llama-architecture .gguf
    file. Eval mode; float32 on the CPU unless `dtype` (torch.bfloat16 / float16 / float32 or a name: "bf16", ...)
    and `device` ("cuda", "cuda:1", "auto") say otherwise.

    Checkpoint and transformers directories load with little memory: the model is built on the meta device and
    each tensor streams from the memory-mapped (sharded) safetensors straight into `dtype` on `device`, fused
    tensors filled in place (see weights.py). A .gguf file is dequantised to float32 first, then cast."""
    path = Path(path)
    dtype, device = parse_dtype(dtype), parse_device(device)
    if is_pipeline_dir(path):  # a diffusers text-to-image pipeline (model_index.json + one folder per part)
        return load_pipeline(path, dtype, device).eval()
    if is_vae_dir(path):  # an autoencoder alone: `mmlm train vae`'s, or a diffusers AutoencoderKL folder
        return load_vae(path, dtype, device)
    if path.is_dir() and (path / CONFIG_NAME).is_file():
        if read_json(path / CONFIG_NAME).get("kind") == "diffusion":
            model = load_diffusion_checkpoint(path, dtype, device)
        elif "kind" in read_json(path / CONFIG_NAME):
            model = load_model(path, dtype, device)
        else:
            model = load_hf(path, dtype, device)
    elif path.is_dir():
        raise FileNotFoundError(f"{path}: no config.json; expected an mmlm checkpoint or a transformers model directory")
    elif not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    elif path.suffix == ".gguf":
        model = place(load_gguf(path), dtype, device)
    else:
        raise ValueError(f"{path}: cannot open this file as a model (expected a checkpoint directory or a .gguf file)")
    return model.eval()


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A Tokenizer from a checkpoint dir (tokenizer.json [+ tokenizer_config.json]), a tokenizer.json,
    CLIP's bpe_simple_vocab_16e6.txt.gz, a dir with Hugging Face vocab.json + merges.txt, or a .gguf file."""
    path = Path(path)
    expected = (
        "a directory with tokenizer.json (or vocab.json + merges.txt), a tokenizer.json file, "
        f"CLIP's {CLIP_BPE_FILE}, or a .gguf file"
    )
    if not path.exists():
        raise FileNotFoundError(f"no such tokenizer path: {path} (expected {expected})")
    if path.suffix == ".gguf":
        return tokenizer_from_gguf(path)
    if path.is_dir():
        if (path / TOKENIZER_FILE).is_file():
            return Tokenizer.load(path)
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return Tokenizer.from_vocab_merges(path / "vocab.json", path / "merges.txt")
    elif path.suffix == ".json":
        return Tokenizer.load(path)
    elif path.name.endswith(".txt.gz"):
        return Tokenizer.clip(path)
    raise ValueError(f"cannot load a tokenizer from {path}: expected {expected}")


def load_preprocess(directory: str | Path) -> PreprocessConfig | None:
    """The checkpoint's PreprocessConfig (mmlm's preprocess.json or a transformers preprocessor_config.json),
    or None when the directory has neither."""
    p = Path(directory) / PREPROCESS_NAME
    if p.is_file():
        return PreprocessConfig.from_dict(read_json(p))
    hf = Path(directory) / "preprocessor_config.json"
    if hf.is_file():
        return PreprocessConfig.from_hf(read_json(hf))
    return None


def convert(fmt: str, src: str | Path, out: str | Path, config: str | Path | None = None) -> Path:
    """`mmlm convert {openai,open_clip,hf} SRC --out DIR`: write an mmlm checkpoint."""
    tokenizer = preprocess = None
    if fmt == "openai":
        model = from_openai(src, config)
    elif fmt == "open_clip":
        model = from_open_clip(src, config)
    elif fmt == "hf":
        model = load(src)
        preprocess = load_preprocess(src)
        if (Path(src) / "tokenizer.json").is_file() or (Path(src) / "vocab.json").is_file():
            tokenizer = load_tokenizer(src)
    else:
        raise ValueError(f"unknown source format {fmt!r}; expected openai, open_clip or hf")
    if isinstance(model.config, CLIPConfig) and preprocess is None:
        preprocess = PreprocessConfig(image_size=model.config.vision.image_size)
    return save(model, out, tokenizer=tokenizer, preprocess=preprocess)


def export_hf_checkpoint(src: str | Path, out: str | Path) -> Path:
    """`mmlm export hf SRC --out DIR`: SRC is anything `mmlm.load` opens."""
    src = Path(src)
    model = load(src)
    tokenizer: Any = None
    if src.is_dir() and (src / TOKENIZER_FILE).is_file():
        tokenizer = load_tokenizer(src)
    preprocess = load_preprocess(src) if src.is_dir() and (src / PREPROCESS_NAME).is_file() else None
    return export_hf(model, out, tokenizer, preprocess)


def export_diffusers(src: str | Path, out: str | Path) -> Path:
    """`mmlm export diffusers SRC --out DIR`: SRC is a text-to-image model `mmlm.load` opens; DIR opens with
    `diffusers.StableDiffusionPipeline.from_pretrained`."""
    return export_pipeline(load(src), out)


def stored_weights(path: str | Path) -> str | None:
    """The quantization a model file's own weights imply: for a .gguf whose block linears are mostly Q4_0/Q4_1/Q4_K
    "int4", Q8_0 "int8"; otherwise (float weights, other formats, a directory) None. What `weights="auto"` uses:
    a 4-bit file runs at 4 bits, as llama.cpp runs it, instead of being widened to float32."""
    path = Path(path)
    if path.suffix.lower() != ".gguf" or not path.is_file():
        return None
    try:
        _, types = header(path)  # read once per process: the model's load has usually read it already
    except Exception as e:  # the reader's own errors name neither the file nor the problem clearly
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
    return stored_mode(types)


def auto_weights(weights: str | None, path: str | Path, model: nn.Module) -> str | None:
    """Resolve a `weights` setting: "auto" -> `stored_weights(path)` where it applies (a language model on the
    CPU, with the kernels), else None; "none" -> None; "int8" / "int4" as given."""
    if weights in (None, "none"):
        return None
    if weights != "auto":
        return weights
    mode = stored_weights(resolve(path))
    lm = getattr(model, "lm", model)
    if mode is None or not (hasattr(lm, "blocks") and hasattr(lm, "lm_head")) or not cpu_kernels():
        return None
    return mode if all(p.device.type == "cpu" for p in lm.parameters()) else None


def load_quantized_gguf(path: str | Path, weights: str | None, dtype: Any = torch.float32,
                        device: Any = "cpu") -> nn.Module | None:
    """A .gguf language model quantized while it loads, when `weights` asks for it ("auto": the file's own
    precision, as `stored_weights`; or "int8" / "int4") and the model goes to the CPU in float32: the model `load` +
    `quant.quantize` give, without the float32 model in between (peak ~0.58 GB instead of ~0.9 GB for
    SmolLM2-135M Q4_1); a float GGUF under "auto" comes back in float32. None in every other case: the caller
    loads and quantizes as usual."""
    if weights in (None, "none"):
        return None
    path = resolve(path)
    if path.suffix.lower() != ".gguf" or not path.is_file() or not cpu_kernels():
        return None
    if parse_dtype(dtype) != torch.float32 or parse_device(device).type != "cpu":
        return None
    return load_gguf(path, weights=weights).eval()  # "auto" is resolved from the header it reads anyway


def load_for_generation(path: str | Path, weights: str | None = "auto", dtype: Any = None,
                        device: Any = None) -> nn.Module:
    """`load`, then `weights` applied (`auto_weights`, `quant.quantize`): a GGUF bound for int4 / int8 on the CPU
    is read straight into them (`load_quantized_gguf`). What `mmlm chat` and the decode benchmarks open a
    language model with."""
    from .quant import quantize

    model = load_quantized_gguf(path, weights, dtype, device)
    if model is not None:
        return model
    model = load(path, dtype=dtype, device=device)
    mode = auto_weights(weights, path, model)
    return quantize(model, mode) if mode else model
