"""Scaling out on this machine: training throughput of 1 process x 2 threads vs 2 processes x 1 thread (torchrun,
gloo), and peak tensor memory of the contrastive loss vs global batch size, local vs global gather mode.

    python benchmarks/bench_distributed.py [--quick] [--repeats N] [--skip-throughput] [--skip-memory]

Prints JSON lines. Throughput runs the real `mmlm train clip` (configs/clip-shapes.yaml, bf16, no DataLoader workers)
in subprocesses, alternating the layouts (A, B, C, A, B, C, ...; C = 1 process x 1 thread, for reference); samples/s comes from each run's metrics.jsonl with the
first logging interval (warm-up) dropped; medians, ratios and the machine's load average are reported. Memory is measured in 2 gloo
processes (rank 0 reported): the peak of live tensor bytes (a dispatch-mode counter, exact for tensors, blind to
allocator overhead) during forward + backward of the loss on features of width 512 that each rank already holds.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import weakref
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- throughput

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(out: Path, processes: int, threads: int, steps: int, log_every: int, batch: int) -> list[float]:
    overrides = [f"train.steps={steps}", f"train.log_every={log_every}", f"train.batch_size={batch}",
                 f"train.threads={threads}", "train.num_workers=0", "train.eval_every=0", "train.ckpt_every=0",
                 "train.progress=false", "data.train_size=8192", "data.eval_size=16"]
    mmlm = ["-m", "mmlm", "train", "clip", "--config", str(ROOT / "configs" / "clip-shapes.yaml"), "--out", str(out)]
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", f"--nproc-per-node={processes}",
                                          f"--master-port={_free_port()}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, *launcher, *mmlm, *overrides], check=True, env=env, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["samples_per_s"] for r in records if "samples_per_s" in r][1:]  # the first interval is warm-up


def throughput(repeats: int, steps: int, log_every: int, batch: int) -> None:
    layouts = {"1proc_x_2threads": (1, 2), "2proc_x_1thread": (2, 1), "1proc_x_1thread": (1, 1)}
    rates: dict[str, list[float]] = {k: [] for k in layouts}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(repeats):
            for name, (procs, threads) in layouts.items():
                r = _train(Path(tmp) / f"{name}-{rep}", procs, threads, steps, log_every, batch)
                rates[name].append(statistics.median(r))
                print(json.dumps({"bench": "throughput", "layout": name, "repeat": rep, "global_batch": batch,
                                  "samples_per_s": [round(x, 1) for x in r]}), flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(json.dumps({"bench": "throughput_summary", "model": "configs/clip-shapes.yaml (bf16)", "global_batch": batch,
                      **{f"{k}_median_samples_per_s": round(v, 1) for k, v in med.items()},
                      "ratio_2proc_over_1proc_2threads": round(med["2proc_x_1thread"] / med["1proc_x_2threads"], 3),
                      "ratio_2proc_over_1proc_1thread": round(med["2proc_x_1thread"] / med["1proc_x_1thread"], 3),
                      "load_average_1min": round(os.getloadavg()[0], 1)}), flush=True)


# ----------------------------------------------------------------------------- memory

class PeakTensorMemory(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the bytes of every storage an op creates until it is freed; keeps the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, n = storage.data_ptr(), storage.nbytes()
                if n and key not in self.seen:
                    self.seen.add(key)
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, n)
        return out

    def _free(self, key: int, n: int) -> None:
        self.live -= n
        self.seen.discard(key)


def _memory_worker(rank: int, world: int, port: int, sizes: list[int], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from mmlm import distributed
    from mmlm.train.objectives import contrastive_loss

    distributed.setup(timeout_s=300)
    rows = []
    for kind in ("clip", "siglip"):
        for n in sizes:
            for mode in ("local", "global"):
                g = torch.Generator().manual_seed(rank)
                img = torch.randn(n // world, 512, generator=g, requires_grad=True)
                txt = torch.randn(n // world, 512, generator=g, requires_grad=True)
                scale, bias = torch.tensor(2.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
                with PeakTensorMemory() as mem:
                    contrastive_loss(kind, img, txt, scale, bias, gather=mode).backward()
                rows.append({"loss": kind, "global_batch": n, "mode": mode, "peak_mib": round(mem.peak / 2**20, 3)})
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    distributed.shutdown()


def memory(sizes: list[int]) -> None:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "memory.json")
        mp.start_processes(_memory_worker, args=(2, _free_port(), sizes, out), nprocs=2, start_method="spawn")
        rows = json.loads(Path(out).read_text())
    for r in rows:
        print(json.dumps({"bench": "contrastive_loss_peak_memory", "world_size": 2, "per_rank": True, **r}), flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps (about half the time)")
    p.add_argument("--repeats", type=int, default=2, help="A/B pairs for throughput")
    p.add_argument("--batch", type=int, default=128, help="global batch for throughput")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    args = p.parse_args(argv)
    if not args.skip_memory:
        memory([64, 128, 256, 512, 1024])
    if not args.skip_throughput:
        steps, log_every = (12, 4) if args.quick else (30, 10)
        throughput(args.repeats, steps, log_every, args.batch)


if __name__ == "__main__":
    main()
