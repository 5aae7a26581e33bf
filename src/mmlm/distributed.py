"""Scaling out on PyTorch's own engine: torch.distributed process groups (launched by torchrun), FSDP2 and DCP.

A single process never touches torch.distributed: with WORLD_SIZE unset (or 1) every function here is a
no-op or the identity, so a plain `mmlm train` behaves exactly as before.

How the maths stays the same as one process on the global batch:
- data: global batch b is the same permutation slice at any world size; rank r takes its r-th contiguous
  part (`EpochBatchSampler(rank=, world_size=)`), so every sample is seen once per epoch across ranks;
- replicated models (CLIP; LLaVA without FSDP): parameters are broadcast from rank 0 at the start and
  gradients are averaged after each step (`average_gradients`, DDP's all-reduce-mean, done once per step
  so that feature caching's several backward passes and `encode_image`/`encode_text` calls need no wrapper);
- FSDP2 (`fully_shard`) shards LLaVA's LM blocks and averages gradients with its reduce-scatter;
- every loss is scaled so that the average of the ranks' gradients is the single-process gradient:
  a rank's loss is (sum over its rows) / (global rows) * world_size (`global_mean_factor`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place in the process group (rank 0 of 1 when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def setup(timeout_s: float = 1800.0) -> World:
    """Join the process group that torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR/PORT in the environment).

    gloo for CPU tensors; where CUDA is available NCCL too, for CUDA tensors (each rank on GPU LOCAL_RANK), so
    that collectives work whichever device a tensor is on. Without WORLD_SIZE > 1 nothing is initialised.
    `timeout_s` bounds how long a rank waits in a collective for a peer that died.
    """
    if dist.is_available() and dist.is_initialized():
        return world()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(f"WORLD_SIZE={size} but {name} is not set: launch with torchrun")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return world()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world().enabled:
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. writes a tokenizer), the others after it (and read what it wrote)."""
    w = world()
    if w.enabled and not w.is_main:
        dist.barrier()
    yield
    if w.enabled and w.is_main:
        dist.barrier()


# ----------------------------------------------------------------------------- collectives

def all_sum(value: float) -> float:
    if not world().enabled:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list in a single process)."""
    w = world()
    if not w.enabled:
        return [obj]
    out: list[Any] = [None] * w.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not world().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class _GatherRows(torch.autograd.Function):
    """all_gather of equal-shaped row blocks; the backward hands each rank the sum over ranks of the gradient
    for its own block (every rank's loss may depend on every rank's rows)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        w = world()
        ctx.rank = w.rank
        out = x.new_empty((w.world_size * x.shape[0], *x.shape[1:]))
        dist.all_gather_single(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(world().world_size)[ctx.rank]


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate every rank's rows of `x` (B_r, ...) in rank order, with gradients flowing back to each rank.

    Returns (all rows (N, ...), offset of this rank's rows). Ranks may hold different numbers of rows (a batch
    that lost unreadable samples): rows are padded to the largest count for the gather and the padding dropped.
    """
    w = world()
    if not w.enabled:
        return x, 0
    counts = [int(c) for c in all_gather_objects(x.shape[0])]
    most = max(counts)
    padded = x if x.shape[0] == most else torch.cat([x, x.new_zeros(most - x.shape[0], *x.shape[1:])])
    parts = _GatherRows.apply(padded).split(most)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]), sum(counts[:w.rank])


def global_mean_factor(local_count: float) -> tuple[float, float]:
    """(global count N, factor) such that `factor * (sum of this rank's terms) / local_count`, averaged over
    ranks, is the mean over all N terms: factor = local_count * world_size / N (1 in a single process)."""
    w = world()
    total = all_sum(local_count)
    return total, (local_count * w.world_size / total if total else 0.0)


def all_mean(value: float) -> float:
    return all_sum(value) / world().world_size


# ----------------------------------------------------------------------------- replicated models (DDP's maths)

def broadcast_parameters(model: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (what DDP does at construction)."""
    if not world().enabled:
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=0)


def average_gradients(params: Sequence[nn.Parameter]) -> None:
    """Replace each gradient by its mean over ranks: one flat all-reduce per dtype (DDP's bucketed all-reduce).

    A parameter that got a gradient on some rank but not on another counts zeros for the latter. FSDP2's sharded
    parameters (DTensors) are skipped: FSDP2 reduced their gradients.
    """
    w = world()
    if not w.enabled:
        return
    from torch.distributed.tensor import DTensor

    params = [p for p in params if p.requires_grad and not isinstance(p, DTensor)]
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
    dist.all_reduce(has)
    for p, h in zip(params, has.tolist()):
        if h and p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat)
        flat /= w.world_size
        for p, g in zip(group, flat.split([p.numel() for p in group])):
            p.grad.copy_(g.view_as(p.grad))


# ----------------------------------------------------------------------------- BatchNorm over the global batch

