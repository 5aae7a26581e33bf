#!/usr/bin/env python3
"""Image/text embedding with each library alone in its own process: mmlm vs transformers on bench-vit.

`mmlm bench clip` alternates the two libraries inside one process (a like-for-like A/B), so they share one
allocator: each library's freed blocks are the other's next allocations, and how often a fresh buffer has to
be page-faulted in depends on who ran before. Here every measurement is a fresh process holding one library,
as a user runs it, the processes alternated (A B, B A, ...) to cancel the machine's drift:

    python benchmarks/clip_embed_alone.py [--threads 1] [--runs 3] [--what image text] [--precision fp32 bf16]

Prints one JSON line per run and a ratio line (medians) per (what, precision).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def measure(lib: str, what: str, precision: str, threads: int, calls: int = 8, repeats: int = 5) -> float:
    """Items per second of one library, in this process: the median of `repeats` timings of `calls` batches."""
    import torch

    from mmlm.bench_models import clip_batch, clip_pair, precision_context

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        ours, hf = clip_pair(Path(tmp))
    pixels, ids = clip_batch(64, image_size=ours.config.vision.image_size)
    if lib == "mmlm":
        del hf
        fn = (lambda: ours.encode_image(pixels)) if what == "image" else (lambda: ours.encode_text(ids))
    else:
        del ours
        fn = ((lambda: hf.get_image_features(pixel_values=pixels)) if what == "image"
              else (lambda: hf.get_text_features(input_ids=ids)))
    rates = []
    with torch.inference_mode(), precision_context(precision):
        for _ in range(3):
            fn()
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            rates.append(64 * calls / (time.perf_counter() - t0))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=3, help="processes per library and setting")
    p.add_argument("--what", nargs="+", default=["image", "text"], choices=["image", "text"])
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--one", nargs=3, metavar=("LIB", "WHAT", "PRECISION"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(measure(*args.one, threads=args.threads))
        return 0
    for what in args.what:
        for precision in args.precision:
            rates: dict[str, list[float]] = {"mmlm": [], "transformers": []}
            for run in range(args.runs):
                for lib in ("mmlm", "transformers") if run % 2 == 0 else ("transformers", "mmlm"):
                    out = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--one", lib, what,
                                          precision], capture_output=True, text=True, check=True)
                    rate = float(out.stdout.strip().splitlines()[-1])
                    rates[lib].append(rate)
                    print(json.dumps({"bench": f"{what}_embed_alone", "precision": precision, "library": lib,
                                      "run": run, "per_s": round(rate, 1)}), flush=True)
            med = {lib: statistics.median(r) for lib, r in rates.items()}
            print(json.dumps({"bench": f"{what}_embed_alone", "precision": precision, "library": "mmlm/transformers",
                              "mmlm_per_s": round(med["mmlm"], 1), "transformers_per_s": round(med["transformers"], 1),
                              "ratio": round(med["mmlm"] / med["transformers"], 2), "threads": args.threads}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
