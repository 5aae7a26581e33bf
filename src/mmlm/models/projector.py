"""LLaVA's projector: vision features (N, L, Dv) -> LM embeddings (N, L, D).

"linear" is LLaVA-1's single matrix; "mlp2x_gelu" is LLaVA-1.5's two-layer MLP with a GELU between
(transformers' `LlavaMultiModalProjector`: linear_1, gelu, linear_2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Projector(nn.Module):
    def __init__(self, kind: str, in_dim: int, out_dim: int, bias: bool = True):
        super().__init__()
        if kind not in ("linear", "mlp2x_gelu"):
            raise ValueError(f"projector must be 'linear' or 'mlp2x_gelu', got {kind!r}")
        self.kind = kind
        self.fc1 = nn.Linear(in_dim, out_dim, bias=bias)
        self.fc2 = nn.Linear(out_dim, out_dim, bias=bias) if kind == "mlp2x_gelu" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        return x if self.fc2 is None else self.fc2(F.gelu(x))
