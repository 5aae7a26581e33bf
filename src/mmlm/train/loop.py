"""The one training loop, shared by every model and stage (CLIP pretraining, LLaVA stages 1 and 2).

What a model contributes is a `Task`: its dataset and collate function, one forward/backward on a batch,
an evaluation, and how to save itself. The loop owns everything else: AdamW, warmup + cosine, clipping,
bf16 autocast, the NaN/Inf guard, logging (tqdm + metrics.jsonl), periodic evaluation, atomic
checkpoints (keep the last K) and exact resume (model, optimizer, RNG states, data position).

Exact resume works because the data order is a pure function of (seed, batch number): batch b of the
run is slice b % per_epoch of the permutation seeded by (seed, b // per_epoch). A checkpoint stores the
number of batches consumed; a resumed run asks the sampler for the batches after it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .. import devices, distributed
from ..checkpoint import read_json, write_json
from ..config import to_dict
from ..models.checkpointing import grad_checkpointing
from ..distributed import (all_gather_objects, average_gradients, barrier, broadcast_object, broadcast_parameters,
                           full_optimizer_state_dict, full_state_dict, grad_norm_value, is_sharded, load_full_state_dicts,
                           load_sharded, save_sharded, sync_batch_norm, unsharded)
from .optim import build_optimizer, lr_at


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 128
    micro_batch: int = 0  # contrastive feature caching: embed in chunks of this size (0 = whole batch at once)
    grad_checkpointing: bool = False  # keep only each block's input, recompute the rest in the backward (less memory)
    lr: float = 5e-4
    min_lr_ratio: float = 0.0
    warmup_steps: int = 50
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    precision: str = "fp32"  # "fp32", "bf16" (autocast), "fp16" (autocast + gradient scaler; for CUDA) or "auto" (bf16
    # where the device computes it natively, else fp32; made concrete here): devices.py
    device: str = "auto"  # auto (cuda:LOCAL_RANK when CUDA is available, else cpu) | cpu | cuda | cuda:N
    compile: bool = False  # torch.compile each model block (back to eager, with a warning, if compiling fails)
    seed: int = 0
    num_workers: int = 0
    threads: int = 0  # torch intra-op threads in the main process (0 = torch's default); set by start_process
    log_every: int = 10
    eval_every: int = 0  # steps between evaluations (0 = only at the end)
    ckpt_every: int = 0  # steps between checkpoints (0 = only at the end)
    keep_last: int = 2
    max_bad_steps: int = 10  # abort after this many non-finite losses/gradients
    max_bad_sample_fraction: float = 0.01  # abort when more than this fraction of samples fail to load
    progress: bool = True
    # under torchrun (see distributed.py): batch_size is the global batch, split evenly over the ranks
    fsdp: bool = False  # shard the model with FSDP2 (LLaVA's LM blocks; a CLIP's blocks and towers); else every rank holds all of it
    checkpoint_format: str = "consolidated"  # consolidated: one model.safetensors | sharded: DCP shards per rank
    dist_timeout_s: float = 1800.0  # a rank waiting longer than this for a peer (that died) gives up

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        kind = self.device.split(":")[0].strip().lower() if isinstance(self.device, str) else None
        if kind not in devices.DEVICES:
            raise ValueError(f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        cuda = kind == "cuda" or (kind == "auto" and torch.cuda.is_available())
        self.precision = devices.resolve_precision(self.precision, "cuda" if cuda else "cpu")  # "auto" made concrete
        if self.fsdp and self.precision == "fp16":  # the scaler's unscale over sharded gradients is not wired up
            raise ValueError("train.precision=fp16 does not combine with train.fsdp: use bf16 (no loss scaling needed)")
        if self.checkpoint_format not in ("consolidated", "sharded"):
            raise ValueError(f"train.checkpoint_format must be 'consolidated' or 'sharded', got {self.checkpoint_format!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("train.steps and train.batch_size must be positive")


class Task(Protocol):
    model: nn.Module

    def train_dataset(self) -> Dataset: ...
    def collate(self, samples: list[Any]) -> dict[str, Any]: ...
    def step(self, batch: dict[str, Any], autocast: Callable[[], contextlib.AbstractContextManager]) -> dict[str, float]: ...
    def after_optimizer_step(self) -> None: ...
    def evaluate(self) -> dict[str, Any]: ...
    def save_model(self, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None: ...
    # state_dict: given (gathered by the loop) only for a model sharded with FSDP2


class TrainingError(RuntimeError):
    """The run cannot go on (too many bad steps or unreadable samples); the message says why."""


# ----------------------------------------------------------------------------- data order

class EpochBatchSampler(Sampler[list[int]]):
    """Infinite stream of index batches; batch b is a pure function of (seed, b). Drops the last partial batch.

    With `world_size` > 1, `batch_size` is the global batch and rank `rank` gets its contiguous part of it:
    the ranks together see exactly the batches of one process (any world size; every sample once per epoch).
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_batch: int = 0, rank: int = 0, world_size: int = 1):
        if n < batch_size:
            raise ValueError(f"the dataset has {n} samples, fewer than one batch of {batch_size}")
        if batch_size % world_size:
            raise ValueError(f"train.batch_size={batch_size} (the global batch) must be divisible by the "
                             f"{world_size} processes")
        self.n, self.batch_size, self.seed, self.start_batch = n, batch_size, seed, start_batch
        self.per_epoch = n // batch_size
        self.rank_slice = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)

    def __iter__(self) -> Iterator[list[int]]:
        b = self.start_batch
        epoch, perm = -1, None
        while True:
            e, i = divmod(b, self.per_epoch)
            if e != epoch:
                epoch, perm = e, torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + e))
            yield perm[i * self.batch_size:(i + 1) * self.batch_size][self.rank_slice].tolist()
            b += 1

    def __len__(self) -> int:  # DataLoader asks; the stream is endless
        return 2**62


