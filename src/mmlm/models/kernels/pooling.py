"""A pooled tower's output: one token per row after the last block (CLIP's class or end-of-text token).

The formula runs every block on every token and reads token rows[b] of each row b at the end. The fast path
computes the same values with less work: the last block computes only the pooled tokens (their queries against
every key), and a causal tower (CLIP's text) drops what comes after each row's pooled token and packs the rest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .mlp import linear
from .packing import ROW_MULTIPLE, Packing
from .recompute import recompute
from .switch import reference

# Pack the kept tokens when they fill less than this fraction of the (B, T) batch; above it the copies in
# and out of the attention layout cost about what the padding does.
PACK_BELOW = 0.9


def pooled_reference(transformer: nn.Module, x: torch.Tensor, rows: torch.Tensor,
                     attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    """x (B, T, C) through every block, then token rows[b] of each row b: (B, C)."""
    x = transformer(x, attn_mask=attn_mask, is_causal=is_causal)  # (B, T, C)
    return x[torch.arange(len(rows), device=x.device), rows]


def pooled(transformer: nn.Module, x: torch.Tensor, rows: torch.Tensor, attn_mask: torch.Tensor | None = None,
           is_causal: bool = False, causal_model: bool = False) -> torch.Tensor:
    """`pooled_reference`'s values. `causal_model`: no token sees a later one (through `is_causal` or a causal
    `attn_mask`), so the tokens after each row's pooled one reach nothing that is read and are not computed:
    the batch is cut after its last pooled token and, when that still leaves much padding, packed (`Packing`).
    The last block computes the pooled tokens alone (`_pooled_block`)."""
    if reference():
        return pooled_reference(transformer, x, rows, attn_mask, is_causal)
    packing = None
    if causal_model:
        used = int(rows.max()) + 1
        x = x[:, :used]
        if attn_mask is not None:
            attn_mask = attn_mask[..., :used, :used]
        keep = torch.arange(used, device=x.device) <= rows[:, None]  # (B, used)
        if keep.sum() <= PACK_BELOW * keep.numel():
            packing = Packing.from_mask(keep, multiple=ROW_MULTIPLE)  # the extra tokens come after some row's end
            x = packing.pack(x)  # (N, C)
    *blocks, last = transformer.blocks
    for block in blocks:  # (recompute: a block marked for activation checkpointing keeps only its input)
        x = block(x, attn_mask=attn_mask, is_causal=is_causal) if packing is None else \
            recompute(block, _packed_block, block, x, packing, attn_mask, is_causal)
    return recompute(last, _pooled_block, last, x, rows, attn_mask, is_causal, packing)


def _packed_block(block: nn.Module, x: torch.Tensor, packing: Packing, attn_mask: torch.Tensor | None,
                  is_causal: bool) -> torch.Tensor:
    """`block` on packed tokens (N, C) -> (N, C): only attention unpacks them to (B, T)."""
    attn = block.attn
    q, k, v = attn.heads(packing.unpack(linear(attn.qkv, block.norm1(x))))  # (B, H or Hkv, T, hd)
    y = attention(q, k, v, attn_mask, is_causal and attn_mask is None)  # (B, H, T, hd)
    x = x + linear(attn.proj, packing.pack(y.transpose(1, 2).flatten(2)))
    return x + block.mlp(block.norm2(x))


def _pooled_block(block: nn.Module, x: torch.Tensor, rows: torch.Tensor, attn_mask: torch.Tensor | None,
                  is_causal: bool, packing: Packing | None) -> torch.Tensor:
    """`block`'s output at token rows[b] of each row b alone: x (B, T, C) or packed (N, C) -> (B, C)."""
    h = _pooled_attention(block.attn, block.norm1(x), rows, attn_mask, is_causal, packing)
    x = take_rows(x, rows, packing) + h  # the residual of the kept tokens only
    return x + block.mlp(block.norm2(x))


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


def _pooled_attention(attn: nn.Module, x: torch.Tensor, rows: torch.Tensor, attn_mask: torch.Tensor | None,
                      is_causal: bool, packing: Packing | None) -> torch.Tensor:
    """`attn`'s output at token rows[b] of each row b: (B, out_dim). A plain q/k/v projection takes the
    associativity shortcut (`_one_query_per_row`); another (LoRA, quantized) projects every token and keeps
    one query per row."""
    if type(attn.qkv) is nn.Linear:
        return _one_query_per_row(attn, x, rows, attn_mask, is_causal, packing)
    q, k, v = attn.heads(attn.qkv(x) if packing is None else packing.unpack(attn.qkv(x)))  # (B, H or Hkv, T, hd)
    B, T = q.shape[0], q.shape[2]
    q = q[torch.arange(B, device=q.device), :, rows].unsqueeze(2)  # (B, H, 1, hd)
    y = attention(q, k, v, rows_mask(attn_mask, is_causal, rows, T), False)  # (B, H, 1, hd)
    return attn.proj(y.reshape(B, attn.q_dim))


def _one_query_per_row(attn: nn.Module, x: torch.Tensor, rows: torch.Tensor, attn_mask: torch.Tensor | None,
                       is_causal: bool, packing: Packing | None) -> torch.Tensor:
    """One query per row without projecting any key or value. For one query q per row, by associativity
    q . (W_k x_j + b_k) = (W_k^T q) . x_j + q . b_k, the last term the same for every key (softmax drops it),
    and sum_j p_j (W_v x_j + b_v) = W_v (sum_j p_j x_j) + b_v: the query goes back to the input width and the
    attention weights average the inputs. Per row that is ~2 C H (hd + T) multiply-adds instead of the
    keys' and values' 4 T C Hkv hd (CLIP's last block: ~7 % of them at 17 tokens, ~2 % at 197)."""
    H, Hkv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    xs = x if packing is None else packing.unpack(x)  # (B, T, C), zeros at dropped positions
    B, T, C = xs.shape
    w_q, w_k, w_v = attn.qkv.weight.split([attn.q_dim, attn.kv_dim, attn.kv_dim])
    b = attn.qkv.bias
    b_q, b_v = (None, None) if b is None else (b[: attn.q_dim], b[attn.q_dim + attn.kv_dim :])
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
    return attn.proj(y.reshape(B, attn.q_dim))