class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the backward sums the gradients too (every rank's loss depends on every rank's sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics are those of the global batch: the mean and variance are summed over
    ranks (two all-reduces forward, two backward), so every rank normalises as one process would on the whole
    batch and keeps the same running statistics. torch.nn.SyncBatchNorm does this for GPUs only; this one works
    with gloo on the CPU as with NCCL. In eval mode, or without a process group, it is nn.BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world().enabled):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]  # every axis but the channels
        shape = (1, -1) + (1,) * (x.dim() - 2)  # a (C,) statistic broadcast over (B, C, H, W)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in float32 at least (bf16 under autocast)
        local_count = xf.new_tensor([x.numel() / x.shape[1]])
        sums = _AllReduceSum.apply(torch.cat([xf.sum(dims), local_count]))  # (C + 1,): sum of x, row count
        count = sums[-1].detach()
        mean = sums[:-1] / count
        centred = xf - mean.view(shape)
        var = _AllReduceSum.apply(centred.square().sum(dims)) / count  # two passes, as torch's BatchNorm
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                unbiased = var * count / (count - 1).clamp(min=1)  # the running variance is the unbiased one
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        return y.to(x.dtype)


def sync_batch_norm(model: nn.Module) -> int:
    """Replace every nn.BatchNorm2d of `model` by a `SyncBatchNorm` holding the same parameters and buffers (in
    place; names and state dict unchanged). Returns how many were replaced."""
    n = 0
    for parent in list(model.modules()):
        for name, bn in list(parent.named_children()):
            if type(bn) is nn.BatchNorm2d:
                sync = SyncBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                                     device="meta")
                for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                    setattr(sync, key, getattr(bn, key))  # the same objects: an optimizer built before holds them
                sync.train(bn.training)
                setattr(parent, name, sync)
                n += 1
    return n


# ----------------------------------------------------------------------------- FSDP2

def fully_shard_model(model: nn.Module, blocks: Iterable[nn.Module], precision: str = "fp32",
                      ignored: Iterable[nn.Parameter] = ()) -> nn.Module:
    """FSDP2: each of `blocks` is its own shard unit (all-gathered just before its forward; a unit inside another
    comes first), the rest of the model one root unit. bf16 mixed precision all-gathers and computes in bf16 (under
    autocast), keeps fp32 master weights and optimizer state, and reduces gradients in fp32. `ignored` parameters
    stay whole on every rank (a scalar used outside any forward, such as CLIP's logit scale): their gradients are
    averaged as a replicated model's (`average_gradients`)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    w = world()
    mesh = init_device_mesh(next(model.parameters()).device.type, (w.world_size,))  # where the model lives
    # Inputs are not cast: FSDP would cast copies of a KV cache (a dataclass / tuple of tensors) that generation
    # then never sees filled. The loop's bf16 autocast reconciles fp32 inputs with bf16 weights instead.
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False) \
        if precision == "bf16" else MixedPrecisionPolicy()
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    ignored = set(ignored)
    fully_shard(model, mesh=mesh, mp_policy=mp, **({"ignored_params": ignored} if ignored else {}))
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def unsharded(model: nn.Module) -> Iterator[None]:
    """Hold every FSDP unit's full parameters for the block, so that ranks can run different numbers of forwards
    (generation that stops at different lengths) with no collective in between. No-op for other models."""
    if not is_sharded(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for u in units:
        u.unshard()
        u.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for u in units:
            u.reshard()
            u.set_reshard_after_forward(True)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict as plain CPU tensors (a collective for a sharded model: call on every rank)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state_dict(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's whole state keyed by parameter names (gathered from the shards: call on every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dicts(model: nn.Module, opt: torch.optim.Optimizer, model_sd: dict[str, torch.Tensor],
                          optim_sd: dict[str, Any]) -> None:
    """Load consolidated (full, name-keyed) model and optimizer states into a sharded or plain model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=True))


def grad_norm_value(norm: torch.Tensor) -> float:
    """clip_grad_norm_'s result as a float (a DTensor under FSDP)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


# ----------------------------------------------------------------------------- sharded checkpoints (DCP)

def save_sharded(directory: str | os.PathLike, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Model + optimizer with torch.distributed.checkpoint: each rank writes its shards, rank 0 the metadata."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(directory))


def load_sharded(directory: str | os.PathLike, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Load a DCP checkpoint into `model`/`opt` at any world size (resharded on read; a plain model in one
    process reads it too)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def consolidate(directory: str | os.PathLike, out_file: str | os.PathLike) -> None:
    """A sharded checkpoint's model weights as one safetensors file (offline, one process, no process group)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from .checkpoint import save_tensors

    reader = dcp.FileSystemReader(str(directory))
    meta = reader.read_metadata()
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.state_dict_metadata.items()
             if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    dcp.load(state, storage_reader=reader, no_dist=True)
    save_tensors(out_file, {k.removeprefix("model."): v for k, v in state.items()})


# ----------------------------------------------------------------------------- distributed evaluation

def map_shards(fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    """[fn(x) for x in items], with rank r computing items r, r + W, ... and every rank getting all results
    back in order (evaluation: features computed once, gathered, then scored). `fn` must not use collectives."""
    w = world()
    if not w.enabled:
        return [fn(x) for x in items]
    mine, n = [], 0
    for i, x in enumerate(items):
        n = i + 1
        if i % w.world_size == w.rank:
            mine.append(fn(x))
    parts = all_gather_objects(mine)
    return [parts[i % w.world_size][i // w.world_size] for i in range(n)]
