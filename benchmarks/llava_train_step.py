"""Time one LLaVA training step (forward + backward, the recipe's precision) on real batches of a recipe.

    python benchmarks/llava_train_step.py --recipe configs/llava-smollm2.yaml --init-from runs/smol-s1/final

Builds the stage-2 model from `--init-from` (a stage-1 run's `final`), collates `--batches` batches of the
recipe's training data, runs 2 warm-up steps and times the rest (no optimizer step: the step's own cost).
Prints one JSON line. To compare two commits, run it in each (e.g. a `git worktree` of the other commit on
PYTHONPATH) in alternation; the machine's speed drifts, so compare only runs taken side by side.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="configs/llava-smollm2.yaml")
    ap.add_argument("--init-from", required=True, help="a stage-1 run's final directory")
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.batches < 3:
        ap.error("--batches must be at least 3 (2 warm-up steps, then the timed ones)")
    if args.threads:
        torch.set_num_threads(args.threads)

    from mmlm.train import llava_run
    from mmlm.train.recipes import load_recipe
    from mmlm.train.loop import autocast_context

    cfg = load_recipe("llava", args.recipe, ["stage=2", f"init_from={args.init_from}", "data.eval_size=0"])
    with tempfile.TemporaryDirectory() as tmp:
        task = llava_run.build_task(cfg, Path(tmp))  # as `mmlm train llava` builds it
    model, data = task.model, task.data
    bs = cfg.train.batch_size
    batches = [task.collate([data[i] for i in range(b * bs, (b + 1) * bs)]) for b in range(args.batches)]
    autocast = autocast_context(cfg.train.precision)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(batch):
        task.step(batch, autocast)
        for p in params:
            p.grad = None

    for b in batches[:2]:
        step(b)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = time.perf_counter()
    for b in batches[2:]:
        step(b)
    n = len(batches) - 2
    print(json.dumps({"recipe": args.recipe, "batch_size": bs, "tokens_per_batch": list(batches[2]["input_ids"].shape),
                      "s_per_step": round((time.perf_counter() - t) / n, 3), "threads": torch.get_num_threads(),
                      "page_faults_per_step": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) // n}))


if __name__ == "__main__":
    main()