def _worker_init(_: int) -> None:
    # Forked workers inherit torch's thread pool settings; several threads per worker on 2 cores crawl.
    torch.set_num_threads(1)


def make_loader(dataset: Dataset, collate: Callable, batch_size: int, seed: int, start_batch: int,
                num_workers: int, rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> DataLoader:
    """`pin_memory` (for a CUDA run): batches in page-locked memory, which the copy to the GPU reads without
    blocking the host (see devices.to_device)."""
    sampler = EpochBatchSampler(len(dataset), batch_size, seed, start_batch, rank, world_size)
    return DataLoader(dataset, batch_sampler=sampler, pin_memory=pin_memory,
                      collate_fn=collate, num_workers=num_workers, worker_init_fn=_worker_init if num_workers else None,
                      prefetch_factor=4 if num_workers else None, persistent_workers=False,
                      generator=torch.Generator().manual_seed(seed + start_batch))  # keeps the global RNG untouched


# ----------------------------------------------------------------------------- checkpoints

@dataclass
class TrainerState:
    step: int = 0
    bad_steps: int = 0
    samples_seen: int = 0
    bad_samples: list[list[str]] = field(default_factory=list)  # [source, reason]


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def _set_rng_state(s: dict[str, Any]) -> None:
    py = s["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = s["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))


