"""`mmlm quickstart`: the main job, on embedded data, offline, on a CPU.

1. writes a small shapes dataset to disk (the same generator trains on the fly);
2. trains a small CLIP on shapes with the `configs/clip-shapes.yaml` recipe, scaled to the time budget;
3. evaluates zero-shot (seen and held-out colour-shape pairs) and retrieval;
4. writes plots and report.md into the run directory, and prints where it is;
5. then trains and evaluates a tiny LLaVA on the shapes conversations with that CLIP's image tower
   (`quickstart_llava.py`);
6. with `--generation`, trains a text-to-image UNet on that CLIP's text tower and has the CLIP judge its images
   (`quickstart_generation.py`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .assets import recipe_path

RECIPE = "clip-shapes.yaml"


def _measure_step_time(cfg, steps: int = 12, skip: int = 4) -> float:
    """Seconds per optimizer step for this recipe on this machine, data loading included: a few real
    steps of a throwaway model fed by the same DataLoader set-up as training."""
    from .data.transforms import PreprocessConfig
    from .models.clip import CLIP
    from .tokenizer import Tokenizer
    from .train.clip_run import caption_corpus, fit_text_to_tokenizer, train_data
    from .train.clip_task import ClipTask
    from .devices import resolve, to_device
    from .train.loop import autocast_context, make_loader

    device = resolve(cfg.train.device, "train.device")  # timed where the run will train
    preprocess = PreprocessConfig(image_size=cfg.model.vision.image_size)
    data = train_data(cfg, preprocess)
    tok = Tokenizer.train_bpe(caption_corpus(cfg, data, limit=2000), vocab_size=cfg.tokenizer.vocab_size,
                              context_length=cfg.model.text.context_length)
    fit_text_to_tokenizer(cfg, tok)
    task = ClipTask(cfg, CLIP(cfg.model).to(device), tok, data, preprocess)
    opt = torch.optim.AdamW(task.model.parameters(), lr=1e-5)
    loader = make_loader(data, task.collate, cfg.train.batch_size, 12345, 0, cfg.train.num_workers)
    autocast = autocast_context(cfg.train.precision, device)
    start = 0.0
    for i, batch in enumerate(loader):
        if i == skip:
            start = time.perf_counter()
        if i == steps:
            break
        task.step(to_device(batch, device), autocast)  # its loss.item() waits for the GPU
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / (steps - skip)


def quickstart(out: str | Path = "runs/quickstart", minutes: float | None = None, steps: int | None = None,
               overrides: list[str] | None = None, eval_size: int = 1000, llava: bool = True,
               llava_steps: tuple[int, int] | None = None, generation: bool = False,
               generation_steps: int | None = None, generation_prompts: int = 16) -> dict[str, Any]:
    """CLIP on shapes (the recipe's steps, or `steps`, or about `minutes` of training on this machine), then
    (with `llava`) the tiny LLaVA of
    `quickstart_llava` on that CLIP's image tower, with its recipe's step counts (or `llava_steps`: stage 1,
    stage 2), then (with `generation`) the text-to-image model of `quickstart_generation` on that CLIP's text tower,
    judged by the CLIP (`generation_steps` training steps, default the recipe's; `generation_prompts` per group)."""
    from .data.shapes import write_shapes
    from .report import plot_confusion, plot_training, write_report
    from .train.clip_run import train_clip
    from .train.recipes import load_recipe

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[1/4] writing a shapes sample to {out / 'data'}")
    write_shapes(out / "data", train=256, val=256, novel=256, seed=0, image_size=64)

    cfg = load_recipe("clip", recipe_path(RECIPE), overrides)
    if steps is None and minutes is None:  # the recipe's own length: the LLaVA after it needs a well-trained tower
        steps = cfg.train.steps
        print(f"[2/4] training a CLIP on shapes: {steps} steps (the recipe's)")
    elif steps is None:
        per_step = _measure_step_time(load_recipe("clip", recipe_path(RECIPE), overrides))
        # The loop also evaluates and checkpoints a few times; leave ~10% of the budget for that.
        steps = max(20, int(minutes * 60 * 0.9 / per_step))
        print(f"[2/4] training a CLIP on shapes: {per_step * 1000:.0f} ms/step here -> {steps} steps (~{minutes:g} min)")
    cfg.train.steps = steps
    cfg.train.warmup_steps = min(cfg.train.warmup_steps, steps // 10)
    cfg.train.eval_every = max(1, steps // 4)
    cfg.train.ckpt_every = max(1, steps // 4)
    run = out / "run"
    summary = train_clip(cfg, run)

    print("[3/4] evaluating the trained model")
    from .eval.cli import eval_retrieval, eval_zeroshot

    final = run / "final"
    seen = eval_zeroshot(final, "shapes", limit=eval_size)
    novel = eval_zeroshot(final, "shapes-novel", limit=eval_size)
    retrieval = eval_retrieval(final, "shapes", limit=eval_size)
    (out / "eval.json").write_text(json.dumps({"zeroshot_seen": seen, "zeroshot_novel": novel, "retrieval": retrieval}))

    print("[4/4] writing the report")
    figures = [(f, f) for f in plot_training(run, run)]
    from .data.shapes import CLASS_NAMES
    plot_confusion(seen["confusion"], CLASS_NAMES, run / "confusion_seen.png", "zero-shot, seen pairs")
    figures.append(("Zero-shot confusion matrix (seen pairs)", "confusion_seen.png"))
    _similarity_figure(final, run / "similarity.png")
    figures.append(("Image-text cosine similarities of a batch", "similarity.png"))
    table = {"eval": {"zeroshot_seen": {"top1": seen["top1"], "top5": seen["top5"]},
                      "zeroshot_novel": {"top1": novel["top1"], "top5": novel["top5"]},
                      "retrieval": {k: v for k, v in retrieval.items() if "@" in k}}}
    report = write_report(run, "mmlm quickstart: CLIP on shapes", table, figures,
                          notes=[f"{summary['step']} steps of `{RECIPE}`; model in `final/`. "
                                 "Zero-shot is 64-way (8 colours x 8 shapes) on single-object images; "
                                 "'novel' pairs never appeared in training."])
    result = {"report": str(report), "model": str(final), **table["eval"]}
    if llava:
        from .quickstart_llava import quickstart_llava

        result["llava"] = quickstart_llava(out, final, overrides=[o for o in overrides or [] if o.startswith("train.")],
                                           steps=llava_steps, eval_size=min(eval_size, 500))
    if generation:
        from .quickstart_generation import quickstart_generation

        result["generation"] = quickstart_generation(
            out, final, overrides=[o for o in overrides or [] if o.startswith("train.")], steps=generation_steps,
            per_group=generation_prompts)
    print(json.dumps(result, indent=2))
    return result


def _similarity_figure(model_dir: Path, path: Path, n: int = 8) -> None:
    import mmlm
    from .data.shapes import ShapesDataset
    from .report import plot_similarity
    from .data.transforms import ImageProcessor

    model, tok = mmlm.load(model_dir), mmlm.load_tokenizer(model_dir)
    ds = ShapesDataset("val", n, 7, model.config.vision.image_size, single=True, n_questions=0)
    items = [ds[i] for i in range(n)]
    images = np.stack([x["image"] for x in items])
    with torch.no_grad():
        px = ImageProcessor().normalize(torch.from_numpy(images), channels_last=True)
        out = model(px, tok([x["caption"] for x in items], context_length=model.config.text.context_length))
    sims = (out.text_embeds @ out.image_embeds.t()).numpy()
    plot_similarity(images, [x["caption"] for x in items], sims, path)
