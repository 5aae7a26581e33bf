"""Flamingo's connector (Alayrac et al. 2022): a frozen language model that reads media through new layers.

    media features (N, P, Dv)  (a tower's tokens for each image, frame or clip)
        --PerceiverResampler--> (N, L, Dv): a fixed number L of latents per media item, whatever P is
    text states (B, T, C), before every `interval`-th block of the frozen LM:
        x = x + tanh(alpha_attn)  * xattn(norm(x), latents of the media this token may see)
        x = x + tanh(alpha_dense) * mlp(norm(x))
    the alphas start at 0, so training starts from the unchanged LM; a token sees only the media placed before it
    (`media_attention_mask`: by default the most recent one, as Flamingo and IDEFICS do), and a token that
    sees none gets nothing from the cross-attention. The dense half runs for every token, media or none (as in
    IDEFICS), so a prompt's answer is the same alone or batched beside prompts with media.

LLaVA (models/llava.py) joins the same towers the other way: projected media tokens spliced into the LM's input,
the LM itself tuned. The layout and names follow IDEFICS, the open Flamingo reproduction in transformers.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ..config import FlamingoConnectorConfig, LMConfig
from .attention import CrossAttention
from .blocks import RMSNorm, SwiGLU
from .kernels import attention
from .lm import LM, LMOutput


class PerceiverAttention(nn.Module):
    """Latents (N, L, D) attend to [media tokens; latents] (N, P + L, D): the latents query, everything answers."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.context_layer_norm = nn.LayerNorm(dim)
        self.latents_layer_norm = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.v_proj = nn.Linear(dim, heads * head_dim, bias=False)
        self.output_proj = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, context: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """context (N, P, D), latents (N, L, D) -> (N, L, D)."""
        context, latents = self.context_layer_norm(context), self.latents_layer_norm(latents)
        both = torch.cat([context, latents], dim=1)  # (N, P + L, D)

        def split(t: torch.Tensor) -> torch.Tensor:  # (N, S, H hd) -> (N, H, S, hd)
            return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

        y = attention(split(self.q_proj(latents)), split(self.k_proj(both)), split(self.v_proj(both)))  # (N, H, L, hd)
        return self.output_proj(y.transpose(1, 2).flatten(2))


class PerceiverMLP(nn.Module):
    """c_proj(relu(fc(ln(x)))): the resampler's feed-forward, norm inside."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, hidden, bias=False)
        self.c_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(torch.relu(self.fc(self.ln(x))))


class PerceiverResampler(nn.Module):
    """(N, P, D) media tokens -> (N, L, D): L learned latents, refined by `depth` blocks of attention to the media."""

    def __init__(self, dim: int, depth: int, heads: int, head_dim: int, n_latents: int):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(n_latents, dim))
        self.blocks = nn.ModuleList(nn.ModuleList([PerceiverAttention(dim, heads, head_dim), PerceiverMLP(dim, 4 * dim)])
                                    for _ in range(depth))
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(media.shape[0], -1, -1)  # (N, L, D)
        for attn, mlp in self.blocks:
            latents = latents + attn(media, latents)
            latents = latents + mlp(latents)
        return self.layer_norm(latents)


class GatedCrossAttentionBlock(nn.Module):
    """x + tanh(alpha_attn) xattn(norm(x), media), then + tanh(alpha_dense) mlp(norm(x)); alphas start at 0."""

    def __init__(self, width: int, media_dim: int, heads: int, mlp_dim: int, eps: float = 1e-6):
        super().__init__()
        self.input_layernorm = RMSNorm(width, eps)
        self.cross_attn = CrossAttention(width, media_dim, heads, out_bias=False)
        self.post_attention_layernorm = RMSNorm(width, eps)
        self.mlp = SwiGLU(width, mlp_dim)
        self.alpha_cross_attn = nn.Parameter(torch.zeros(1))
        self.alpha_dense = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, media: torch.Tensor | None, media_mask: torch.Tensor | None,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, T, C); media (B, S, Dv) latents (or `kv`, their keys and values, computed once for decoding);
        media_mask (B, T, S) bool, True where token t may see latent s; None: no media at all (the dense half only)."""
        if media_mask is not None:
            sees = media_mask.any(dim=-1, keepdim=True)  # (B, T, 1): tokens that see some media
            mask = (media_mask | ~sees)[:, None]  # (B, 1, T, S); a token that sees nothing attends anywhere, then is zeroed
            y = self.cross_attn(self.input_layernorm(x), media, attn_mask=mask, kv=kv) * sees
            x = x + torch.tanh(self.alpha_cross_attn) * y
        return x + torch.tanh(self.alpha_dense) * self.mlp(self.post_attention_layernorm(x))


