"""The building blocks every mmlm model shares: one attention, one MLP, one pre-norm residual block.

CLIP's vision and text towers, the ResNet attention pool and the decoder LLM all use these; there is
no second attention anywhere in the package. The LLM adds what CLIP does not use: rotary position
embeddings (`rope`), a preallocated key/value cache (`KVCache`), RMSNorm and the SwiGLU MLP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU (the original checkpoints were trained with it):
    x * sigmoid(1.702 x), written as silu(1.702 x) / 1.702, whose fused kernel and backward make three passes
    over the tensor each way instead of three and five (same values to float rounding; measured 1.5x faster)."""
    return F.silu(x * 1.702) * (1 / 1.702)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACT_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,
    "gelu_tanh": gelu_tanh,
    "silu": F.silu,
}


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
           is_causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v for q (B, H, T, d) and k, v (B, Hkv, S, d), H a multiple of Hkv.

    PyTorch's fused CPU kernel is fast forward but its backward is slow at CLIP-sized sequences (measured:
    a small CLIP trained ~2x faster with plain matmuls), so while training on a CPU the same maths runs
    as three plain ops; everywhere else (inference, GPUs) the fused kernel does, sharing each k/v head
    among its query heads without copying (grouped-query attention).
    """
    gqa = k.shape[1] != q.shape[1]
    if not (q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad):
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
        attn_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if attn_mask is not None:  # in place: neither product's backward needs the scores
        scores = scores.masked_fill_(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores.add_(attn_mask)
    return scores.softmax(dim=-1).to(v.dtype) @ v


# ----------------------------------------------------------------------------- rotary position embedding

def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """(head_dim/2,) rotation frequencies theta^(-2i/d), rescaled as `scaling` says.

    scaling (transformers' `rope_parameters` / `rope_scaling`): None or type "default" leaves them;
    "linear" divides every frequency by `factor` (positions stretched); "llama3" (Llama 3.1) divides only
    the low frequencies (wavelengths longer than original_max_position_embeddings / low_freq_factor), keeps
    the high ones and interpolates smoothly between.
    """
    # always a real CPU tensor, also while a model is built on the meta device (its weights loaded later):
    # the frequencies follow from the config, no file holds them
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(is_mid, mid, scaled)
    raise ValueError(f"rope scaling type {kind!r} is not supported; known: default, linear, llama3")


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids (B, T) -> cos, sin (B, T, 1, head_dim), computed in float32 like transformers.

    The head axis comes after T so that q and k, still in the (B, T, heads, hd) layout of the projection,
    rotate in one go (see Attention.forward).
    """
    freqs = position_ids[:, :, None].float() * inv_freq.float()  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None]  # (B, T, 1, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i+d/2}) pair by its angle: the half-split layout of transformers' Llama.

    (llama.cpp's GGUF files store q/k rows interleaved instead; the GGUF loader permutes them back.)
    """
    if torch.is_grad_enabled() and x.requires_grad:  # training: the same rotation, in fewer passes (below)
        return _Rotate.apply(x, cos, sin)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rope's maths in three passes over x (a product, then one fused multiply-add per half), in x's dtype."""
    h = x.shape[-1] // 2
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    out = x * cos
    out[..., :h].addcmul_(x[..., h:], sin[..., :h], value=-1)
    out[..., h:].addcmul_(x[..., :h], sin[..., h:])
    return out


class _Rotate(torch.autograd.Function):
    """Rotary embedding with its own backward: a rotation's gradient is the inverse rotation (sin negated), one
    more `_rotate`, where autograd would replay the negation, concatenation, products and sum op by op
    (measured: rotary positions took ~1/8 of a SmolLM2 LLaVA training step; q and k stay in the projection's
    dtype instead of being promoted to float32 by the float32 cos/sin)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None


# ----------------------------------------------------------------------------- key/value cache

@dataclass
class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions: k[i], v[i] (B, Hkv, S, hd) per layer.

    `pos` positions are filled; a forward pass of T new tokens writes slots pos..pos+T-1 of each layer
    and the model then advances `pos`. Nothing is reallocated while decoding. Each layer has tensors of its own
    (not views of one big tensor): a compiled decoding step then writes its slot in place, instead of copying
    the whole cache back into the big tensor that a view would belong to (measured: ~3 ms a step at batch 8).
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    pos: int = 0

    @classmethod
    def empty(cls, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
              dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "KVCache":
        shape = (batch, kv_heads, max_len, head_dim)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)])

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only batch rows `rows` (finished sequences stop costing attention work)."""
        self.k, self.v = [t[rows] for t in self.k], [t[rows] for t in self.v]


@dataclass
class Packing:
    """The real tokens of a padded (B, T) batch, packed into N rows: position-wise layers (norms, projections,
    MLPs) then skip the padding, and only attention, which needs the (B, T) layout, unpacks them.

    `index` (N,) holds the flat positions b * T + t of the kept tokens, row by row. A causal model may drop
    every token after the last one it reads (CLIP's text tower after each row's end-of-text token): the
    tokens before it never see them, so the kept tokens' values are the same, with less work.
    """

    batch: int
    length: int
    index: torch.Tensor
    dropped: torch.Tensor  # the other flat positions

    @classmethod
    def from_mask(cls, keep: torch.Tensor, multiple: int = 1) -> "Packing":
        """keep: (B, T) bool, True = a token to compute. `multiple` rounds the count N up by also computing the
        first few dropped positions (harmless where dropping was optional, as after a causal row's last token);
        see `round_rows`."""
        flat = keep.flatten()
        index, dropped = flat.nonzero().flatten(), (~flat).nonzero().flatten()
        extra = min(-len(index) % multiple, len(dropped))
        if extra:
            index, dropped = torch.cat([index, dropped[:extra]]).sort().values, dropped[extra:]
        return cls(keep.shape[0], keep.shape[1], index, dropped)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...)."""
        return x.flatten(0, 1).index_select(0, self.index)

    def find(self, rows: torch.Tensor) -> torch.Tensor:
        """(B,) a kept position t in each row -> (B,) where those tokens sit among the N packed ones."""
        return torch.searchsorted(self.index, torch.arange(self.batch, device=rows.device) * self.length + rows)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, T, ...), zeros at the dropped positions."""
        flat = x.new_empty(self.batch * self.length, *x.shape[1:])  # no zero fill of the kept rows
        # zeros first, while `flat` needs no gradient: the fill then leaves nothing to undo in the backward
        flat.index_fill_(0, self.dropped, 0.0).index_copy_(0, self.index, x)
        return flat.view(self.batch, self.length, *x.shape[1:])


