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
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..checkpoint import read_json, write_json
from .optim import build_optimizer, lr_at


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 128
    micro_batch: int = 0  # contrastive feature caching: embed in chunks of this size (0 = whole batch at once)
    lr: float = 5e-4
    min_lr_ratio: float = 0.0
    warmup_steps: int = 50
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    precision: str = "fp32"  # "fp32" or "bf16" (autocast)
    seed: int = 0
    num_workers: int = 0
    threads: int = 0  # torch intra-op threads in the main process (0 = torch's default)
    log_every: int = 10
    eval_every: int = 0  # steps between evaluations (0 = only at the end)
    ckpt_every: int = 0  # steps between checkpoints (0 = only at the end)
    keep_last: int = 2
    max_bad_steps: int = 10  # abort after this many non-finite losses/gradients
    max_bad_sample_fraction: float = 0.01  # abort when more than this fraction of samples fail to load
    progress: bool = True

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"train.precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("train.steps and train.batch_size must be positive")


class Task(Protocol):
    model: nn.Module

    def train_dataset(self) -> Dataset: ...
    def collate(self, samples: list[Any]) -> dict[str, Any]: ...
    def step(self, batch: dict[str, Any], autocast: Callable[[], contextlib.AbstractContextManager]) -> dict[str, float]: ...
    def after_optimizer_step(self) -> None: ...
    def evaluate(self) -> dict[str, Any]: ...
    def save_model(self, directory: Path) -> None: ...


class TrainingError(RuntimeError):
    """The run cannot go on (too many bad steps or unreadable samples); the message says why."""


# ----------------------------------------------------------------------------- data order

class EpochBatchSampler(Sampler[list[int]]):
    """Infinite stream of index batches; batch b is a pure function of (seed, b). Drops the last partial batch."""

    def __init__(self, n: int, batch_size: int, seed: int, start_batch: int = 0):
        if n < batch_size:
            raise ValueError(f"the dataset has {n} samples, fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.seed, self.start_batch = n, batch_size, seed, start_batch
        self.per_epoch = n // batch_size

    def __iter__(self) -> Iterator[list[int]]:
        b = self.start_batch
        epoch, perm = -1, None
        while True:
            e, i = divmod(b, self.per_epoch)
            if e != epoch:
                epoch, perm = e, torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + e))
            yield perm[i * self.batch_size:(i + 1) * self.batch_size].tolist()
            b += 1

    def __len__(self) -> int:  # DataLoader asks; the stream is endless
        return 2**62


def _worker_init(_: int) -> None:
    # Forked workers inherit torch's thread pool settings; several threads per worker on 2 cores crawl.
    torch.set_num_threads(1)


