"""CLIP's text Transformer (matches OpenAI `CLIP.encode_text` and transformers' `CLIPTextTransformer`)."""

from __future__ import annotations

import torch
from torch import nn

from ..config import TextConfig
from .layers import ROW_MULTIPLE, Packing, Transformer


# Pack the kept tokens when they fill less than this fraction of the (B, T) batch; above it the copies in
# and out of the attention layout cost about what the padding does.
PACK_BELOW = 0.9


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_dim, cfg.act, cfg.norm_eps)
        self.norm_final = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)

    def init_weights(self) -> None:
        """OpenAI's init for the text side."""
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        self.transformer.init_openai()
        nn.init.normal_(self.proj.weight, std=self.cfg.width**-0.5)

    def forward_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       packing: Packing | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, width) after the final LayerNorm; with `packing`, only its tokens: (N, width);
        with `rows` (B,), only token `rows[b]` of each row b comes out of the last block: (B, width).

        Attention is causal, so right padding never changes the tokens before it; `attention_mask`
        (B, T, 1 = real token) additionally hides padded keys, as transformers does.
        """
        T = input_ids.shape[1]
        if T > self.cfg.context_length:
            raise ValueError(f"input_ids have {T} tokens, more than the context length {self.cfg.context_length}")
        if packing is None:
            x = self.token_embed(input_ids) + self.pos_embed[:T]  # (B, T, w)
        else:
            positions = packing.index % T
            x = self.token_embed(input_ids.flatten()[packing.index]) + self.pos_embed[positions]  # (N, w)
        mask = None
        if attention_mask is not None:
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            mask = causal & attention_mask.bool()[:, None, None, :]  # (B, 1, T, T)
            mask = mask | torch.eye(T, dtype=torch.bool, device=x.device)  # a padded query still sees itself
        x = self.transformer(x, attn_mask=mask, is_causal=mask is None, packing=packing, rows=rows)
        return self.norm_final(x)

    def pool_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B,) position of each row's end-of-text token."""
        if self.cfg.pool == "argmax":
            return input_ids.argmax(dim=-1)
        is_eot = input_ids == self.cfg.eot_token_id
        missing = ~is_eot.any(dim=-1)
        if missing.any():
            rows = missing.nonzero().flatten().tolist()
            raise ValueError(f"input_ids rows {rows[:10]} contain no end-of-text token (id {self.cfg.eot_token_id})")
        return is_eot.int().argmax(dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) -> (B, embed_dim): the EOT token's features, projected.

        Attention is causal, so the tokens after a row's EOT reach no pooled feature: they are not computed.
        Captions are usually much shorter than the context and of varied length, so the batch is cut after
        its last EOT and, when that still leaves much padding, the tokens are packed (`Packing`); the last
        block computes the EOT tokens alone. The features are the same (tests/test_clip_model.py), with less work.
        """
        index = self.pool_index(input_ids)  # (B,)
        used = int(index.max()) + 1
        input_ids = input_ids[:, :used]
        attention_mask = None if attention_mask is None else attention_mask[:, :used]
        keep = torch.arange(used, device=input_ids.device) <= index[:, None]  # (B, used)
        if keep.sum() > PACK_BELOW * keep.numel():
            x = self.forward_tokens(input_ids, attention_mask, rows=index)  # (B, w)
        else:
            packing = Packing.from_mask(keep, multiple=ROW_MULTIPLE)  # the extra tokens come after some EOT
            x = self.forward_tokens(input_ids, attention_mask, packing=packing, rows=index)  # (B, w)
        return self.proj(x)
