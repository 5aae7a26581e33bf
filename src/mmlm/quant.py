"""Weight-only quantization for generating on a CPU: int8 per output channel, int4 in groups of 32.

Decoding one token reads every weight of the language model once, so at small batch sizes its speed is set by
memory traffic, not arithmetic: SmolLM2-135M in float32 is 0.54 GB per token. `quantize(model, "int8")`
stores each linear layer of the LM as int8 with one bfloat16 scale per output row (4x fewer bytes);
`"int4"` stores the blocks' linear layers as llama.cpp's Q4_1 blocks (per 32 weights: an fp16 scale d, an fp16
minimum m, 4-bit codes q; w = d q + m), so a Q4_1 GGUF runs at its own precision, and the vocabulary projection
as int8. Everything between the layers (norms, attention, residuals, the cache) stays as it was.

The matmuls, for a few rows (decoding), are mmlm's compiled loops (`native.py`, `csrc/weight_only.c`), which
read the weights at memory speed; the int4 one writes its input as two int8 digits per block of 32
(`q4_1_reference` is that formula in plain PyTorch, and what `mmlm.reference_mode()` runs). For many rows (a
prompt's prefill) the weights are dequantized to bfloat16 for one dense GEMM. Where no C compiler is found,
PyTorch's own weight-only kernels run instead (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`, bfloat16
activations).

For inference only: a quantized model does not train and is not saved (`mmlm.save` refuses it). What it costs
in accuracy is measured, not assumed (tests/test_quant.py, docs/performance.md).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import native
from .models.kernels.switch import reference

MODES = ("int8", "int4")
GROUP = 32  # int4: weights per scale/offset pair (llama.cpp's Q4_0/Q4_1 block)
# Above this many rows (a prompt's prefill) the weight-only kernels, built for a few rows, fall behind a dense
# GEMM: the matrix is then dequantized to bfloat16 for the call (measured, 3072 x 576 at 256 rows, 1 thread:
# 14.0 ms int8 kernel, 2.1 ms dequantize + bf16 GEMM, 6.5 ms fp32). PyTorch's int4 layout has no such path (it
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
        self.native = native.kernels() is not None  # mmlm's loops; else PyTorch's kernels and their layouts
        if bits == 8:
            qweight, scale = torch.empty(w.shape, dtype=torch.int8), torch.empty(self.out_features)
            for i in range(0, self.out_features, ROWS):  # in row chunks: a vocabulary projection's float
                rows = w[i : i + ROWS]                    # temporaries would be several times its size
                scale[i : i + ROWS] = rows.abs().amax(dim=1).clamp(min=1e-12) / 127
                qweight[i : i + ROWS] = torch.round(rows / scale[i : i + ROWS, None]).clamp(-127, 127)
            self.register_buffer("qweight", qweight)
            self.register_buffer("scales", scale.to(torch.bfloat16))
        elif bits == 4 and self.native:
            self.register_buffer("blocks", pack_q4_1(*quantize_q4_1(w)))
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
        x2 = x.reshape(-1, self.in_features)
        rows = x2.shape[0]
        if torch.is_grad_enabled() and x.requires_grad:  # the stored weight as a plain linear: autograd through x
            y = x2.float() @ self.dense_weight().float().T
        elif reference():
            y = self.reference_forward(x2)
        elif not self.native:
            y = self._torch_kernels(x2)
        elif rows > DENSE_ROWS:  # a prefill: dequantize once, one GEMM on what the loops would compute
            y = torch.nn.functional.linear(self._rounded(x2), self.dense_weight(torch.float32))
        else:
            x32 = x2.to(torch.float32).contiguous()
            y = _native_mm(x32, self.blocks, self.out_features) if self.bits == 4 else \
                _native_int8_mm(x32, self.qweight, self.scales)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def dense_weight(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The (out, in) weight the layer stores, in `dtype`."""
        if self.bits == 8:
            return self.qweight.to(dtype) * self.scales[:, None].to(dtype)
        if self.native:
            return native.q4_1_dequantize(self.blocks, self.out_features, self.in_features,
                                          torch.float32 if dtype == torch.float32 else torch.bfloat16).to(dtype)
        return self._torch_kernels(torch.eye(self.in_features, dtype=torch.bfloat16)).T.to(dtype).contiguous()

    def _rounded(self, x2: torch.Tensor) -> torch.Tensor:
        """The input as the layer's loop reads it: two int8 digits per block of 32 (an int8 layer whose in_features
        are not a multiple of 32: float32)."""
        x2 = x2.to(torch.float32)
        return round_to_int8_blocks(x2) if self.in_features % GROUP == 0 else x2

    def reference_forward(self, x2: torch.Tensor) -> torch.Tensor:
        """The plain formula of what `forward` computes for (rows, in) inputs, in float32: with mmlm's loops,
        x written as two int8 digits per block of 32 times W (at any number of rows)."""
        if self.native and self.bits == 8:
            return (self._rounded(x2).double() @ self.dense_weight(torch.float64).T).float()
        if self.bits == 4 and self.native:
            return q4_1_reference(x2.float(), *unpack_q4_1(self.blocks, self.out_features, self.in_features))
        return x2.float() @ self.dense_weight().float().T

    def _torch_kernels(self, x2: torch.Tensor) -> torch.Tensor:
        x2 = x2.to(torch.bfloat16)
        if self.bits == 8 and x2.shape[0] > DENSE_ROWS:
            return torch.nn.functional.linear(x2, self.dense_weight())
        if self.bits == 8:
            return torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, GROUP, self.scales)

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
        raise ValueError("quantized layers run on the CPU (mmlm's compiled loops or PyTorch's CPU kernels): move the model to the CPU first")
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
    """Whether int8/int4 can run here: mmlm's compiled loops, or PyTorch's weight-only CPU kernels."""
    return native.kernels() is not None or all(hasattr(torch.ops.aten, op) for op in (
        "_weight_int8pack_mm", "_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu"))


