"""Weight-only quantization for generating on a CPU: int8 per output channel, int4 in groups of 32.

Decoding one token reads every weight of the language model once, so at small batch sizes its speed is set by
memory traffic, not arithmetic: SmolLM2-135M in float32 is 0.54 GB per token. `quantize(model, "int8")`
stores each linear layer of the LM as int8 with one bfloat16 scale per output row (4x fewer bytes);
`"int4"` stores the blocks' linear layers as 4-bit codes with a bfloat16 scale and offset per 32 weights
(llama.cpp's Q4_1 layout, so a Q4_1 GGUF runs at its own precision) and the vocabulary projection as int8.
The matmuls are PyTorch's own weight-only kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`,
the ones torchao uses), which take bfloat16 activations: each layer casts its input to bfloat16 and its
output back, everything between the layers (norms, attention, residuals, the cache) stays as it was.

For inference only: a quantized model does not train and is not saved (`mmlm.save` refuses it). What it costs
in accuracy is measured, not assumed (tests/test_quant.py, docs/performance.md).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

MODES = ("int8", "int4")
GROUP = 32  # int4: weights per scale/offset pair (llama.cpp's Q4_0/Q4_1 block)
# Above this many rows (a prompt's prefill) the weight-only kernels, built for a few rows, fall behind a dense
# GEMM: int8 then dequantizes the matrix to bfloat16 for the call (measured, 3072 x 576 at 256 rows, 1 thread:
# 14.0 ms int8 kernel, 2.1 ms dequantize + bf16 GEMM, 6.5 ms fp32). int4 has no such path (its packed layout
# is the kernel's own, CPU-dependent) and runs a prefill ~2x slower than float32.
DENSE_ROWS = 32
ROWS = 4096  # int8 quantization works through a matrix this many rows at a time


class QuantLinear(nn.Module):
    """A frozen nn.Linear with int8 or int4 weights; forward(x) ~ linear(x) in x's dtype."""

    def __init__(self, linear: nn.Linear, bits: int):
        super().__init__()
        w = (linear.merged_weight() if hasattr(linear, "merged_weight") else linear.weight).detach().float()  # LoRA folded in
        self._pack(w, linear.bias, bits)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, bits: int) -> "QuantLinear":
        """The layer straight from a weight (out, in) and bias, no nn.Linear around them: a loader quantizes each
        weight as soon as it is read, so the whole model never exists in float32 (convert/gguf.py)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._pack(weight.detach().float(), bias, bits)
        return layer

    def _pack(self, w: torch.Tensor, bias: torch.Tensor | None, bits: int) -> None:
        self.out_features, self.in_features = w.shape
        if bits == 4 and not int4_fits(*w.shape):
            raise ValueError(f"int4 needs in_features % {GROUP} == 0 and out_features % 16 == 0, "
                             f"got {self.in_features} -> {self.out_features}")
        self.bits = bits
        if bits == 8:
            qweight, scale = torch.empty(w.shape, dtype=torch.int8), torch.empty(self.out_features)
            for i in range(0, self.out_features, ROWS):  # in row chunks: a vocabulary projection's float
                rows = w[i : i + ROWS]                    # temporaries would be several times its size
                scale[i : i + ROWS] = rows.abs().amax(dim=1).clamp(min=1e-12) / 127
                qweight[i : i + ROWS] = torch.round(rows / scale[i : i + ROWS, None]).clamp(-127, 127)
            self.register_buffer("qweight", qweight)
            self.register_buffer("scales", scale.to(torch.bfloat16))
        elif bits == 4:
            g = w.view(self.out_features, self.in_features // GROUP, GROUP)
            lo, hi = g.amin(dim=-1), g.amax(dim=-1)
            scale = (hi - lo) / 15
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: any scale, codes 0
            codes = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
            self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                codes.view(self.out_features, self.in_features), 1))
            # the kernel computes (code - 8) * scale + zero, so zero = lo + 8 * scale; layout (K / group, N, 2)
            self.register_buffer("scales", torch.stack([scale, lo + 8 * scale], dim=-1)
                                 .transpose(0, 1).contiguous().to(torch.bfloat16))
        else:
            raise ValueError(f"bits must be 8 or 4, got {bits}")
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.bits == 8 and x2.shape[0] > DENSE_ROWS:  # a prefill: dequantize once, one bfloat16 GEMM (AMX)
            y = torch.nn.functional.linear(x2, self.qweight.to(torch.bfloat16) * self.scales[:, None])
        elif self.bits == 8:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, GROUP, self.scales)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}"


def block_bits(mode: str, out_features: int, in_features: int) -> int:
    """The bits a block's linear layer gets under `mode`: 4 for "int4" where the kernel takes its shape, else 8."""
    return 4 if mode == "int4" and int4_fits(out_features, in_features) else 8


def int4_fits(out_features: int, in_features: int) -> bool:
    """Whether the int4 kernel takes a (out_features, in_features) weight."""
    return in_features % GROUP == 0 and out_features % 16 == 0


def _language_model(model: nn.Module) -> nn.Module:
    lm = getattr(model, "lm", model)  # a LLaVA quantizes its LM; the vision tower runs once per image, in fp32
    if not (hasattr(lm, "blocks") and hasattr(lm, "lm_head")):
        raise ValueError(f"quantize works on a language model (mmlm LM or LLaVA), not {type(model).__name__}")
    return lm


def quantize(model: nn.Module, mode: str) -> nn.Module:
    """Replace the linear layers of `model`'s language model by weight-only `QuantLinear`s, in place; returns it.

    "int8": every block linear and the vocabulary projection int8 per output row. "int4": block linears int4
    in groups of 32 (a layer whose shape the kernel cannot take stays int8), vocabulary projection int8.
    The embedding table stays float (a lookup reads one row per token); with tied embeddings the projection
    gets its own quantized copy. A LoRA layer is quantized with its update folded into the weight.
    """
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; known: {', '.join(MODES)}")
    if not cpu_kernels():
        raise RuntimeError(f"this torch ({torch.__version__}) lacks the CPU weight-only kernels {mode} needs")
    lm = _language_model(model)
    if is_quantized(lm):
        raise ValueError("this model is already quantized: load it again first")
    if any(p.device.type != "cpu" for p in lm.parameters()):
        raise ValueError("quantize uses PyTorch's CPU weight-only kernels: move the model to the CPU first")
    for block in lm.blocks:
        targets = [(parent, attr, child) for parent in block.modules()
                   for attr, child in parent.named_children() if isinstance(child, nn.Linear)]
        for parent, attr, child in targets:
            setattr(parent, attr, QuantLinear(child, block_bits(mode, *child.weight.shape)))
    lm.lm_head = QuantLinear(lm.lm_head, 8)
    model.eval().requires_grad_(False)
    model.quantized = mode
    return model


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) for m in model.modules())


def cpu_kernels() -> bool:
    return all(hasattr(torch.ops.aten, op) for op in
               ("_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu"))
