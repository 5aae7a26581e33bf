"""Where mmlm computes, and how: the device (cpu | cuda), autocast per device, fp16's gradient scaler,
moving batches, and torch.compile with a way back to eager.

Every command asks this module instead of writing its own `torch.cuda.is_available()` checks:

    device = resolve("auto", "train.device")   # cuda:LOCAL_RANK under torchrun when CUDA is there, else cpu
    precision = Precision("bf16", device)      # precision() is the forward's autocast context
    backward(loss, precision)                  # loss.backward(), scaled first under fp16
    batch = to_device(batch, device)           # every tensor of a batch, copied without blocking on CUDA

| train.precision | forward | backward |
|---|---|---|
| fp32 | float32 | plain |
| bf16 | autocast to bfloat16 (CPU: AVX-512 BF16 / AMX; CUDA: tensor cores) | plain: bf16 keeps float32's range |
| fp16 | autocast to float16 (meant for CUDA; a CPU runs it too, slowly) | loss scaled by a GradScaler |
| auto | bf16 where the device multiplies bfloat16 natively, else fp32 (`resolve_precision`) | as that one |

A CPU without bfloat16 instructions (no AVX-512 BF16 or AMX, e.g. an AVX2-only AMD EPYC) emulates bf16 matmuls:
measured there 0.7 GFLOP/s against 67 in float32 (1024^3, 2 threads), so the shapes recipes say `auto`.

float16 has 5 exponent bits: gradients below ~6e-8 flush to zero. The scaler multiplies the loss by S (65536 at
first), so every gradient is S times larger on its way back, then divides the gradients by S before clipping
and the optimizer step; a step whose gradients overflowed (inf/NaN) is skipped and S halved, and S doubles
after 2000 clean steps. bfloat16 has float32's exponent range and needs none of this.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import Any, Callable

import torch
from torch import nn

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve(device: str | torch.device | None, setting: str = "device") -> torch.device:
    """A torch.device for a device setting: None or "cpu" -> cpu; "auto" -> CUDA when torch sees it, else cpu;
    "cuda" -> cuda:LOCAL_RANK (torchrun starts one process per GPU; 0 outside torchrun); "cuda:N" as given;
    any other torch device ("meta": shapes only) as it is.

    Asking for CUDA where torch sees none is an error naming `setting` (e.g. "train.device", "--device")."""
    if device is None:
        return torch.device("cpu")
    if isinstance(device, str) and device.strip().lower() == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device.strip().lower() if isinstance(device, str) else device)
    except RuntimeError:
        raise ValueError(f"{setting}={device!r} is not a device: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{setting}={device} was asked for, but torch sees no CUDA device (torch "
                             f"{torch.__version__}, CUDA build: {torch.version.cuda}): use {setting}=cpu or auto")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"{setting}={device}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_precision(precision: str, setting: str = "train.precision") -> str:
    if precision not in PRECISIONS and precision != "auto":
        raise ValueError(f"{setting} must be one of {', '.join(PRECISIONS)} or auto, got {precision!r}")
    return precision


def fast_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether `device` multiplies bfloat16 natively: CUDA with bf16 support, or a CPU whose oneDNN has bf16
    kernels (AVX-512 BF16 / AMX)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_precision(precision: str, device: torch.device | str = "cpu", setting: str = "train.precision") -> str:
    """A precision setting made concrete: "auto" -> "bf16" where `device` computes it natively, else "fp32"."""
    if check_precision(precision, setting) == "auto":
        return "bf16" if fast_bf16(device) else "fp32"
    return precision


class Precision:
    """`train.precision` on a device. Calling it gives the autocast context of a forward pass (a fresh one each
    time, so it also works as the `autocast` factory tasks take); `scaler` is fp16's GradScaler (None otherwise).
    """

    def __init__(self, precision: str, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self.dtype = PRECISIONS[self.precision]
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

    def __call__(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def autocast(precision: str, device: torch.device | str = "cpu") -> Callable[[], contextlib.AbstractContextManager]:
    """The autocast factory for `precision` on `device` (no gradient scaler: for forward passes)."""
    return Precision(precision, device)


def backward(loss: torch.Tensor, precision: Any = None) -> None:
    """loss.backward(); under fp16 the loss is first multiplied by the scaler's scale (see the table above).

    `precision` is what the loop hands a task's `step` (a `Precision`); any other autocast factory has no scaler."""
    scaler = getattr(precision, "scaler", None)
    (loss if scaler is None else scaler.scale(loss)).backward()


