"""The blocks every mmlm model is built of: the MLPs, RMSNorm, one pre-norm residual Block, the CLIP trunk.

CLIP's towers use LayerNorm and a GELU MLP; the LLM uses RMSNorm and the SwiGLU MLP. Both use the same
`Attention` (models/attention.py) and the same `Block`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .kernels import mlp, quick_gelu, rms_norm, swiglu_down


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACT_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": quick_gelu,  # x sigmoid(1.702 x): OpenAI CLIP's approximation of GELU
    "gelu": F.gelu,
    "gelu_tanh": gelu_tanh,
    "silu": F.silu,
}


class MLP(nn.Module):
    """Two linear layers with an activation between (CLIP's c_fc / c_proj): fc2(act(fc1(x)))."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu", bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = ACT_FNS[act]
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mlp(x, self.fc1, self.act, self.fc2)  # fc2(act(fc1(x)))


class SwiGLU(nn.Module):
    """Llama's gated MLP: down(act(gate(x)) * up(x)); gate and up are one fused matmul (fc1 = [gate; up])."""

    def __init__(self, dim: int, hidden: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.hidden = hidden
        self.fc1 = nn.Linear(dim, 2 * hidden, bias=bias)
        self.act = ACT_FNS[act]
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc1(x)  # (..., 2 hidden) = [gate, up]
        return swiglu_down(z, self.hidden, self.act, self.fc2)  # fc2(act(gate) * up)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, normalised in float32 (transformers' LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm1(x)), then x + mlp(norm2(x)).

    `norm` is a class (or factory) called with the width: LayerNorm for CLIP, RMSNorm for Llama; `mlp`
    is the MLP module (GELU MLP or SwiGLU). `rope` and `cache` pass through to the attention.
    """

    def __init__(self, dim: int, attn: Attention, mlp: nn.Module, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.norm1 = norm(dim)
        self.attn = attn
        self.norm2 = norm(dim)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache: tuple[torch.Tensor, torch.Tensor, int | torch.Tensor] | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C)."""
        x = x + self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal, rope=rope, cache=cache)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """A stack of LayerNorm/GELU-MLP blocks: the trunk of both CLIP towers."""

    def __init__(self, width: int, layers: int, heads: int, mlp_dim: int, act: str, norm_eps: float,
                 qkv_bias: bool = True):
        super().__init__()
        self.width = width
        self.blocks = nn.ModuleList(
            Block(width, Attention(width, heads, qkv_bias=qkv_bias), MLP(width, mlp_dim, act),
                  lambda d: nn.LayerNorm(d, eps=norm_eps))
            for _ in range(layers)
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                hidden_states: list[torch.Tensor] | None = None, upto: int | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). When `hidden_states` is a list, the input and each block's output are
        appended. `upto` runs only the first `upto` blocks (a reader of layer -2 never needs the last)."""
        if hidden_states is not None:
            hidden_states.append(x)
        for block in self.blocks[:upto]:
            x = block(x, attn_mask=attn_mask, is_causal=is_causal)
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