# Matmuls whose row count changes from batch to batch (packed tokens, the positions where a loss is computed)
# round it up to a multiple of this. Under bf16 autocast on a CPU every new shape makes oneDNN generate and
# cache a kernel: with a few hundred row counts a run filled that cache (1024 kernels, ~3 MB each, 3.4 GB)
# and then slowed ~2x once it began evicting and regenerating them (measured in LLaVA's stage 2).
ROW_MULTIPLE = 64


def round_rows(x: torch.Tensor, multiple: int = ROW_MULTIPLE) -> torch.Tensor:
    """(N, ...) -> (N', ...) with zero rows appended up to a multiple of `multiple`; slice the result back to N."""
    extra = -x.shape[0] % multiple
    return torch.cat([x, x.new_zeros(extra, *x.shape[1:])]) if extra else x


class Attention(nn.Module):
    """Multi-head scaled-dot-product attention with a fused q/k/v projection.

    `n_kv_heads < n_heads` gives grouped-query attention (each k/v head serves n_heads // n_kv_heads
    query heads). The fused weight stacks [q; k; v] row-wise, the layout of OpenAI's `in_proj_weight`.
    `out_dim` lets the output projection change width (CLIP's ResNet attention pool projects to the
    embedding size). A decoder passes `rope` (cos, sin) to rotate q and k, and `cache` (the layer's
    k, v buffers (B, Hkv, S, hd) and the first free slot) to attend over earlier tokens too; when that slot
    is a LongTensor of slot indices, every shape stays the same from one decoding step to the next.
    With `packing`, x holds only the packed tokens (N, C) (see `Packing`). With `rows` (B,), only the output of
    token `rows[b]` of each row b is computed (its query against every key): (B, out_dim). A pooled model
    reads one token per row from its last layer (CLIP's class or end-of-text token), so the other queries,
    their output projections and their MLPs would be computed for nothing.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None = None, head_dim: int | None = None,
                 qkv_bias: bool = True, out_bias: bool = True, out_dim: int | None = None):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        if n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        self.head_dim = head_dim or dim // n_heads
        self.q_dim = n_heads * self.head_dim
        self.kv_dim = self.n_kv_heads * self.head_dim
        self.qkv = nn.Linear(dim, self.q_dim + 2 * self.kv_dim, bias=qkv_bias)
        self.proj = nn.Linear(self.q_dim, out_dim or dim, bias=out_bias)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: tuple[torch.Tensor, torch.Tensor, int] | None = None,
                packing: Packing | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, C) or, packed, (N, C); attn_mask: bool (True = may attend) or additive float, broadcastable
        to (B, H, T, S)."""
        if rows is not None and rope is None and cache is None and type(self.qkv) is nn.Linear:
            return self._one_query_per_row(x, rows, attn_mask, is_causal, packing)
        H, Hkv = self.n_heads, self.n_kv_heads
        qkv = self.qkv(x).unflatten(-1, (H + 2 * Hkv, self.head_dim))  # (..., H + 2 Hkv, hd): q, k, v heads
        if packing is not None:
            qkv = packing.unpack(qkv)
        B, T = qkv.shape[:2]
        # split, not slicing: its backward concatenates the gradients instead of filling a zero tensor per slice
        if rope is not None:  # q and k heads rotate together: half the small ops of a token-by-token decode step
            qk, v = qkv.split([H + Hkv, Hkv], dim=2)
            q, k = apply_rope(qk, *rope).split([H, Hkv], dim=2)
        else:
            q, k, v = qkv.split([H, Hkv, Hkv], dim=2)
        if rows is not None:
            q = q[torch.arange(B, device=q.device), rows].unsqueeze(1)  # (B, 1, H, hd)
            attn_mask, is_causal = rows_mask(attn_mask, is_causal, rows, T), False
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or Hkv, T, hd)
        if cache is not None:
            k_buf, v_buf, pos = cache
            if isinstance(pos, torch.Tensor):  # static shapes (a compilable decoding step): write slots `pos`,
                k_buf.index_copy_(2, pos, k)  # attend over the whole buffer; attn_mask hides the empty slots
                v_buf.index_copy_(2, pos, v)
                k, v = k_buf, v_buf
            else:
                k_buf[:, :, pos : pos + T] = k
                v_buf[:, :, pos : pos + T] = v
                k, v = k_buf[:, :, : pos + T], v_buf[:, :, : pos + T]  # (B, Hkv, S, hd)
        y = attend(q, k, v, attn_mask, is_causal and attn_mask is None)
        if rows is not None:
            return self.proj(y.reshape(B, self.q_dim))  # (B, H, 1, hd) -> (B, H*hd)
        y = y.transpose(1, 2).reshape(B, T, self.q_dim)  # (B, T, H*hd)
        return self.proj(y if packing is None else packing.pack(y))

    def _one_query_per_row(self, x: torch.Tensor, rows: torch.Tensor, attn_mask: torch.Tensor | None,
                           is_causal: bool, packing: Packing | None) -> torch.Tensor:
        """The `rows` path without projecting any key or value. For one query q per row, by associativity
        q . (W_k x_j + b_k) = (W_k^T q) . x_j + q . b_k, the last term the same for every key (softmax drops it),
        and sum_j p_j (W_v x_j + b_v) = W_v (sum_j p_j x_j) + b_v: the query goes back to the input width and the
        attention weights average the inputs. Per row that is ~2 C H (hd + T) multiply-adds instead of the
        keys' and values' 4 T C Hkv hd (CLIP's last block: ~7 % of them at 17 tokens, ~2 % at 197)."""
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        xs = x if packing is None else packing.unpack(x)  # (B, T, C), zeros at dropped positions
        B, T, C = xs.shape
        w_q, w_k, w_v = self.qkv.weight.split([self.q_dim, self.kv_dim, self.kv_dim])
        b = self.qkv.bias
        b_q, b_v = (None, None) if b is None else (b[: self.q_dim], b[self.q_dim + self.kv_dim :])
        q = F.linear(take_rows(x, rows, packing), w_q, b_q) * hd**-0.5  # (B, H*hd)
        q = torch.einsum("bgrd,gdc->bgrc", q.view(B, Hkv, H // Hkv, hd), w_k.view(Hkv, hd, C))
        scores = q.reshape(B, H, C) @ xs.transpose(1, 2)  # (B, H, T)
        mask = rows_mask(attn_mask, is_causal, rows, T)
        if mask is not None:
            mask = mask.squeeze(2)  # (B, 1 or H, T)
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        z = scores.softmax(dim=-1).to(xs.dtype) @ xs  # (B, H, C): each head's attention-weighted input
        y = torch.einsum("bgrc,gdc->bgrd", z.view(B, Hkv, H // Hkv, C), w_v.view(Hkv, hd, C))  # (B, Hkv, rep, hd)
        if b_v is not None:
            y = y + b_v.view(Hkv, 1, hd)
        return self.proj(y.reshape(B, self.q_dim))


def take_rows(x: torch.Tensor, rows: torch.Tensor, packing: Packing | None = None) -> torch.Tensor:
    """Token rows[b] of each row b: (B, T, C) -> (B, C), or from packed tokens (N, C)."""
    if packing is not None:
        return x[packing.find(rows)]
    return x[torch.arange(len(rows), device=x.device), rows]


def rows_mask(attn_mask: torch.Tensor | None, is_causal: bool, rows: torch.Tensor, S: int) -> torch.Tensor | None:
    """The mask of the queries at positions `rows` (B,) alone: (B, 1 or H, 1, S), from a mask broadcastable to
    (B, H, T, S) and/or causality (query t sees keys <= t)."""
    if attn_mask is not None:
        attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        if attn_mask.shape[2] > 1:
            attn_mask = attn_mask.expand(len(rows), -1, -1, -1)[torch.arange(len(rows), device=rows.device), :, rows]
            attn_mask = attn_mask.unsqueeze(2)
    if not is_causal:
        return attn_mask
    causal = (torch.arange(S, device=rows.device) <= rows[:, None])[:, None, None, :]  # (B, 1, 1, S)
    if attn_mask is None:
        return causal
    if attn_mask.dtype == torch.bool:
        return attn_mask & causal
    return attn_mask.masked_fill(~causal, float("-inf"))


class MLP(nn.Module):
    """Two linear layers with an activation between (CLIP's c_fc / c_proj)."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu", bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = ACT_FNS[act]
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is quick_gelu and _plain_with_bias(self.fc1) and _plain_with_bias(self.fc2):
            # fc2(silu(1.702 fc1(x)) / 1.702) with both scalings inside the matmuls, not passes over the
            # (..., hidden) activations: two fewer forward and two backward
            fc1, fc2, x2 = self.fc1, self.fc2, x.flatten(0, -2)
            if torch.is_grad_enabled():  # on the weights: addmm's alpha and beta would scale whole gradients
                h = torch.addmm(fc1.bias * 1.702, x2, (fc1.weight * 1.702).t())
                y = torch.addmm(fc2.bias, F.silu(h), (fc2.weight * (1 / 1.702)).t())
            else:  # as addmm's alpha and beta: free in the matmul, no scaled copy of the weights per call
                h = torch.addmm(fc1.bias, x2, fc1.weight.t(), beta=1.702, alpha=1.702)
                y = torch.addmm(fc2.bias, F.silu(h, inplace=True), fc2.weight.t(), alpha=1 / 1.702)
            return y.view(*x.shape[:-1], y.shape[-1])
        return self.fc2(self.act(self.fc1(x)))


def _plain_with_bias(linear: nn.Module) -> bool:
    """An nn.Linear itself (not a LoRA or quantized replacement, whose forward does more) with a bias."""
    return type(linear) is nn.Linear and linear.bias is not None


class SwiGLU(nn.Module):
    """Llama's gated MLP: down(act(gate(x)) * up(x)); gate and up are one fused matmul (fc1 = [gate; up])."""

    def __init__(self, dim: int, hidden: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.hidden = hidden
        self.fc1 = nn.Linear(dim, 2 * hidden, bias=bias)
        self.act = ACT_FNS[act]
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc1(x)
        if self.act is F.silu and torch.is_grad_enabled() and z.requires_grad:
            return self.fc2(_SiluGate.apply(z, self.hidden))
        gate, up = z.split(self.hidden, dim=-1)
        return self.fc2(self.act(gate) * up)


class _SiluGate(torch.autograd.Function):
    """silu(gate) * up of z = [gate, up], whose backward writes d gate and d up straight into one (..., 2 hidden)
    gradient: through `split`, autograd makes the two halves and then concatenates them (a copy of the MLP's
    widest activation per layer)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, hidden: int) -> torch.Tensor:
        gate, up = z.split(hidden, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(z, act)
        ctx.hidden = hidden
        return act * up

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        z, act = ctx.saved_tensors
        gate, up = z.split(ctx.hidden, dim=-1)
        dz = torch.empty_like(z)
        d_gate, d_up = dz.split(ctx.hidden, dim=-1)
        torch.mul(dy, act, out=d_up)
        torch.ops.aten.silu_backward.grad_input(dy * up, gate, grad_input=d_gate)
        return dz, None


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in float32 (transformers' LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            # training: one autograd function (PyTorch's CPU rms_norm is a chain of ops, each differentiated
            # on its own), its output already in the dtype the next matmul casts it to under autocast
            return _RMSNormFn.apply(x, self.weight, self.eps, matmul_dtype(x, x.dtype))
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # the same product, one op fewer
            return F.rms_norm(x, (x.shape[-1],), self.weight, eps=self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def matmul_dtype(x: torch.Tensor, default: torch.dtype) -> torch.dtype:
    """The dtype a matmul on x's device computes in: autocast's where it is on, else `default`."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else default


def weight_in(module: nn.Module, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` (a parameter of `module`) in `dtype`. A frozen weight's cast is kept on the module and reused until
    the weight changes (in place or replaced): autocast casts every weight at every call, which for a frozen LM
    under LoRA (SmolLM2: 135M weights, 106M in its blocks) re-reads and re-writes them all at every step."""
    if weight.dtype == dtype:
        return weight
    if weight.requires_grad or weight.is_inference():  # trained, or made under inference_mode (no version counter)
        return weight.to(dtype)
    key = (id(weight), weight.data_ptr(), weight._version, dtype)
    cached = module.__dict__.get("_weight_cast")
    if cached is None or cached[0] != key:
        cached = (key, weight.detach().to(dtype))
        module.__dict__["_weight_cast"] = cached  # a plain attribute: not a buffer, never saved
    return cached[1]


class _RMSNormFn(torch.autograd.Function):
    """y = x r w with r = (mean(x^2) + eps)^-1/2 per row, computed in float32 and written in `out_dtype`.
    Backward, with n = x r and g = dy w: dx = r (g - n mean(g n)), dw = sum over rows of dy n. Three passes
    over the activations forward and six backward, where autograd through the op chain takes about twice that."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # float32 at least (float64 stays float64)
        r = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        torch.mul(xf * r, weight, out=y)
        ctx.save_for_backward(x, r, weight)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, r, weight = ctx.saved_tensors
        n = x * r  # float32 at least, by type promotion (no separate cast of x or dy)
        g = dy * weight.to(r.dtype)
        dot = torch.linalg.vecdot(g, n, dim=-1).unsqueeze(-1).div_(x.shape[-1])  # mean(g n) per row
        dx = torch.addcmul(g, n, dot, value=-1).mul_(r).to(x.dtype)
        dw = (dy * n).flatten(0, -2).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm1(x)), then x + mlp(norm2(x)).

    `norm` is a class (or factory) called with the width: LayerNorm for CLIP, RMSNorm for Llama; `mlp`
    is the MLP module (GELU MLP or SwiGLU). `rope` and `cache` pass through to the attention; with `rows` (B,)
    only token `rows[b]` of each row comes out: (B, C) (see `Attention`).
    """

    def __init__(self, dim: int, attn: Attention, mlp: nn.Module, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.norm1 = norm(dim)
        self.attn = attn
        self.norm2 = norm(dim)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: tuple[torch.Tensor, torch.Tensor, int] | None = None,
                packing: Packing | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        h = self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal, rope=rope, cache=cache,
                      packing=packing, rows=rows)
        if rows is not None:  # the residual of the kept tokens only
            x = take_rows(x, rows, packing)
        x = x + h
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of LayerNorm/GELU-MLP blocks: the trunk of both CLIP towers."""

    def __init__(self, width: int, layers: int, heads: int, mlp_dim: int, act: str, norm_eps: float):
        super().__init__()
        self.width = width
        self.blocks = nn.ModuleList(
            Block(width, Attention(width, heads), MLP(width, mlp_dim, act), lambda d: nn.LayerNorm(d, eps=norm_eps))
            for _ in range(layers)
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                hidden_states: list[torch.Tensor] | None = None, upto: int | None = None,
                packing: Packing | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, C), or (N, C) with `packing`. When `hidden_states` is a list, the input and each block's
        output are appended. `upto` runs only the first `upto` blocks (a reader of layer -2 never needs the last).
        With `rows` (B,), the last block computes only token `rows[b]` of each row b and returns (B, C): a pooled
        reader saves most of that block."""
        if hidden_states is not None:
            hidden_states.append(x)
        blocks = self.blocks[:upto]
        for i, block in enumerate(blocks):
            last = rows if i == len(blocks) - 1 else None
            x = block(x, attn_mask=attn_mask, is_causal=is_causal, packing=packing, rows=last)
            if hidden_states is not None:
                hidden_states.append(x)
        return x

    def init_openai(self) -> None:
        """OpenAI CLIP's text-transformer init: std shrinks with depth for the residual projections."""
        proj_std = self.width**-0.5 * (2 * len(self.blocks)) ** -0.5
        attn_std = self.width**-0.5
        fc_std = (2 * self.width) ** -0.5
        for b in self.blocks:
            nn.init.normal_(b.attn.qkv.weight, std=attn_std)
            nn.init.normal_(b.attn.proj.weight, std=proj_std)
            nn.init.normal_(b.mlp.fc1.weight, std=fc_std)
            nn.init.normal_(b.mlp.fc2.weight, std=proj_std)

    def init_torch_mha(self) -> None:
        """The init nn.MultiheadAttention gives (OpenAI's vision transformer is left at it)."""
        for b in self.blocks:
            nn.init.xavier_uniform_(b.attn.qkv.weight)
            nn.init.zeros_(b.attn.qkv.bias)
            nn.init.zeros_(b.attn.proj.bias)
