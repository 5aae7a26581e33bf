"""`mmlm plan`: will a CLIP recipe train on these GPUs, with what batch, and how long will an epoch take?

    mmlm plan --config src/mmlm/recipes/clip-vit-l14.yaml --gpus 2 --gpu-memory 24GB

Per GPU, training holds the fp32 weights, their gradients and AdamW's two fp32 moments (16 bytes per trained
parameter, all of it on every GPU with DDP, 1/W of it with FSDP2), plus what the step keeps for its backward: the
activations, which grow with the batch. The parameter counts come from the full-size model built on the meta
device (no memory). The activations and FLOPs are measured, not guessed: the real training step (`ClipTask.step`,
the recipe's precision, full-length captions) runs on the CPU at batch 2 and 4 on a copy of the model cut to two
blocks per tower, and the per-sample figures are scaled back to the full depth block by block:

- activations: the bytes autograd keeps for the backward (`saved_tensors_hooks`, each storage once), attributed to
  the block that saved them; with activation checkpointing, what the step keeps outside the blocks, each block's
  input, and one block's activations while it is recomputed;
- FLOPs: `torch.utils.flop_counter.FlopCounterMode` over forward and backward (the recomputation included),
  per module, so that a block's count is multiplied by the full depth.

Attention is measured as a GPU runs it (the fused kernel, which keeps no T x T probabilities), not with the CPU
training path, and LayerNorm in float32 as CUDA's autocast runs it. Step time = FLOPs / (GPUs x peak x utilisation), plus the gradient all-reduce over the link, which
mmlm's DDP runs after the backward.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

GIB = 2**30


def parse_bytes(text: str) -> int:
    """'24GB', '24GiB', '80G', '512MB' -> bytes. GB and GiB both mean 2**30 here: GPU memory is sold in binary
    units (an RTX 3090's 24 GB is 24 GiB)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read a memory size from {text!r} (e.g. 24GB)")
    return int(float(m.group(1)) * 1024 ** "BKMGT".index((m.group(2) or "B").upper()))


@dataclass
class Measured:
    """Per-sample figures of the full-depth model, from the two-block copy."""

    activations: dict[bool, float]  # bytes kept for the backward per sample, by activation checkpointing off/on
    flops: dict[bool, float]  # forward + backward FLOPs per sample, the same
    vision_layers: int
    text_layers: int


# ----------------------------------------------------------------------------- measuring the step

class _SavedBytes:
    """Live bytes of the tensors autograd saves, each storage counted once, attributed to the block that is running.

    `peak` is the most alive at once; `by_block[name]` what each block saved."""

    def __init__(self, skip: set[int]):
        self.skip = skip  # storages not to count (the parameters: their size does not grow with the batch)
        self.live: dict[int, list] = {}  # storage pointer -> [bytes, references]
        self.total = self.peak = 0
        self.block: str | None = None
        self.by_block: dict[str, int] = {}

    def pack(self, t: torch.Tensor) -> Any:
        key = t.untyped_storage().data_ptr()
        if key in self.skip or t.device.type == "meta":
            return t
        if key not in self.live:
            self.live[key] = [t.untyped_storage().nbytes(), 0]
            self.total += self.live[key][0]
            self.peak = max(self.peak, self.total)
            if self.block is not None:
                self.by_block[self.block] = self.by_block.get(self.block, 0) + self.live[key][0]
        self.live[key][1] += 1
        return _Handle(self, key, t)

    def release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.total -= entry[0]
            del self.live[key]


class _Handle:
    def __init__(self, owner: _SavedBytes, key: int, t: torch.Tensor):
        self.owner, self.key, self.t = owner, key, t

    def __del__(self) -> None:
        self.owner.release(self.key)


def _unpack(h: Any) -> torch.Tensor:
    return h.t if isinstance(h, _Handle) else h


@contextlib.contextmanager
def _gpu_attention() -> Iterator[None]:
    """Run attention through PyTorch's fused kernel, as on a GPU (the CPU training path keeps the T x T
    probabilities for its backward; flash attention keeps O(T))."""
    import importlib

    attention_module = importlib.import_module(".models.kernels.attention", __package__)  # the module, not the function
    before = attention_module.cpu_path
    attention_module.cpu_path = lambda x: False
    try:
        yield
    finally:
        attention_module.cpu_path = before


MEASURED_LAYERS = 2  # blocks per tower in the measured copy: a typical block, and the last (run by the pooling)


def _shrunk(cfg: Any, layers: int | None) -> Any:
    """The run config with each tower cut to `layers` blocks (None: kept whole) and a small vocabulary (the
    embedding table does not grow with the batch)."""
    small = copy.deepcopy(cfg)
    if layers is not None:
        small.model.vision.layers = min(layers, cfg.model.vision.layers)
        small.model.text.layers = min(layers, cfg.model.text.layers)
    small.model.text.vocab_size = 1000
    small.model.text.eot_token_id = 999
    small.model.text.pool = "eot"
    small.train.micro_batch = 0
    return small


def _batch(cfg: Any, n: int) -> dict[str, Any]:
    """n samples of the recipe's shapes: images at the model's size, captions of the full context length."""
    g = torch.Generator().manual_seed(n)
    v, t = cfg.model.vision, cfg.model.text
    ids = torch.randint(1, t.vocab_size - 1, (n, t.context_length), generator=g)
    ids[:, -1] = t.eot_token_id
    return {"pixel_values": torch.randn(n, 3, v.image_size, v.image_size, generator=g), "input_ids": ids,
            "batch_size": n}


def _units(model: nn.Module) -> dict[str, nn.Module]:
    from .models.checkpointing import UNITS

    return {name: m for name, m in model.named_modules() if isinstance(m, UNITS)}


@dataclass
class _Saved:
    peak: int  # bytes kept for the backward at the end of the forward (blocks called as modules included)
    block: dict[str, int]  # per tower ("visual", "text"): what its first block saved (checkpointed: its input)


def _missing(cfg: Any, small: Any) -> dict[str, int]:
    """Per tower, how many blocks the measured copy lacks."""
    return {"visual": cfg.model.vision.layers - small.model.vision.layers,
            "text": cfg.model.text.layers - small.model.text.layers}


def _forward_saved(cfg: Any, n: int, checkpointing: bool, layers: int | None) -> _Saved:
    """The bytes the forward of the training step keeps for its backward, on the shrunk model at batch n."""
    from .models.checkpointing import grad_checkpointing
    from .models.clip import CLIP
    from .train.loop import autocast_context

    small = _shrunk(cfg, layers)
    torch.manual_seed(0)
    model = CLIP(small.model).train()
    grad_checkpointing(model, checkpointing)
    units = _units(model)
    first = {tower: next(k for k in units if k.startswith(tower + ".")) for tower in ("visual", "text")}
    tracker = _SavedBytes({p.untyped_storage().data_ptr() for p in model.parameters()})
    handles = [m.register_forward_pre_hook(lambda mod, args, name=k: setattr(tracker, "block", name))
               for k, m in units.items()]
    handles += [m.register_forward_hook(lambda *_: setattr(tracker, "block", None)) for m in units.values()]
    # CUDA's autocast runs LayerNorm in float32 (its output too, so the residual stream stays float32); the CPU's
    # keeps the input's dtype: cast as CUDA does, so that the bytes are a GPU's
    handles += [m.register_forward_pre_hook(lambda mod, args: (args[0].float(), *args[1:]))
                for m in model.modules() if isinstance(m, nn.LayerNorm)]
    batch = _batch(small, n)
    try:
        with _gpu_attention(), torch.autograd.graph.saved_tensors_hooks(tracker.pack, _unpack):
            with autocast_context(small.train.precision)():
                out = model.encode_image(batch["pixel_values"]), model.encode_text(batch["input_ids"])
            peak = tracker.peak
            del out
    finally:
        for h in handles:
            h.remove()
    return _Saved(peak, {t: tracker.by_block.get(k, 0) for t, k in first.items()})


def _step_flops(cfg: Any, n: int, checkpointing: bool, layers: int | None = MEASURED_LAYERS) -> float:
    """FLOPs of one real training step (forward, loss, backward and any recomputation) of the full-depth model
    at batch n: the shrunk model's count, each tower's first block's count added once per missing block."""
    from torch.utils.flop_counter import FlopCounterMode

    from .models.checkpointing import grad_checkpointing
    from .models.clip import CLIP
    from .train.clip_task import ClipTask
    from .train.loop import autocast_context

    small = _shrunk(cfg, layers)
    torch.manual_seed(0)
    model = CLIP(small.model).train()
    grad_checkpointing(model, checkpointing)
    counter = FlopCounterMode(display=False)
    with counter:  # counted in float32: the same operations, and some bf16 matmul backwards crawl on a CPU
        ClipTask(small, model, None, None, None).step(_batch(small, n), autocast_context("fp32"))
    counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    # the counter names modules from the tower down (encode_image/encode_text call the towers, not CLIP.forward)
    block = {t: counts[f"{type(getattr(model, t)).__name__}.transformer.blocks.0"] for t in ("visual", "text")}
    return counts["Global"] + sum(k * block[t] for t, k in _missing(cfg, small).items())


def activation_bytes(cfg: Any, n: int, checkpointing: bool, layers: int | None = MEASURED_LAYERS) -> float:
    """Bytes the full-depth model's training step keeps for its backward at batch n: those of the copy cut to
    `layers` blocks per tower (None: the whole model), each tower's first block's share added once per missing
    block."""
    missing = _missing(cfg, _shrunk(cfg, layers))
    plain = _forward_saved(cfg, n, False, layers)
    if not checkpointing:
        return plain.peak + sum(k * plain.block[t] for t, k in missing.items())
    # a checkpointed block keeps only its input, and the backward holds one block's activations at a time while
    # it recomputes it
    ckpt = _forward_saved(cfg, n, True, layers)
    return ckpt.peak + sum(k * ckpt.block[t] for t, k in missing.items()) + max(plain.block.values())


def measure(cfg: Any) -> Measured:
    """Per-sample activations and FLOPs of `cfg`'s training step, with and without activation checkpointing: half
    the difference between batch 4 and batch 2 (what does not grow with the batch cancels; a contrastive step
    needs two samples)."""
    from .config import ViTConfig

    if not isinstance(cfg.model.vision, ViTConfig):
        raise ValueError("mmlm plan measures ViT-tower CLIP recipes (a ResNet tower is not cut into blocks here)")
    acts = {ck: (activation_bytes(cfg, 4, ck) - activation_bytes(cfg, 2, ck)) / 2 for ck in (False, True)}
    flops = {ck: (_step_flops(cfg, 4, ck) - _step_flops(cfg, 2, ck)) / 2 for ck in (False, True)}
    return Measured(acts, flops, cfg.model.vision.layers, cfg.model.text.layers)


# ----------------------------------------------------------------------------- the plan

def parameter_counts(cfg: Any) -> dict[str, int]:
    """Parameters of the full-size model, built on the meta device (no memory, no initialisation cost), and the
    sizes of the two largest FSDP2 units (`train.fsdp`: ClipTask's `fsdp_units`, each without the units inside it)."""
    from .models.clip import CLIP
    from .train.clip_task import fsdp_units

    with torch.device("meta"):
        model = CLIP(cfg.model)
    seen: set[int] = set()
    sizes = []
    for unit in fsdp_units(model):  # innermost first: a tower's own parameters are those its blocks leave
        own = [p for p in unit.parameters() if id(p) not in seen]
        seen.update(id(p) for p in own)
        sizes.append(sum(p.numel() for p in own))
    sizes.sort(reverse=True)
    return {"total": sum(p.numel() for p in model.parameters()),
            "vision": sum(p.numel() for p in model.visual.parameters()),
            "text": sum(p.numel() for p in model.text.parameters()),
            "largest_unit": sizes[0], "second_unit": sizes[1] if len(sizes) > 1 else 0}


@dataclass
class Plan:
    gpus: int
    gpu_memory: int
    peak_tflops: float
    utilization: float
    link_gb_s: float
    reserve: int  # bytes per GPU kept for the CUDA context, allocator slack and workspaces
    params: dict[str, int]
    measured: Measured
    bf16: bool

    def fixed(self, mode: str) -> dict[str, float]:
        """Per-GPU bytes that do not grow with the batch."""
        n, W = self.params["total"], self.gpus
        if mode == "DDP":
            out = {"weights (fp32)": 4 * n, "gradients (fp32)": 4 * n, "AdamW moments (fp32)": 8 * n}
            if self.bf16:
                out["bf16 weight copies"] = 2 * n  # autocast's casts, kept for the backward
            return out
        unit, other = self.params["largest_unit"], self.params["second_unit"]
        out = {"weights (fp32 shard)": 4 * n / W, "gradients (fp32 shard)": 4 * n / W, "AdamW moments (fp32 shard)": 8 * n / W,
               # the unit computing and the next one prefetched, whole in the compute dtype; one unit's fp32 gradients
               "gathered units": (2 if self.bf16 else 4) * (unit + other) + 4 * unit}
        return out

    def batch_per_gpu(self, mode: str, ckpt: bool) -> int:
        # (DDP's flat all-reduce copy of the gradients, 4 bytes per parameter, comes after the backward, when the
        # activations and bf16 copies are freed: it fits wherever they did)
        free = self.gpu_memory - self.reserve - sum(self.fixed(mode).values())
        return max(0, int(free // self.measured.activations[ckpt]))

    def step_seconds(self, global_batch: int, ckpt: bool, mode: str) -> float:
        compute = self.measured.flops[ckpt] * global_batch / (self.gpus * self.peak_tflops * 1e12 * self.utilization)
        n, W = self.params["total"], self.gpus
        comm_bytes = 4 * n * 2 * (W - 1) / W if mode == "DDP" else 4 * n * 3 * (W - 1) / W  # ring all-reduce; FSDP: 2 gathers + reduce-scatter (bf16 gathers halve theirs)
        if mode != "DDP" and self.bf16:
            comm_bytes = (2 * 2 * n + 4 * n) * (W - 1) / W
        return compute + (comm_bytes / (self.link_gb_s * 1e9) if W > 1 else 0.0)

    def table(self, dataset_sizes: list[int]) -> str:
        gb = lambda b: f"{b / GIB:.2f}"  # noqa: E731
        p, m = self.params, self.measured
        lines = [f"model: {p['total'] / 1e6:.1f} M parameters (vision {p['vision'] / 1e6:.1f} M, text {p['text'] / 1e6:.1f} M), "
                 f"all trained; {'bf16 autocast' if self.bf16 else 'fp32'}",
                 f"GPUs: {self.gpus} x {self.gpu_memory / GIB:.0f} GiB, {self.peak_tflops:g} TFLOP/s peak at utilisation "
                 f"{self.utilization:g}; {gb(self.reserve)} GiB per GPU kept for the CUDA context and allocator slack",
                 f"measured on the CPU (the real training step at batch 2 and 4, each tower cut to 2 blocks and scaled to "
                 f"{m.vision_layers} + {m.text_layers} blocks; full-length captions; attention and LayerNorm as on a GPU):",
                 f"  activations per sample: {m.activations[False] / 2**20:.1f} MiB, "
                 f"{m.activations[True] / 2**20:.1f} MiB with activation checkpointing",
                 f"  FLOPs per sample (forward + backward): {m.flops[False] / 1e9:.1f} GFLOP, "
                 f"{m.flops[True] / 1e9:.1f} GFLOP with checkpointing (the recomputation)", ""]
        header = "| per GPU (GiB) | " + " | ".join(f"{mode}{' + ckpt' if ck else ''}" for mode in ("DDP", "FSDP2")
                                                   for ck in (False, True)) + " |"
        lines += [header, "|" + "---|" * 5]
        cols = [(mode, ck) for mode in ("DDP", "FSDP2") for ck in (False, True)]
        names = ["weights", "gradients", "AdamW moments", "bf16 weight copies / gathered units"]
        for i, name in enumerate(names):
            row = []
            for mode, ck in cols:
                vals = list(self.fixed(mode).values())
                row.append(gb(vals[i]) if i < len(vals) else "0.00")
            lines.append(f"| {name} | " + " | ".join(row) + " |")
        lines.append("| activations per sample (MiB) | " + " | ".join(f"{m.activations[ck] / 2**20:.1f}" for _, ck in cols) + " |")
        batches = {c: self.batch_per_gpu(*c) for c in cols}
        lines.append("| largest batch per GPU | " + " | ".join(str(batches[c]) for c in cols) + " |")
        lines.append("| largest global batch | " + " | ".join(str(batches[c] * self.gpus) for c in cols) + " |")
        lines.append("| step time at that batch (s) | " + " | ".join(
            f"{self.step_seconds(batches[c] * self.gpus, c[1], c[0]):.2f}" if batches[c] else "-" for c in cols) + " |")
        lines.append("| samples/s | " + " | ".join(
            f"{batches[c] * self.gpus / self.step_seconds(batches[c] * self.gpus, c[1], c[0]):.0f}" if batches[c] else "-"
            for c in cols) + " |")
        for size in dataset_sizes:
            lines.append(f"| one epoch of {size / 1e6:g} M pairs (h) | " + " | ".join(
                f"{size / (batches[c] * self.gpus) * self.step_seconds(batches[c] * self.gpus, c[1], c[0]) / 3600:.1f}"
                if batches[c] else "-" for c in cols) + " |")
        lines += ["", f"step time = FLOPs / ({self.gpus} GPUs x {self.peak_tflops:g} TFLOP/s x {self.utilization:g}) + the "
                  f"gradient traffic at {self.link_gb_s:g} GB/s (DDP: one fp32 ring all-reduce after the backward; "
                  f"FSDP2: weight all-gathers forward and backward + the gradient reduce-scatter)",
                  "FSDP2: `train.fsdp=true` (units: each image-tower block, each tower; the largest here "
                  f"{self.params['largest_unit'] / 1e6:.0f} M parameters)"]
        return "\n".join(lines)


def plan(config: str | Path, gpus: int = 2, gpu_memory: str = "24GB", peak_tflops: float = 71.0,
         utilization: float = 0.4, link_gb_s: float = 16.0, reserve: str = "1.5GB",
         dataset_sizes: tuple[int, ...] = (1_000_000, 3_300_000), overrides: list[str] | None = None) -> Plan:
    """The plan for a CLIP recipe (defaults: two RTX 3090s: 24 GB, 71 TFLOP/s dense bf16 tensor peak, 40% of it,
    PCIe 4.0 x16 at ~16 GB/s between them). Prints the table and returns the Plan."""
    from .assets import recipe_path
    from .train.recipes import load_recipe

    cfg = load_recipe("clip", config if Path(config).is_file() else recipe_path(str(config)), overrides)
    if cfg.tokenizer.kind == "bpe":  # `mmlm train` sizes the text tower to the tokenizer it trains
        cfg.model.text.vocab_size = cfg.tokenizer.vocab_size
    p = Plan(gpus=gpus, gpu_memory=parse_bytes(gpu_memory), peak_tflops=peak_tflops, utilization=utilization,
             link_gb_s=link_gb_s, reserve=parse_bytes(reserve), params=parameter_counts(cfg), measured=measure(cfg),
             bf16=cfg.train.precision == "bf16")
    print(p.table(list(dataset_sizes)))
    return p
