"""Scaling out does not change the maths: 2 processes (gloo, CPU, 1 thread each) against 1 process on the global batch.

Each test spawns its workers once and joins them with a deadline, so a broken collective fails instead of hanging.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from mmlm.train import distributed

WORLD = 2
CLIP_CASES = [("clip", "local", 0), ("clip", "global", 0), ("siglip", "local", 0), ("siglip", "global", 0),
              ("clip", "local", 2), ("siglip", "global", 2)]  # (loss, gather mode, feature-caching micro-batch)


# ----------------------------------------------------------------------------- launching

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, name: str, out: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    distributed.setup(timeout_s=60)
    try:
        globals()[name](rank, Path(out), *args)
    finally:
        distributed.shutdown()


def launch(name: str, out: Path, *args, world: int = WORLD, timeout: float = 240) -> None:
    """Run `name(rank, out, *args)` in `world` spawned processes that form a gloo group; fail on error or timeout."""
    ctx = mp.start_processes(_worker, args=(world, _free_port(), name, str(out), args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):  # raises if a worker failed (and stops the others)
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{name}: distributed workers still running after {timeout} s")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ----------------------------------------------------------------------------- CLIP: one step, 4 + 2 cases

def _clip_case(kind: str, gather: str, micro: int):
    from mmlm.config import clip_preset
    from mmlm.models.clip import CLIP
    from mmlm.train.clip_task import ClipRunConfig, ClipTask
    from mmlm.train.loop import TrainConfig

    cfg = clip_preset("tiny-vit")
    cfg.logit_bias_init = -5.0 if kind == "siglip" else None
    torch.manual_seed(0)
    model = CLIP(cfg).double()  # float64: what is left of a difference is the maths, not float32 rounding
    run = ClipRunConfig(model=cfg, loss=kind, loss_gather=gather, train=TrainConfig(micro_batch=micro))
    task = ClipTask(run, model, None, None, None)
    g = torch.Generator().manual_seed(1)
    px = torch.randn(8, 3, 32, 32, generator=g, dtype=torch.float64)
    ids = torch.randint(1, 999, (8, 16), generator=g)
    ids[:, 9] = 999
    return task, {"pixel_values": px, "input_ids": ids, "batch_size": 8}


def _step(task, batch) -> tuple[float, dict[str, torch.Tensor]]:
    metrics = task.step(batch, contextlib.nullcontext)
    params = [p for p in task.model.parameters() if p.requires_grad]
    distributed.average_gradients(params)
    grads = {n: p.grad.clone() for n, p in task.model.named_parameters() if p.grad is not None}
    return metrics["loss"], grads


def _clip_steps(rank: int, out: Path) -> None:
    results = {}
    for case in CLIP_CASES:
        task, batch = _clip_case(*case)
        rows = slice(rank * 4, rank * 4 + 4)
        local = {"pixel_values": batch["pixel_values"][rows], "input_ids": batch["input_ids"][rows], "batch_size": 4}
        results["/".join(map(str, case))] = _step(task, local)
    torch.save(results, out / f"clip-rank{rank}.pt")


def test_clip_and_siglip_step_on_two_processes_equals_one_process_on_the_global_batch(tmp_path):
    launch("_clip_steps", tmp_path)
    ranks = [torch.load(tmp_path / f"clip-rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for case in CLIP_CASES:
        task, batch = _clip_case(*case)
        loss, grads = _step(task, batch)
        assert len(grads) == len(list(task.model.parameters()))  # every parameter, logit_scale/bias included
        for r in range(WORLD):
            d_loss, d_grads = ranks[r]["/".join(map(str, case))]
            assert abs(d_loss - loss) <= 1e-6 * max(1.0, abs(loss)), (case, r, d_loss, loss)
            assert _max_diff(d_grads, grads) <= 1e-6, (case, r, _max_diff(d_grads, grads))
            print("max grad diff", case, r, _max_diff(d_grads, grads))
    # the check can fail: half a batch alone is a different objective
    task, batch = _clip_case("clip", "local", 0)
    full = _step(task, batch)[1]
    task, _ = _clip_case("clip", "local", 0)
    half = {"pixel_values": batch["pixel_values"][:4], "input_ids": batch["input_ids"][:4], "batch_size": 4}
    assert _max_diff(_step(task, half)[1], full) > 1e-4