# ----------------------------------------------------------------------------- Q4_1 blocks

def quantize_q4_1(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, in) float weights -> codes (out, in / 32, 32) uint8 in 0..15, d and m (out, in / 32) fp16, with
    w ~ d q + m: per block of 32, m its minimum and d its range / 15 (llama.cpp's Q4_1)."""
    n, k = w.shape
    g = w.float().reshape(n, k // GROUP, GROUP)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    d, m = ((hi - lo) / 15).half(), lo.half()
    inv = torch.where(d.float() > 0, 1 / d.float(), torch.zeros_like(lo))  # a constant block: codes 0
    codes = torch.round((g - m.float()[..., None]) * inv[..., None]).clamp(0, 15).to(torch.uint8)
    return codes, d, m


def pack_q4_1(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Codes, d and m as `csrc/weight_only.c` reads them: (out, in / 32 * 20) bytes, the blocks in groups of four
    (d[4], m[4], codes[4][16]: one 64-byte load holds four blocks' codes), the last in / 32 % 4 blocks as a GGUF
    stores them (d, m, codes[16]); byte j of a block's codes holds code j (low nibble) and code j + 16."""
    n, nb, _ = codes.shape
    full = nb // 4 * 4
    nibbles = codes[..., :16] | (codes[..., 16:] << 4)  # (n, nb, 16)
    db, mb = d.contiguous().view(torch.uint8).view(n, nb, 2), m.contiguous().view(torch.uint8).view(n, nb, 2)
    groups = torch.cat([db[:, :full].reshape(n, -1, 8), mb[:, :full].reshape(n, -1, 8),
                        nibbles[:, :full].reshape(n, -1, 64)], dim=-1)
    rest = torch.cat([db[:, full:], mb[:, full:], nibbles[:, full:]], dim=-1)
    return torch.cat([groups.reshape(n, -1), rest.reshape(n, -1)], dim=1).contiguous()


def unpack_q4_1(blocks: torch.Tensor, out_features: int, in_features: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`pack_q4_1` undone: codes (out, in / 32, 32) uint8, d and m (out, in / 32) fp16."""
    n, nb = out_features, in_features // GROUP
    full = nb // 4 * 4
    groups = blocks[:, : full * 20].reshape(n, full // 4, 80)
    rest = blocks[:, full * 20 :].reshape(n, nb - full, 20)
    db = torch.cat([groups[..., :8].reshape(n, full, 2), rest[..., :2]], dim=1)
    mb = torch.cat([groups[..., 8:16].reshape(n, full, 2), rest[..., 2:4]], dim=1)
    nibbles = torch.cat([groups[..., 16:].reshape(n, full, 16), rest[..., 4:]], dim=1)
    codes = torch.cat([nibbles & 0xF, nibbles >> 4], dim=-1)
    return codes, db.contiguous().view(torch.float16)[..., 0], mb.contiguous().view(torch.float16)[..., 0]


def round_to_int8_blocks(x: torch.Tensor) -> torch.Tensor:
    """x (rows, in) float32 as mmlm's loops read it: two int8 digits per block of 32. With dx = max|x| / 127,
    a = x / dx: xq = round(a), xr = round(254 (a - xq)) and x -> (dx / 254) (254 xq + xr), 15 bits a block
    (llama.cpp keeps only xq for its Q4_1 dot products; bfloat16 keeps 8 bits a value)."""
    rows, k = x.shape
    xb = x.reshape(rows, k // GROUP, GROUP)
    dx = xb.abs().amax(dim=-1, keepdim=True) / 127
    inv = torch.where(dx > 0, 1 / dx, torch.zeros_like(dx))
    a = xb * inv
    first = torch.round(a)
    second = torch.round((a - first) * 254)
    return ((254 * first + second) * (dx / 254)).reshape(rows, k)  # 254 xq + xr: an integer, exact in float32


def q4_1_reference(x: torch.Tensor, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """What the int4 loop computes, as the plain formula: y = x^ W^T, x^ = round_to_int8_blocks(x), W = d q + m.
    x (rows, in) float32 -> (rows, out) float32 (summed in float64)."""
    w = codes.double() * d.double()[..., None] + m.double()[..., None]       # (out, in / 32, 32)
    return (round_to_int8_blocks(x).double() @ w.reshape(w.shape[0], -1).T).float()


def _native_mm(x: torch.Tensor, blocks: torch.Tensor, out_features: int) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return torch.ops.mmlm.q4_1_mm(x, blocks, out_features)
    return native.q4_1_matmul(x, blocks, out_features)


def _native_int8_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return torch.ops.mmlm.int8_mm(x, qweight, scales)
    return native.int8_matmul(x, qweight, scales)


# the same loops as operators torch.compile can trace around (eager calls them directly: no dispatch)
@torch.library.custom_op("mmlm::q4_1_mm", mutates_args=())
def _q4_1_op(x: torch.Tensor, blocks: torch.Tensor, out_features: int) -> torch.Tensor:
    return native.q4_1_matmul(x, blocks, out_features)


@_q4_1_op.register_fake
def _(x: torch.Tensor, blocks: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op("mmlm::int8_mm", mutates_args=())
def _int8_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return native.int8_matmul(x, qweight, scales)


@_int8_op.register_fake
def _(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], qweight.shape[0])
