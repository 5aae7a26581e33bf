"""A frozen CLIP ResNet tower reading a batch (a LLaVA's images, a video's frames), without gradients: mmlm's fast
path (each eval BatchNorm folded into its convolution, channels-last activations) against its plain formula
(`mmlm.reference_mode()`: convolution then BatchNorm, NCHW, as OpenAI CLIP and open_clip compute it), A/B
alternated in one process, float32 and under bf16 autocast; the outputs are compared too.

    .venv/bin/python benchmarks/bench_resnet_tower.py [--model runs/clip-shapes/final] [--batch 128]
        [--threads 2] [--repeats 7]

Without --model the tower is configs/clip-shapes.yaml's at random weights (the speed does not depend on them).
Reads stages 1-3 (LLaVA's and the video towers' layer: the stage-3 map). Prints one JSON line per precision.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics

import torch

import mmlm
from mmlm.bench_common import time_ab
from mmlm.models.clip import CLIP
from mmlm.train.recipes import load_recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a CLIP run's model directory with a ResNet image tower")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    clip = mmlm.load(args.model) if args.model else CLIP(load_recipe("clip", "configs/clip-shapes.yaml").model)
    tower = clip.visual.eval()
    if not hasattr(tower, "forward_stages"):
        raise SystemExit(f"{args.model}: the image tower is a {type(tower).__name__}, not a ResNet")
    size = tower.cfg.image_size
    x = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    for precision in ("fp32", "bf16"):
        amp = torch.autocast("cpu", torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        outs = {}

        def run(name: str) -> None:
            with mmlm.reference_mode(name == "reference"):
                outs[name] = tower.forward_stages(x, upto=3)[-1]

        with torch.no_grad(), amp:
            times = time_ab({name: lambda name=name: run(name) for name in ("fast", "reference")}, args.repeats)
        med = {k: statistics.median(v) for k, v in times.items()}
        spread = {k: (max(v) - min(v)) / statistics.median(v) for k, v in times.items()}
        scale = outs["reference"].float().abs().max().item()
        print(json.dumps({
            "precision": precision, "batch": args.batch, "image_size": size, "threads": args.threads,
            "fast_images_per_s": round(args.batch / med["fast"], 1),
            "reference_images_per_s": round(args.batch / med["reference"], 1),
            "ratio": round(med["reference"] / med["fast"], 3),
            "spread": {k: round(v, 3) for k, v in spread.items()},
            "max_abs_diff_over_max": (outs["fast"].float() - outs["reference"].float()).abs().max().item() / scale,
        }))


if __name__ == "__main__":
    main()