def to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor in a batch (dicts, lists and tuples followed) on `device`. From pinned CPU memory to CUDA the
    copies do not block: the host goes on to queue the step while they run."""
    non_blocking = device.type == "cuda"
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in batch):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def model_device(model: nn.Module) -> torch.device:
    """Where a model's weights are (inputs go there)."""
    return next(model.parameters()).device


# ----------------------------------------------------------------------------- torch.compile

def compile_blocks(model: nn.Module, backend: str | Callable = "inductor") -> list[nn.Module]:
    """Compile every repeated block of `model` in place (the transformer `Block`s and ResNet `Bottleneck`s):
    "regional" compilation, as PyTorch recommends for deep models. The blocks of one kind share their
    compiled code, so compiling takes one block's time per kind, not the whole model's; state dicts,
    checkpoints and FSDP units stay as they are. Returns the compiled modules (for `uncompile`)."""
    from .models.blocks import Block
    from .models.resnet import Bottleneck

    blocks = [m for m in model.modules() if isinstance(m, (Block, Bottleneck))]
    inner: dict[type, Callable] = {}
    for m in blocks:
        if getattr(m, "grad_checkpointing", False):
            # A block under activation checkpointing is compiled inside its checkpoint: dynamo does not trace
            # torch.utils.checkpoint with the context that keeps BatchNorm statistics (models/checkpointing.py).
            fn = inner.setdefault(type(m), torch.compile(type(m).forward, backend=backend))
            m._eager_forward = vars(m).get("forward")
            m.forward = functools.partial(_recomputed, m, fn)
        else:
            m.compile(backend=backend)
    return blocks


def _recomputed(module: nn.Module, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    from .models.kernels.recompute import recompute

    return recompute(module, fn, module, *args, **kwargs)


def uncompile(modules: list[nn.Module]) -> None:
    for m in modules:
        m._compiled_call_impl = None  # what nn.Module.compile sets; None is eager again
        if "_eager_forward" in vars(m):  # a checkpointed block: its forward as it was
            eager = vars(m).pop("_eager_forward")
            if eager is None:
                vars(m).pop("forward", None)
            else:
                m.forward = eager


def _from_compiler(e: BaseException) -> bool:
    """Whether an exception was raised inside torch's compiler stack (dynamo, AOTAutograd, inductor, triton),
    looking through the exceptions it wraps or was raised from."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        tb = e.__traceback__
        while tb is not None:
            name = tb.tb_frame.f_code.co_filename.replace("\\", "/")
            if any(part in name for part in ("/torch/_dynamo/", "/torch/_inductor/", "/torch/_functorch/", "/triton/")):
                return True
            tb = tb.tb_next
        e = e.__cause__ or e.__context__
    return False


def _batchnorm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.{b}": t.clone() for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) for b, t in m.named_buffers(recurse=False)}


def step_with_fallback(step: Callable[[], Any], model: nn.Module, compiled: list[nn.Module]) -> tuple[Any, list[nn.Module]]:
    """Run `step()` (a forward + backward) with `compiled` blocks; returns (its result, the blocks still compiled).

    torch.compile compiles at a block's first call (and again for new shapes), so it fails inside a step, not
    where it was asked for: no C++ compiler or triton, an op the compiler does not know, a CUDA toolkit mismatch.
    Then every block goes back to eager, the gradients and BatchNorm statistics of the failed attempt are
    undone, a warning says why, and the step runs again eagerly. An error that did not come from the compiler
    is raised as it is."""
    if not compiled:
        return step(), compiled
    saved = _batchnorm_state(model)
    try:
        return step(), compiled
    except Exception as e:
        if not _from_compiler(e):
            raise
        root: BaseException = e  # the compiler's wrappers name the backend; the innermost error says what failed
        while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None:
            root = inner
        first = (str(root).strip().splitlines() or [""])[0][:300]
        warnings.warn(f"train.compile: torch.compile failed ({type(root).__name__}: {first}); continuing in eager "
                      "mode", RuntimeWarning, stacklevel=2)
    uncompile(compiled)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        buffers = dict(model.named_buffers())
        for name, value in saved.items():
            buffers[name].copy_(value)
    return step(), []
