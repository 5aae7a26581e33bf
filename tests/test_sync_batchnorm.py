"""BatchNorm under torchrun: W ranks normalise by the global batch's statistics (distributed.SyncBatchNorm) and keep
the running statistics one process would, so a ResNet-tower CLIP trains as on one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from mmlm import distributed

pytestmark = pytest.mark.slow  # every test starts two processes
ROWS = (3, 5)  # rows per rank: unequal, as when a rank lost unreadable samples


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _case():
    """A BatchNorm2d with affine weights and a few running updates behind it, a global batch and a loss weighting."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sum(ROWS), 4, 5, 3, generator=g, dtype=torch.float64) * 3 + 1
    r = torch.randn(sum(ROWS), 4, 5, 3, generator=g, dtype=torch.float64)
    return bn, x, r


def _two_steps(bn: nn.Module, x: torch.Tensor, r: torch.Tensor) -> dict[str, torch.Tensor]:
    """Two forwards (running statistics move twice) and a backward of sum(y * r) through the second."""
    x = x.clone().requires_grad_()
    bn(x * 0.5)
    y = bn(x)
    (y * r).sum().backward()
    return {"y": y.detach(), "x.grad": x.grad, "weight.grad": bn.weight.grad, "bias.grad": bn.bias.grad,
            **{k: v.clone() for k, v in bn.state_dict().items()}}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    distributed.setup(timeout_s=60)
    try:
        bn, x, r = _case()
        assert distributed.sync_batch_norm(bn) == 0  # a bare BatchNorm2d has no parent to be replaced in
        model = nn.Sequential(bn)
        assert distributed.sync_batch_norm(model) == 1 and type(model[0]) is distributed.SyncBatchNorm
        rows = slice(sum(ROWS[:rank]), sum(ROWS[:rank + 1]))
        torch.save(_two_steps(model[0], x[rows], r[rows]), Path(out) / f"rank{rank}.pt")
    finally:
        distributed.shutdown()


def test_sync_batch_norm_on_two_processes_equals_batch_norm_on_the_global_batch(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")  # joins; raises if a rank failed
    bn, x, r = _case()
    want = _two_steps(bn, x, r)
    got = [torch.load(tmp_path / f"rank{k}.pt", weights_only=True) for k in range(2)]
    for rank, g in enumerate(got):
        rows = slice(sum(ROWS[:rank]), sum(ROWS[:rank + 1]))
        torch.testing.assert_close(g["y"], want["y"][rows], rtol=0, atol=1e-12)
        torch.testing.assert_close(g["x.grad"], want["x.grad"][rows], rtol=0, atol=1e-12)
        for k in ("running_mean", "running_var", "num_batches_tracked"):  # the same on every rank as in one process
            torch.testing.assert_close(g[k], want[k], rtol=0, atol=1e-12)
    for k in ("weight.grad", "bias.grad"):  # each rank's share: together the whole batch's gradient
        torch.testing.assert_close(got[0][k] + got[1][k], want[k], rtol=0, atol=1e-12)
    # the check can fail: a plain BatchNorm on rank 0's rows alone keeps other running statistics
    bn, x, r = _case()
    alone = _two_steps(bn, x[:ROWS[0]], r[:ROWS[0]])
    assert (alone["running_mean"] - want["running_mean"]).abs().max() > 1e-2


# ----------------------------------------------------------------------------- the shapes recipe under torchrun

def _train(out: Path, recipe: str, processes: int, *extra: str) -> dict[str, torch.Tensor]:
    """`mmlm train clip` of a packaged recipe for 3 fp32 steps of a global batch of 16, as a user runs it.

    At a small learning rate: AdamW moves a weight whose gradient is ~0 by about +-lr on rounding noise alone (its
    first steps are nearly sign(g) * lr), so at the recipe's lr=1e-3 two single-process runs that differ only in
    their thread count (summation order) already end 3.7e-3 apart; at 1e-5 that floor is far below 1e-4.
    """
    args = ["-m", "mmlm", "train", "clip", "--config", str(_recipe(recipe)), "--out", str(out), "train.lr=1e-5", "train.device=cpu",
            "train.steps=3", "train.batch_size=16", "train.precision=fp32", "train.num_workers=0", "train.threads=1",
            "train.warmup_steps=1", "train.eval_every=0", "train.ckpt_every=0", "train.progress=false",
            "data.train_size=64", "data.eval_size=8", *extra]
    launcher = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-port",
         str(_free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launcher + args, env=env, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, f"exit status {done.returncode}; stderr ends:\n{done.stderr[-3000:]}"
    from mmlm.checkpoint import read_state_dict

    return read_state_dict(out / "final" / "model.safetensors")


def _recipe(name: str) -> Path:
    from mmlm.assets import recipe_path

    return recipe_path(name)


@pytest.mark.parametrize("recipe, tol, sharded", [("clip-shapes", 1e-4, False), ("clip-shapes-vit", 1e-6, False),
                                                   ("clip-shapes", 1e-4, True), ("clip-shapes-vit", 1e-6, True),
                                                   pytest.param("clip-audio", 1e-6, True, marks=pytest.mark.slow),
                                                   pytest.param("clip-video-shapes", 1e-6, True, marks=pytest.mark.slow)])
def test_a_shapes_recipe_on_two_processes_ends_where_one_process_does(tmp_path, recipe, tol, sharded):
    """ResNet tower: weights and BatchNorm buffers within 1e-4 of one process (fp32 rounding through BatchNorm);
    ViT tower (no batch statistics): as exact as before (measured: ResNet 2.7e-5 weights, 5.8e-6 buffers; ViT 1.5e-8).
    The same with the CLIP sharded by FSDP2 (`train.fsdp=true`; its final weights consolidated from the shards),
    and with an audio CLIP and a video CLIP sharded (the spectrogram transformer's blocks, the frame tower's blocks
    and the temporal fusion are units)."""
    data = [f"data.path={tmp_path / 'media'}"] if recipe in ("clip-audio", "clip-video-shapes") else []
    two = _train(tmp_path / "two", recipe, 2, *data, *(["train.fsdp=true"] if sharded else []))
    one = _train(tmp_path / "one", recipe, 1, *data)
    assert two.keys() == one.keys()
    buffers = [k for k in one if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert bool(buffers) == (recipe == "clip-shapes")
    diff = {k: (two[k].double() - one[k].double()).abs().max().item() for k in one}
    assert max(diff.values()) <= tol, sorted(diff.items(), key=lambda kv: -kv[1])[:5]
    if buffers:
        assert all(torch.equal(two[k], one[k]) for k in buffers if k.endswith("num_batches_tracked"))
