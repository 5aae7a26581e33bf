"""Where a token is: rotary position embeddings (RoPE) and the key/value cache of a decoder."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


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
    rotate in one go (see Attention.heads). The rotation itself is `kernels.apply_rope`.
    """
    freqs = position_ids[:, :, None].float() * inv_freq.float()  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None]  # (B, T, 1, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


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
    # A Flamingo connector's media, fixed for the conversation: each cross-attention block's keys and values of the
    # latents, and which latents the generated tokens see (B, 1, M L), both set by the prefill (models/llava.py).
    media_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    media_mask: torch.Tensor | None = None

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
        if self.media_kv is not None:
            self.media_kv = [(k[rows], v[rows]) for k, v in self.media_kv]
            self.media_mask = self.media_mask[rows]


def write_cache(cache: tuple[torch.Tensor, torch.Tensor, int | torch.Tensor], k: torch.Tensor,
                v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Store one layer's new keys/values k, v (B, Hkv, T, hd) in its cache (k_buf, v_buf, pos) and return every
    key/value to attend over (B, Hkv, S, hd). pos an int: slots pos..pos+T-1, and the filled slots come back.
    pos a LongTensor of slot indices: those slots, and the whole buffer comes back (the caller's mask hides the
    empty slots), so no shape changes between decoding steps and a compiled step is traced once."""
    k_buf, v_buf, pos = cache
    if isinstance(pos, torch.Tensor):
        k_buf.index_copy_(2, pos, k)
        v_buf.index_copy_(2, pos, v)
        return k_buf, v_buf
    T = k.shape[2]
    k_buf[:, :, pos : pos + T] = k
    v_buf[:, :, pos : pos + T] = v
    return k_buf[:, :, : pos + T], v_buf[:, :, : pos + T]