def media_attention_mask(input_ids: torch.Tensor, media_token_id: int | Sequence[int], n_media: int,
                         only_last: bool = True, eos_token_id: int | None = None) -> torch.Tensor:
    """(B, T) ids with a `media_token_id` (one of several: an image, a video, a sound token) where each media item
    sits -> (B, T, n_media) bool: token t may see the row's m-th media item when that item's token is at or before
    t (only_last: the most recent one alone). After an `eos_token_id` a token sees nothing until the next media
    token (IDEFICS's packed documents)."""
    is_media = _is_media(input_ids, media_token_id)  # (B, T)
    count = is_media.long().cumsum(dim=1)  # (B, T): media items at or before t
    index = torch.arange(n_media, device=input_ids.device)  # (M,)
    if only_last:
        mask = (count - 1)[..., None] == index  # (B, T, M)
    else:
        mask = index < count[..., None]
    if eos_token_id is not None:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        last_media = torch.where(is_media, pos, -1).cummax(dim=1).values  # (B, T)
        is_eos = input_ids == eos_token_id
        last_eos = torch.where(is_eos, pos, -1).cummax(dim=1).values
        before = torch.where(is_eos, torch.cat([last_eos.new_full((len(pos), 1), -1), last_eos[:, :-1]], 1), last_eos)
        mask &= (last_media > before)[..., None]  # the eos token itself still sees its media
    return mask


def _is_media(input_ids: torch.Tensor, media_token_id: int | Sequence[int]) -> torch.Tensor:
    ids = [media_token_id] if isinstance(media_token_id, int) else list(media_token_id)
    return torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))


class FlamingoConnector(nn.Module):
    """The new layers a frozen LM reads media through: the resampler and one gated cross-attention block before
    every `interval`-th LM block (see the module docstring). `before_block` hands them to `LM.forward`."""

    def __init__(self, cfg: FlamingoConnectorConfig, lm: LMConfig):
        super().__init__()
        self.config = cfg
        self.resampler = PerceiverResampler(cfg.media_dim, cfg.resampler_depth, cfg.resampler_heads,
                                            cfg.resampler_head_dim, cfg.latents)
        n_cross = len(range(cfg.offset, lm.layers, cfg.interval))  # before LM blocks offset, offset + interval, ...
        self.cross = nn.ModuleList(GatedCrossAttentionBlock(lm.width, cfg.media_dim, cfg.cross_heads or lm.heads,
                                                            lm.mlp_dim, lm.norm_eps) for _ in range(n_cross))

    def context(self, input_ids: torch.Tensor, latents: torch.Tensor, media_token_id: int | Sequence[int]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids (B, T); latents (N, L, Dv), the resampled media items of every row in the order of their tokens
        (row 0's first) -> every row's latents (B, M L, Dv) and their mask (B, T, M L), M the most items any row
        holds (rows with fewer padded, never seen)."""
        per_row = _is_media(input_ids, media_token_id).sum(dim=1)  # (B,)
        if int(per_row.sum()) != len(latents):
            raise ValueError(f"input_ids hold {int(per_row.sum())} media tokens (id {media_token_id}) "
                             f"but {len(latents)} media items were given")
        B, M, L = len(input_ids), max(int(per_row.max()), 1), latents.shape[1]
        slots = torch.arange(M, device=latents.device)[None] < per_row[:, None]  # (B, M): which slots hold an item
        context = latents.new_zeros(B, M, L, latents.shape[-1])
        context[slots] = latents  # row-major: each row's items in order
        mask = media_attention_mask(input_ids, media_token_id, M, self.config.only_last_media)  # (B, T, M)
        mask = mask.repeat_interleave(L, dim=-1)  # (B, T, M L): an item's latents share its visibility
        return context.flatten(1, 2), mask

    def keys_values(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each cross-attention block's keys and values of the media latents (B, M L, Dv): fixed for a whole
        conversation, so a decoding step reads them instead of projecting the latents again."""
        return [block.cross_attn.keys_values(context) for block in self.cross]

    def before_block(self, kv: list[tuple[torch.Tensor, torch.Tensor]] | None, mask: torch.Tensor | None
                     ) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """`LM.forward`'s hook: the gated cross-attention block (if any) before LM block i, reading `kv` (None, with
        mask None: no media in the batch)."""
        interval, offset = self.config.interval, self.config.offset

        def before_block(i: int, x: torch.Tensor) -> torch.Tensor:
            if i % interval != offset:
                return x
            j = i // interval
            if kv is None:
                return self.cross[j](x, None, None)
            k, v = kv[j]
            return self.cross[j](x, None, mask, kv=(k.to(x.dtype), v.to(x.dtype)))

        return before_block


class FlamingoLM(FlamingoConnector):
    """A frozen `LM` with a perceiver resampler and gated cross-attention blocks (see the module docstring)."""

    def __init__(self, lm: LM, cfg: FlamingoConnectorConfig, media_token_id: int):
        super().__init__(cfg, lm.config)
        self.lm, self.media_token_id = lm, media_token_id
        self.lm.requires_grad_(False)

    def media_context(self, input_ids: torch.Tensor, media: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids (B, T); media (N, P, Dv), the media items of every row in order (row 0's first) ->
        latents (B, M L, Dv) and their mask (B, T, M L), M the most items any row holds (rows with fewer padded)."""
        return self.context(input_ids, self.resampler(media), self.media_token_id)

    def forward(self, input_ids: torch.Tensor, media: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **lm_kwargs) -> LMOutput:
        """input_ids (B, T) with a media token per item, media (N, P, Dv) -> the LM's output (logits, or the
        token loss with `logits_at` and `targets`, as `LM.forward`)."""
        if media is None or len(media) == 0:  # no media: only the blocks' dense halves
            hook = self.before_block(None, None)
        else:
            context, mask = self.media_context(input_ids, media)
            hook = self.before_block(self.keys_values(context), mask)
        return self.lm(input_ids, attention_mask=attention_mask, before_block=hook, **lm_kwargs)
