"""LoRA (Hu et al. 2021): a frozen linear layer plus a trainable low-rank update, W + (alpha / r) * B A.

`LoRALinear` is an `nn.Linear` (same `weight`/`bias` names, so a checkpoint's other tensors keep their
names) with two extra parameters `lora_a` (r, in) and `lora_b` (out, r). B starts at zero, so adding
LoRA leaves the model's outputs unchanged. `merge_lora` folds the update into the weights (for export).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .kernels import lora_linear


class LoRALinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool, rank: int, alpha: float):
        super().__init__(in_features, out_features, bias=bias)
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lora_linear(self, x)  # x W^T + b + (alpha / r) (x A^T) B^T

    def merged_weight(self) -> torch.Tensor:
        return self.weight + self.scale * (self.lora_b @ self.lora_a)


def add_lora(module: nn.Module, rank: int, alpha: float) -> None:
    """Replace every nn.Linear under `module` by a LoRALinear holding the same weights (in place)."""
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            lora = LoRALinear(child.in_features, child.out_features, child.bias is not None, rank, alpha)
            lora.to(child.weight.device, child.weight.dtype)
            with torch.no_grad():
                lora.weight.copy_(child.weight)
                if child.bias is not None:
                    lora.bias.copy_(child.bias)
            setattr(module, name, lora)
        else:
            add_lora(child, rank, alpha)


def merge_lora(state_dict: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A state dict with each `X.lora_a`/`X.lora_b` pair folded into `X.weight` and removed."""
    out = {k: v for k, v in state_dict.items() if not k.endswith((".lora_a", ".lora_b"))}
    for k, a in state_dict.items():
        if k.endswith(".lora_a"):
            prefix = k[: -len(".lora_a")]
            b = state_dict[prefix + ".lora_b"]
            out[prefix + ".weight"] = state_dict[prefix + ".weight"] + scale * (b.float() @ a.float()).to(a.dtype)
    return out
