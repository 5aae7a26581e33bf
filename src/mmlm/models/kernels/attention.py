"""Scaled dot-product attention: the formula, and how it runs fast on each device."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import native
from .switch import avx2_inference, cpu_path, reference


def causal_mask(T: int, S: int, device: torch.device) -> torch.Tensor:
    """(T, S) bool, True where query t may see key s: the T queries are the last T of the S positions, so query t
    sees keys up to t + S - T."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                        is_causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v, written out. q (B, H, T, d); k, v (B, Hkv, S, d), H a multiple of Hkv;
    attn_mask bool (True = may attend) or additive float, broadcastable to (B, H, T, S)."""
    rep = q.shape[1] // k.shape[1]  # grouped-query attention: each k/v head serves `rep` query heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5  # (B, H, T, S)
    if is_causal:  # query t sees keys up to t (the last T of S keys are the new ones)
        T, S = scores.shape[-2:]
        scores = scores.masked_fill(~causal_mask(T, S, q.device), float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return scores.softmax(dim=-1).to(v.dtype) @ v  # (B, H, T, d)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              is_causal: bool = False) -> torch.Tensor:
    """`attention_reference`'s values, fast.

    PyTorch's fused kernel (`scaled_dot_product_attention`) is fast forward but its CPU backward is slow at
    CLIP-sized sequences (measured: a small CLIP trained ~2x faster with plain matmuls), so while training on a
    CPU the same maths runs as three ops with in-place masking, unless the attention is unmasked over MANY_KEYS
    keys or more (a UNet's over image positions), where the plain scores (B, H, T, S) outgrow the caches and the
    fused kernel, which never stores them, is faster both ways; everywhere else (inference, GPUs) the fused
    kernel does, sharing each k/v head among its query heads without copying (grouped-query attention). Three
    shapes run in mmlm's C loops instead (`native.py`): one query per row (a decoding step), and, on an AVX2 CPU
    without a gradient, unmasked attention with heads of at most 16 dims (a UNet's over image positions: there
    the exponentials dominate, and the C loop's cost ~0.5x PyTorch's), and unmasked or causal attention over at
    most FEW_KEYS keys with heads of 16 dims or more (a CLIP tower's, a UNet's cross-attention: per head two small
    matmuls in the cache, where PyTorch's fused kernel spends more on its setup than on the products).
    """
    if reference():
        return attention_reference(q, k, v, attn_mask, is_causal)
    if _one_query(q, k, v, attn_mask):  # a decoding step: a loop over the keys, no dispatch between ops
        return native.decode_attention(q, k, v, None if attn_mask is None else attn_mask[:, 0, 0, :])
    if attn_mask is None and not is_causal and _small_heads(q, k, v):  # a UNet's: exponentials cost the most
        return native.attention(q, k, v)
    if attn_mask is None and _few_keys(q, k, v, is_causal):  # a CLIP tower's: two small matmuls a head
        return native.tiled_attention(q, k, v, is_causal)
    gqa = k.shape[1] != q.shape[1]
    if not (cpu_path(q) and torch.is_grad_enabled() and q.requires_grad) or _many_keys(k, attn_mask, is_causal):
        if is_causal and attn_mask is None and q.shape[2] != k.shape[2]:  # SDPA aligns is_causal top-left; the
            attn_mask, is_causal = causal_mask(q.shape[2], k.shape[2], q.device), False  # formula's: the last T
        if gqa:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    if gqa:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scale = q.shape[-1] ** -0.5
    if k.shape[-2] > q.shape[-1]:  # the scale on the smaller of q (B, H, T, d) and the scores (B, H, T, S)
        scores = (q * scale) @ k.transpose(-2, -1)  # (B, H, T, S)
    else:
        scores = (q @ k.transpose(-2, -1)) * scale
    if is_causal:
        T, S = scores.shape[-2:]
        attn_mask = causal_mask(T, S, q.device)
    if attn_mask is not None:  # in place: neither product's backward needs the scores
        scores = scores.masked_fill_(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores.add_(attn_mask)
    return scores.softmax(dim=-1).to(v.dtype) @ v


MANY_KEYS = 256  # from here PyTorch's fused kernel trained faster than three ops (AVX2, fp32, forward + backward:
# 1.2-1.4x at 256 keys x 16 images, 4.5x at 256 keys x 64 images with 16-dim heads, 2.2-3.3x at 1024 keys)


def _many_keys(k: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> bool:
    """Whether a call with a gradient on a CPU takes PyTorch's fused kernel: unmasked, not causal, MANY_KEYS keys
    or more."""
    return attn_mask is None and not is_causal and k.shape[2] >= MANY_KEYS


SMALL_HEAD_DIM = 16  # up to here the C loop beat PyTorch's fused CPU kernel (AVX2: 1.3x at 16, 2x at 4 and 8)


def _small_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `native.attention` takes this (unmasked, non-causal) call: float32 on a CPU, no gradient, as many
    k/v heads as query heads, a head dim of at most SMALL_HEAD_DIM, unit stride along it, and the AVX2 build of
    the C loops (the one it was measured on; elsewhere PyTorch's kernel)."""
    return (q.shape[-1] <= SMALL_HEAD_DIM and q.shape[1] == k.shape[1]
            and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and avx2_inference(q, k, v))


FEW_KEYS = 256  # up to here the tiled C loop beat PyTorch's fused CPU kernel (AVX2: 1.0-2.0x; 0.87-1.04x at 512-4096)


def _few_keys(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool) -> bool:
    """Whether `native.tiled_attention` takes this (unmasked, or causal) call: float32 on a CPU, no gradient, as
    many k/v heads as query heads, a head dim of 16 or more (smaller ones leave its sixteen-wide tiles half empty),
    at most FEW_KEYS keys (and, causal, no more queries than keys), unit stride along the head dim, and the AVX2
    build of the C loops."""
    return (q.shape[-1] >= 16 and k.shape[2] <= FEW_KEYS and q.shape[1] == k.shape[1]
            and not (is_causal and q.shape[2] > k.shape[2])
            and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and avx2_inference(q, k, v))


def _one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None) -> bool:
    """Whether `native.decode_attention` takes this call: one query per row (a decoding step, where is_causal adds
    nothing), float32 on a CPU, no gradient, a bool mask (B or 1, 1, 1, S) or none, rows of keys contiguous."""
    return (q.shape[2] == 1 and cpu_path(q) and q.dtype == k.dtype == v.dtype == torch.float32
            and not torch.compiler.is_compiling()  # a ctypes call: torch.compile keeps its own ops
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))
            and q.stride(-1) == 1 and k.stride(-1) == v.stride(-1) == 1
            and k.stride(2) == v.stride(2) == k.shape[-1]
            and (attn_mask is None or (attn_mask.dtype == torch.bool and attn_mask.dim() == 4
                                       and attn_mask.shape[1:3] == (1, 1) and attn_mask.shape[-1] == k.shape[2]
                                       and attn_mask.shape[0] in (1, q.shape[0]) and attn_mask.stride(-1) == 1))
            and native.kernels() is not None)
