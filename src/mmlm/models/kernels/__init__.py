"""mmlm's speed code, in one place: each fast kernel sits beside the plain formula it replaces.

The model files (`models/*.py`) call one function per operation from here and read like the textbook; each
function below runs its `*_reference` formula under `mmlm.reference_mode()` (or MMLM_REFERENCE=1) and its fast
path otherwise, and tests/test_kernels.py asserts the two agree, values and gradients, in float32 and bf16.

| operation | plain formula | fast path |
|---|---|---|
| attention | softmax(q k^T / sqrt(d) + mask) v | SDPA for inference (C loops for one query, and for heads of ≤ 16 dims on AVX2); while training on a CPU, in-place masking, or SDPA over ≥ 256 unmasked keys |
| apply_rope | x cos + rotate_half(x) sin | one autograd function (the inverse rotation as backward) |
| rms_norm | w x / rms(x) in float32 | PyTorch's fused op; one autograd function while training |
| quick_gelu, mlp | x sigmoid(1.702 x); fc2(act(fc1 x)) | silu(1.702 x) / 1.702; the scalings inside the matmuls; inference on AVX2: compiled matmuls, the activation in their registers |
| swiglu | silu(gate) * up | one autograd function writing one gradient buffer |
| geglu | h * gelu(gate) | sampling on AVX2: one compiled pass |
| linear | x W^T + b | inference on AVX2, 64 rows or more: a compiled register-tiled matmul |
| linear_geglu | geglu(proj(x)) | sampling on AVX2: the gate applied in the matmul's registers (compiled), the (..., 2 n) product never stored |
| swiglu_down | fc2(silu(gate) * up) | with a frozen LoRA fc2: one function keeping z only (the product recomputed) |
| lora_linear | x W^T + b + s (x A^T) B^T | one autograd function; the frozen W cast once (weight_in) |
| next_token_loss, head_logits | cross_entropy(lm_head(norm(x))) | projection + loss in one function; rounded row counts |
| patch_embed | stride-p convolution | one matmul over the flattened patches |
| conv_layout, conv_weights_layout | NCHW | channels-last activations; weights too around a sampling loop |
| conv_bn | bn(conv(x)) | an eval-mode BatchNorm folded into the convolution's weights and bias |
| conv_add | conv(x) + shift + residual | sampling on AVX2: 3x3 convs of >= 32 channels over <= 512x512 positions as Winograd F(4x4, 3x3), the adds in its output pass; 1x1 convs as one matmul adding the skip in its registers |
| group_norm_silu | silu(GroupNorm(x)) | sampling on AVX2, channels-last: one compiled pass |
| pooled | run every token, read one per row | last block on the pooled tokens only; text packed (`Packing`) |
| decode.decode_step | LM.decode_step's loop over its blocks | a quantized LM's block as one call into compiled loops |

Compiled loops (`mmlm/native.py`, `csrc/weight_only.c`, built on first use) serve `rms_norm`, one-query and
small-head `attention`, `conv_add`'s Winograd convolutions, `group_norm_silu`, `geglu`, `linear`, `linear_geglu` and
`mlp` at inference, the decoding step above and `quant.QuantLinear`'s int4/int8 matmuls.
"""

from .attention import attention, attention_reference
from .casts import matmul_dtype, weight_in
from .images import (conv_add, conv_add_reference, conv_bn, conv_bn_reference, conv_layout, conv_weights_layout,
                     group_norm_silu, group_norm_silu_reference, patch_embed, patch_embed_reference)
from .lora import lora_linear, lora_linear_reference
from .loss import head_logits, next_token_loss, next_token_loss_reference
from .mlp import (geglu, geglu_reference, linear, linear_geglu, linear_geglu_reference, linear_reference, mlp,
                  quick_gelu, quick_gelu_reference, swiglu, swiglu_down, swiglu_reference)
from .norms import rms_norm, rms_norm_reference
from .packing import ROW_MULTIPLE, Packing, round_rows
from .pooling import pooled, pooled_reference
from .rope import apply_rope, apply_rope_reference
from .switch import reference, reference_mode

__all__ = [
    "attention", "attention_reference", "matmul_dtype", "weight_in", "conv_add", "conv_add_reference", "conv_bn",
    "conv_bn_reference", "conv_layout", "conv_weights_layout", "group_norm_silu", "group_norm_silu_reference",
    "patch_embed", "patch_embed_reference", "lora_linear", "lora_linear_reference", "head_logits", "next_token_loss",
    "next_token_loss_reference", "geglu", "geglu_reference", "linear", "linear_reference", "linear_geglu", "linear_geglu_reference", "mlp", "quick_gelu", "quick_gelu_reference", "swiglu",
    "swiglu_down", "swiglu_reference", "rms_norm", "rms_norm_reference", "ROW_MULTIPLE", "Packing", "round_rows",
    "pooled", "pooled_reference", "apply_rope", "apply_rope_reference", "reference", "reference_mode",
]
