#!/usr/bin/env python3
"""Scale curves: mmlm's bench-vit CLIP train step vs batch size, tiny-LLaVA prefill vs prompt length.

    python benchmarks/scale_curves.py [--precision bf16] [--batches 64,128,256,512,1024] [--lengths 128,256,512,1000]

Each point is measured in a fresh subprocess (so peak memory, Linux VmHWM, is that point's own): one warm-up
step, then `--steps` timed ones. Prints one JSON line per point: items/s (images or prompt tokens), seconds
per step, peak RSS and its growth over the process's RSS before the first step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def clip_point(batch: int, precision: str, steps: int) -> dict:
    import tempfile

    import torch

    from mmlm.bench_common import peak_mb, rss_mb
    from mmlm.bench_models import clip_batch, clip_pair, train_steps

    with tempfile.TemporaryDirectory() as tmp:
        ours, hf = clip_pair(Path(tmp))
    step, _ = train_steps(ours, hf, precision)
    del hf
    pixels, ids = clip_batch(batch)
    base = rss_mb()
    step(pixels, ids)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(pixels, ids)
    secs = (time.perf_counter() - t0) / steps
    return {"curve": "clip_train_vs_batch", "batch": batch, "precision": precision, "images_per_s": round(batch / secs, 1),
            "s_per_step": round(secs, 3), "peak_rss_mb": round(peak_mb(), 1), "peak_over_start_mb": round(peak_mb() - base, 1),
            "threads": torch.get_num_threads()}


def llava_point(length: int, steps: int) -> dict:
    import tempfile

    import torch

    from mmlm.bench_common import peak_mb, rss_mb
    from mmlm.bench_models import llava_pair, llava_prompts
    from mmlm.generation import generate

    with tempfile.TemporaryDirectory() as tmp:
        ours, hf = llava_pair(Path(tmp))
    del hf
    ids, mask, px = llava_prompts(1, length - 16)
    base = rss_mb()
    generate(ours, ids, mask, pixel_values=px, max_new_tokens=1, eos_token_id=[])
    t0 = time.perf_counter()
    for _ in range(steps):
        generate(ours, ids, mask, pixel_values=px, max_new_tokens=1, eos_token_id=[])
    secs = (time.perf_counter() - t0) / steps
    return {"curve": "llava_prefill_vs_length", "prompt_tokens": length, "tokens_per_s": round(length / secs, 1),
            "s_per_prefill": round(secs, 4), "peak_rss_mb": round(peak_mb(), 1),
            "peak_over_start_mb": round(peak_mb() - base, 1), "threads": torch.get_num_threads()}


def child(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["what"] == "clip":
        print(json.dumps(clip_point(spec["batch"], spec["precision"], spec["steps"])))
    else:
        print(json.dumps(llava_point(spec["length"], spec["steps"])))


def run(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env={"PYTHONPATH": str(SRC), "PYTHONWARNINGS": "ignore", "PATH": "/usr/bin:/bin"})
    if proc.returncode:
        return {**spec, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--batches", default="64,128,256,512,1024")
    p.add_argument("--lengths", default="128,256,512,1000")  # + 1 new token within the 1024 context
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    for b in filter(None, args.batches.split(",")):
        print(json.dumps(run(dict(what="clip", batch=int(b), precision=args.precision, steps=args.steps,
                                  threads=args.threads))), flush=True)
    for n in filter(None, args.lengths.split(",")):
        print(json.dumps(run(dict(what="llava", length=int(n), steps=args.steps, threads=args.threads))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
