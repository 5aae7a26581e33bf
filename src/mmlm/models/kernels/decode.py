"""A decoding step of a quantized Llama LM, each block one call into compiled loops: the fast path of
`LM.decode_step` (models/lm.py), whose plain formula is that method's own loop over the blocks.

At one token per row a block's arithmetic is small (SmolLM2-135M: 3.5M weights, read once) and PyTorch's per-op
dispatch and the Python between the ops cost as much as the weight reads: measured on a 2-core Xeon, 1 thread,
~10 ms of a ~23 ms step. `csrc/weight_only.c`'s `mmlm_decoder_layer` runs the block's norms, int4/int8 matmuls
(the same loops as `QuantLinear`), rotary positions, cache write, attention and SwiGLU in one call. It takes the
steps `LM.decode_step` takes eagerly on a model `mmlm.quantize` made (or a GGUF loaded at 4/8 bits) with mmlm's
loops: float32, an int slot, no Flamingo hook, no gradient; any other step runs the blocks as written.
tests/test_native.py asserts the two give the same logits and the same cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import native
from ..positions import rope_cos_sin
from .switch import reference


def decode_step(model, input_ids: torch.Tensor, position_ids: torch.Tensor, key_mask: torch.Tensor, cache,
                slot) -> torch.Tensor | None:
    """`model.decode_step`'s logits (B, V) through the compiled block, or None where it does not apply."""
    if reference() or not isinstance(slot, int) or input_ids.shape[1] != 1:
        return None
    if torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
        return None  # the loops have no backward
    layers = _layers(model)
    if layers is None or not _cache_ok(cache, slot):
        return None
    x = model.embed(input_ids)[:, 0].contiguous()  # (B, C) float32, updated in place block by block
    cos, sin = (t[:, 0, 0].contiguous() for t in rope_cos_sin(model.inv_freq, position_ids, torch.float32))  # (B, hd)
    mask = key_mask[:, : slot + 1]
    if mask.dtype != torch.bool or mask.stride(-1) != 1:
        mask = mask.bool().contiguous()
    mask = mask.view(torch.uint8)
    eps = model.blocks[0].norm1.eps
    for (norm1, norm2, linears, heads, hidden), k, v in zip(layers, cache.k, cache.v):
        native.decoder_layer(x, norm1, norm2, eps, linears, cos, sin, k, v, slot, mask, heads, hidden)
    return model.lm_head(model.norm(x))  # (B, V)


def _cache_ok(cache, slot: int) -> bool:
    """Every layer's k and v float32 (B, Hkv, S, hd) at the same strides, unit along hd and S (a window of continuous
    batching's pool is fine), with room for `slot`."""
    k0 = cache.k[0]
    strides = k0.stride()
    return (k0.dtype == torch.float32 and strides[3] == 1 and strides[2] == k0.shape[3] and k0.shape[2] > slot
            and all(t.dtype == torch.float32 and t.stride() == strides and t.shape == k0.shape
                    for t in cache.k + cache.v))


def _layers(model) -> list | None:
    """Per block: its two norm weights, its four linears as `native.Linear`s, heads and SwiGLU width; None when the
    model is not one the loop takes. Kept on the model while the layers' buffers are the same tensors."""
    from ...quant import QuantLinear  # here: quant imports the kernels' switch, so at import time this would cycle

    blocks = getattr(model, "blocks", None)
    if blocks is None or native.kernels() is None:
        return None
    cached = model.__dict__.get("_fused_decode")
    if cached is not None and all(d.get(k) is v for d, k, v in cached[0]):
        return cached[1]
    # what the pointers point into: every submodule, parameter and buffer of the blocks, checked by identity at each
    # step (dict lookups, ~40 us for SmolLM2; nn.Module attribute access was ~10x that) and kept alive by the cache
    structure = [(model._modules, "blocks", blocks)]
    for module in blocks.modules():
        for d in (module._modules, module._parameters, module._buffers):
            structure += [(d, k, v) for k, v in d.items()]
    tensors = [m for b in blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.fc1, b.mlp.fc2)]
    layers = None
    if (all(isinstance(m, QuantLinear) and m.native and (m.bias is None or m.bias.dtype == torch.float32)
            for m in tensors)
            and all(b.mlp.act is F.silu and b.norm1.eps == blocks[0].norm1.eps == b.norm2.eps for b in blocks)
            and all(b.norm1.weight.dtype == b.norm2.weight.dtype == torch.float32 for b in blocks)
            and model.embed.weight.dtype == torch.float32 and blocks[0].attn.head_dim % 2 == 0):
        layers = [(b.norm1.weight.detach().contiguous(), b.norm2.weight.detach().contiguous(),
                   [native.linear_struct(m) for m in (b.attn.qkv, b.attn.proj, b.mlp.fc1, b.mlp.fc2)],
                   b.attn.n_heads, b.mlp.hidden) for b in blocks]
    model.__dict__["_fused_decode"] = (structure, layers)  # a plain attribute (not saved)
    return layers
