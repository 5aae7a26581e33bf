"""mmlm: CLIP and LLaVA from scratch in PyTorch.

    import mmlm
    model = mmlm.load("path/to/checkpoint-or-hf-dir")   # eval mode, float32, CPU
    model = mmlm.load(path, dtype=torch.bfloat16, device="cuda")   # streamed from disk straight into bf16 on cuda
    tok = mmlm.load_tokenizer("path/to/checkpoint-or-tokenizer")
    mmlm.save(model, "out_dir", tokenizer=tok)
    new_ids = mmlm.generate(lm, input_ids, attention_mask, max_new_tokens=32)   # (B, new_tokens)
    new_ids = mmlm.generate(llava, input_ids, attention_mask, pixel_values=images)   # images (N_images, C, H, W)
    images = mmlm.generate_image(mmlm.load("sd_dir"), ["a red circle"], steps=50, guidance=7.5)   # (B, 3, H, W) in [0, 1]
    mmlm.quantize(lm_or_llava, "int4")   # weight-only int8/int4 LM for faster CPU decoding (inference only)
    with mmlm.reference_mode(): ...      # every model on the plain textbook formulas (or MMLM_REFERENCE=1)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load", "save", "load_tokenizer", "generate", "generate_image", "quantize", "reference_mode", "__version__"]


def load(path: Any, dtype: Any = None, device: Any = None):
    """Open a model: an mmlm checkpoint dir, a transformers CLIPModel / LlamaForCausalLM / Qwen2ForCausalLM /
    LlavaForConditionalGeneration dir, a diffusers Stable Diffusion pipeline dir (.text_encoder .unet .vae .scheduler
    .tokenizer), or a llama-architecture .gguf file. Eval mode; float32 on the CPU unless
    `dtype` (torch.bfloat16 / float16 / float32, or "bf16", ...) and `device` ("cuda", "auto", ...) say otherwise.
    Built on the meta device, each tensor read from the memory-mapped file straight into its dtype and device.
    See mmlm.formats.load."""
    from .formats import load as _load

    return _load(path, dtype=dtype, device=device)


def save(model: Any, directory: Any, tokenizer: Any = None, preprocess: Any = None):
    """Write an mmlm checkpoint dir: config.json + model.safetensors (+ tokenizer.json, preprocess.json). A
    text-to-image model saves its own tokenizer when none is given."""
    from .checkpoint import save as _save

    if tokenizer is None:
        tokenizer = getattr(model, "tokenizer", None)

    return _save(model, directory, tokenizer=tokenizer, preprocess=preprocess)


def load_tokenizer(path: Any):
    """A checkpoint dir, tokenizer.json, CLIP bpe_simple_vocab_16e6.txt.gz or HF vocab.json+merges.txt dir."""
    from .formats import load_tokenizer as _load_tokenizer

    return _load_tokenizer(path)


def generate(model: Any, input_ids: Any, attention_mask: Any = None, **kwargs: Any):
    """New tokens (B, n) after each (left-padded) prompt; greedy when temperature == 0. See mmlm.generation.generate."""
    from .generation import generate as _generate

    return _generate(model, input_ids, attention_mask, **kwargs)


def generate_image(pipe: Any, prompts: Any, steps: int = 50, guidance: float | None = None, seed: int = 0, scheduler: str = "ddim",
                   latents: Any = None, **kwargs: Any):
    """Images (B, 3, H, W) in [0, 1] from a text-to-image model (`mmlm.load` of a diffusers pipeline dir or an mmlm
    one): `steps` of the "ddim", "ddpm" or "euler" sampler, classifier-free guidance when guidance > 1 (None: the
    model's own scale, 7.5 for a Stable Diffusion pipeline), noise from `seed` unless `latents` are given. See mmlm.image_generation.generate_image."""
    from .image_generation import generate_image as _generate_image

    return _generate_image(pipe, prompts, steps=steps, guidance=guidance, seed=seed, scheduler=scheduler,
                           latents=latents, **kwargs)


def quantize(model: Any, mode: str):
    """Weight-only quantization of a language model's (or a LLaVA's LM's) linear layers, in place: "int8" (per
    output row) or "int4" (groups of 32, llama.cpp's Q4_1 layout). Inference only. See mmlm.quant."""
    from .quant import quantize as _quantize

    return _quantize(model, mode)


def reference_mode(enabled: bool = True):
    """Context manager: every model runs its plain reference formulas instead of the fast kernels (the same
    outputs and gradients, tested). MMLM_REFERENCE=1 in the environment does the same. See mmlm.models.kernels."""
    from .models.kernels.switch import reference_mode as _reference_mode

    return _reference_mode(enabled)