def save_checkpoint(task: Task, opt: torch.optim.Optimizer, state: TrainerState, run: Path, keep_last: int,
                    fmt: str = "consolidated", scaler: torch.amp.GradScaler | None = None) -> Path:
    """Write checkpoints/step-NNNNNNNN atomically (a temp dir renamed into place), then prune to the last K.

    Under torch.distributed every rank calls this; rank 0 writes the files (with `fmt` "sharded" every rank
    writes its DCP shards of model and optimizer into dcp/, and the model is not consolidated).
    """
    w = distributed.world()
    sharded = is_sharded(task.model)
    root = run / "checkpoints"
    final = root / f"step-{state.step:08d}"
    tmp = root / f".tmp-step-{state.step:08d}-{broadcast_object(os.getpid())}"
    if w.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    optimizer: dict[str, Any] | None = None
    if fmt == "sharded":
        save_sharded(tmp / "dcp", task.model, opt)
    elif sharded:  # consolidated from shards: every rank takes part in the gathers, rank 0 keeps the result
        model_sd = full_state_dict(task.model)
        optimizer = full_optimizer_state_dict(task.model, opt)
    else:
        optimizer = opt.state_dict()
    if w.is_main:
        if fmt == "consolidated":
            if sharded:
                task.save_model(tmp, state_dict=model_sd)
            else:
                task.save_model(tmp)
        # Optimizer tensors and torch's RNG go through torch.save; they are read back with weights_only=True.
        extra = {} if scaler is None else {"scaler": scaler.state_dict()}  # fp16's loss scale goes on as it was
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            extra["cuda_rng"] = torch.cuda.get_rng_state()  # the current device's generator
        torch.save({"optimizer": optimizer, "torch_rng": torch.get_rng_state(), **extra}, tmp / "trainer_state.pt")
        write_json(tmp / "trainer_state.json", {"state": state.__dict__, "rng": _rng_state(), "format": fmt,
                                                "world_size": w.world_size})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    barrier()
    if not w.is_main:
        return final
    for old in sorted(root.glob("step-*"))[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _keyed_by_name(optimizer_state: dict[str, Any]) -> bool:
    """An optimizer state consolidated from FSDP shards is keyed by parameter names, torch's own by index."""
    return any(isinstance(k, str) for k in optimizer_state.get("state", {}))


def latest_checkpoint(run: Path) -> Path | None:
    done = [p for p in sorted((run / "checkpoints").glob("step-*")) if (p / "trainer_state.json").is_file()]
    return done[-1] if done else None


def load_checkpoint(path: Path, task: Task, opt: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler | None = None) -> TrainerState:
    """Resume from a checkpoint written at any world size, sharded (dcp/) or consolidated."""
    from ..checkpoint import load_state_dict_strict, read_state_dict

    blob = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    if (path / "dcp").is_dir():
        load_sharded(path / "dcp", task.model, opt)
    elif is_sharded(task.model) or _keyed_by_name(blob["optimizer"]):
        load_full_state_dicts(task.model, opt, read_state_dict(path / "model.safetensors"), blob["optimizer"])
    else:
        load_state_dict_strict(task.model, read_state_dict(path / "model.safetensors"), str(path / "model.safetensors"))
        opt.load_state_dict(blob["optimizer"])
    torch.set_rng_state(blob["torch_rng"])
    if "cuda_rng" in blob and torch.cuda.is_available():
        torch.cuda.set_rng_state(blob["cuda_rng"])
    if scaler is not None and "scaler" in blob:
        scaler.load_state_dict(blob["scaler"])
    meta = read_json(path / "trainer_state.json")
    _set_rng_state(meta["rng"])
    return TrainerState(**meta["state"])


# ----------------------------------------------------------------------------- the loop

class MetricsLog:
    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = path, enabled  # under torch.distributed only rank 0 writes
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def autocast_context(precision: str, device: torch.device | str = "cpu") -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the autocast context for `train.precision` on `device` (devices.Precision): none for fp32."""
    return devices.Precision(precision, device)


def start_process(cfg: TrainConfig) -> distributed.World:
    """Make this process ready to train: join the process group torchrun describes (nothing in a single
    process) and set its torch threads (`train.threads`). The one place a run does either."""
    w = distributed.setup(cfg.dist_timeout_s)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return w


def run_training(run_cfg: Any, out: str | Path, build_task: Callable[[Path], Task], resume: bool = True) -> dict[str, Any]:
    """What every `mmlm train` kind does with its run config: start the process, build the task (data,
    tokenizer written into `out`, model, evaluation), save the config it settled on as config.yaml, train,
    and print the summary as one JSON line."""
    out = Path(out)
    w = start_process(run_cfg.train)
    out.mkdir(parents=True, exist_ok=True)
    task = build_task(out)
    if w.is_main:
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(run_cfg), sort_keys=False))
    summary = train(task, run_cfg.train, out, resume=resume)
    if w.is_main:
        print(json.dumps({"run": str(out), **summary}))
    return summary


def train(task: Task, cfg: TrainConfig, run: str | Path, resume: bool = True) -> dict[str, Any]:
    """Train `task.model` for `cfg.steps` optimizer steps, writing everything under `run`.

    A run directory that already holds a checkpoint resumes from its latest one.

    Under torch.distributed (torchrun; see distributed.py) every rank runs this with the same arguments:
    each takes its part of every global batch, gradients are averaged over ranks (by FSDP2 for a sharded model),
    rank 0 alone logs and writes files, and a resumed run may use a different world size.
    """
    run = Path(run)
    w = distributed.world()
    device = devices.resolve(cfg.device, "train.device")  # cuda:LOCAL_RANK under torchrun
    if w.is_main:
        run.mkdir(parents=True, exist_ok=True)
    barrier()
    model = task.model.train()
    if cfg.grad_checkpointing:
        grad_checkpointing(model)  # activation checkpointing per block (models/checkpointing.py)
    if not is_sharded(model):  # a sharded model was placed before sharding (LlavaTask)
        model.to(device)
    replicated = w.enabled and not is_sharded(model)
    if replicated:
        broadcast_parameters(model)  # every rank starts from rank 0's weights, as DDP does
        sync_batch_norm(model)  # BatchNorm's statistics are the global batch's, as in one process
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps)
    autocast = devices.Precision(cfg.precision, device)  # the forward's autocast; fp16's gradient scaler
    scaler = autocast.scaler
    state = TrainerState()
    ckpt = latest_checkpoint(run) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, task, opt, scaler)
        if w.is_main:
            print(f"resuming from {ckpt} (step {state.step})")
    log = MetricsLog(run / "metrics.jsonl", enabled=w.is_main)
    dataset = task.train_dataset()
    loader = make_loader(dataset, task.collate, cfg.batch_size, cfg.seed, state.step, cfg.num_workers,
                         w.rank, w.world_size, pin_memory=device.type == "cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    compiled = devices.compile_blocks(model) if cfg.compile else []
    bar = None
    if cfg.progress and w.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=state.step, desc="train", dynamic_ncols=True)
    last_eval: dict[str, Any] = {}
    t_last, samples_last = time.perf_counter(), 0
    try:
        for batch in loader:
            if state.step >= cfg.steps:
                break
            if w.enabled:  # the global batch's size and unreadable samples, the same on every rank
                parts = all_gather_objects((batch["batch_size"], batch.get("bad", [])))
                global_size, global_bad = sum(n for n, _ in parts), [b for _, bad in parts for b in bad]
            else:
                global_size, global_bad = batch["batch_size"], batch.get("bad", [])
            _account_bad_samples(global_size, global_bad, state, cfg, len(dataset), w.is_main)
            lr = lr_at(state.step, cfg.lr, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = lr
            batch = devices.to_device(batch, device)
            # with train.compile, a step the compiler fails on runs again eagerly, and so do all after it
            metrics, compiled = devices.step_with_fallback(lambda: task.step(batch, autocast), model, compiled)
            if w.enabled:  # DDP's all-reduce (under FSDP2, of the parameters it leaves whole: it reduced the rest)
                average_gradients(params)
            if scaler is not None:  # fp16: the true gradients, before they are clipped
                scaler.unscale_(opt)
            grad_norm = grad_norm_value(
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf))
            state.samples_seen += global_size
            samples_last += global_size
            if scaler is not None and math.isfinite(metrics["loss"]) and not math.isfinite(grad_norm):
                # fp16 overflow: the scaler skips the update and halves its scale; not a bad step
                scale = scaler.get_scale()
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                log.write({"step": state.step, "skipped": "fp16 gradient overflow", "loss_scale": scale})
            elif not (math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)):
                if scaler is not None:
                    scaler.update()
                opt.zero_grad(set_to_none=True)
                state.bad_steps += 1
                log.write({"step": state.step, "skipped": "non-finite loss or gradient", "loss": metrics["loss"]})
                if state.bad_steps > cfg.max_bad_steps:
                    raise TrainingError(f"{state.bad_steps} steps had a non-finite loss or gradient (limit "
                                        f"train.max_bad_steps={cfg.max_bad_steps}); lower train.lr or use fp32")
            else:
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                opt.zero_grad(set_to_none=True)
                task.after_optimizer_step()
            state.step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                now = time.perf_counter()
                log.write({"step": state.step, **metrics, "lr": lr, "grad_norm": float(grad_norm),
                           "samples_per_s": samples_last / max(now - t_last, 1e-9), "time": time.time()})
                t_last, samples_last = now, 0
            if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < cfg.steps:
                last_eval = _evaluate(task, state, log, autocast)
            if (cfg.ckpt_every and state.step % cfg.ckpt_every == 0) or state.step == cfg.steps:
                save_checkpoint(task, opt, state, run, cfg.keep_last, cfg.checkpoint_format, scaler)
    finally:
        if bar is not None:
            bar.close()
    last_eval = _evaluate(task, state, log, autocast)
    final_sd = full_state_dict(model) if is_sharded(model) else None  # a collective: every rank
    if w.is_main:
        if final_sd is not None:
            task.save_model(run / "final", state_dict=final_sd)
        else:
            task.save_model(run / "final")
    summary = {"step": state.step, "samples_seen": state.samples_seen, "bad_steps": state.bad_steps,
               "bad_samples": len(state.bad_samples), "eval": last_eval}
    if w.is_main:
        write_json(run / "summary.json", summary)
    barrier()
    return summary


def _evaluate(task: Task, state: TrainerState, log: MetricsLog, autocast: Callable) -> dict[str, Any]:
    task.model.eval()
    # FSDP: the model is held unsharded (ranks may then run different numbers of forwards), in its compute dtype
    precision = autocast() if is_sharded(task.model) else contextlib.nullcontext()
    with torch.no_grad(), unsharded(task.model), precision:
        result = task.evaluate()
    task.model.train()
    log.write({"step": state.step, "eval": result})
    return result


def _account_bad_samples(batch_size: int, bad_samples: list, state: TrainerState, cfg: TrainConfig, n: int,
                         report: bool = True) -> None:
    """Record the (global) batch's unreadable samples; fail once they exceed the allowed fraction.

    The fraction is judged against at least min(dataset size, 1000) samples, so that one bad image in
    the first batch does not end a run that would have seen 1% bad overall.
    """
    for source, reason in bad_samples:
        state.bad_samples.append([source, reason])
        if report:
            print(f"skipped sample {source}: {reason}")
    bad = len(state.bad_samples)
    attempted = state.samples_seen + batch_size + bad
    if bad > cfg.max_bad_sample_fraction * max(attempted, min(n, 1000)):
        raise TrainingError(f"{bad} of {attempted} samples could not be loaded (limit "
                            f"train.max_bad_sample_fraction={cfg.max_bad_sample_fraction}); first: "
                            f"{state.bad_samples[0][0]}: {state.bad_samples[0][1]}")