def make_loader(dataset: Dataset, collate: Callable, batch_size: int, seed: int, start_batch: int,
                num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_sampler=EpochBatchSampler(len(dataset), batch_size, seed, start_batch),
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


def save_checkpoint(task: Task, opt: torch.optim.Optimizer, state: TrainerState, run: Path, keep_last: int) -> Path:
    """Write checkpoints/step-NNNNNNNN atomically (a temp dir renamed into place), then prune to the last K."""
    root = run / "checkpoints"
    final = root / f"step-{state.step:08d}"
    tmp = root / f".tmp-step-{state.step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    task.save_model(tmp)
    # Optimizer tensors and torch's RNG go through torch.save; they are read back with weights_only=True.
    torch.save({"optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state()}, tmp / "trainer_state.pt")
    write_json(tmp / "trainer_state.json", {"state": state.__dict__, "rng": _rng_state()})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(root.glob("step-*"))[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run: Path) -> Path | None:
    done = [p for p in sorted((run / "checkpoints").glob("step-*")) if (p / "trainer_state.json").is_file()]
    return done[-1] if done else None


def load_checkpoint(path: Path, task: Task, opt: torch.optim.Optimizer) -> TrainerState:
    from ..checkpoint import load_state_dict_strict, read_state_dict

    load_state_dict_strict(task.model, read_state_dict(path / "model.safetensors"), str(path / "model.safetensors"))
    blob = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    opt.load_state_dict(blob["optimizer"])
    torch.set_rng_state(blob["torch_rng"])
    meta = read_json(path / "trainer_state.json")
    _set_rng_state(meta["rng"])
    return TrainerState(**meta["state"])


# ----------------------------------------------------------------------------- the loop

class MetricsLog:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _autocast(precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    if precision == "bf16":
        return lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext


def train(task: Task, cfg: TrainConfig, run: str | Path, resume: bool = True) -> dict[str, Any]:
    """Train `task.model` for `cfg.steps` optimizer steps, writing everything under `run`.

    A run directory that already holds a checkpoint resumes from its latest one.
    """
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = task.model.train()
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps)
    state = TrainerState()
    ckpt = latest_checkpoint(run) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, task, opt)
        print(f"resuming from {ckpt} (step {state.step})")
    log = MetricsLog(run / "metrics.jsonl")
    dataset = task.train_dataset()
    loader = make_loader(dataset, task.collate, cfg.batch_size, cfg.seed, state.step, cfg.num_workers)
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = _autocast(cfg.precision)
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=state.step, desc="train", dynamic_ncols=True)
    last_eval: dict[str, Any] = {}
    t_last, samples_last = time.perf_counter(), 0
    try:
        for batch in loader:
            if state.step >= cfg.steps:
                break
            _account_bad_samples(batch, state, cfg, len(dataset))
            lr = lr_at(state.step, cfg.lr, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = lr
            metrics = task.step(batch, autocast)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            state.samples_seen += batch["batch_size"]
            samples_last += batch["batch_size"]
            if not (math.isfinite(metrics["loss"]) and torch.isfinite(grad_norm)):
                opt.zero_grad(set_to_none=True)
                state.bad_steps += 1
                log.write({"step": state.step, "skipped": "non-finite loss or gradient", "loss": metrics["loss"]})
                if state.bad_steps > cfg.max_bad_steps:
                    raise TrainingError(f"{state.bad_steps} steps had a non-finite loss or gradient (limit "
                                        f"train.max_bad_steps={cfg.max_bad_steps}); lower train.lr or use fp32")
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
                last_eval = _evaluate(task, state, log)
            if (cfg.ckpt_every and state.step % cfg.ckpt_every == 0) or state.step == cfg.steps:
                save_checkpoint(task, opt, state, run, cfg.keep_last)
    finally:
        if bar is not None:
            bar.close()
    last_eval = _evaluate(task, state, log)
    task.save_model(run / "final")
    summary = {"step": state.step, "samples_seen": state.samples_seen, "bad_steps": state.bad_steps,
               "bad_samples": len(state.bad_samples), "eval": last_eval}
    write_json(run / "summary.json", summary)
    return summary


def _evaluate(task: Task, state: TrainerState, log: MetricsLog) -> dict[str, Any]:
    task.model.eval()
    with torch.no_grad():
        result = task.evaluate()
    task.model.train()
    log.write({"step": state.step, "eval": result})
    return result


def _account_bad_samples(batch: dict[str, Any], state: TrainerState, cfg: TrainConfig, n: int) -> None:
    """Record the batch's unreadable samples; fail once they exceed the allowed fraction.

    The fraction is judged against at least min(dataset size, 1000) samples, so that one bad image in
    the first batch does not end a run that would have seen 1% bad overall.
    """
    for source, reason in batch.get("bad", []):
        state.bad_samples.append([source, reason])
        print(f"skipped sample {source}: {reason}")
    bad = len(state.bad_samples)
    attempted = state.samples_seen + batch["batch_size"] + bad
    if bad > cfg.max_bad_sample_fraction * max(attempted, min(n, 1000)):
        raise TrainingError(f"{bad} of {attempted} samples could not be loaded (limit "
                            f"train.max_bad_sample_fraction={cfg.max_bad_sample_fraction}); first: "
                            f"{state.bad_samples[0][0]}: {state.bad_samples[0][1]}")
