"""The LLaVA half of `mmlm quickstart`: the quickstart's CLIP image tower, LLaVA stage 1 and stage 2 on the
shapes conversations, VQA on seen and held-out colour-shape pairs, and a figure of answered questions.

1. stage 1 (`configs/llava-shapes.yaml`): projector (and the from-scratch LM) on image -> caption, reading the
   CLIP's ResNet feature map (frozen) as image tokens;
2. stage 2 (the recipe's `stage2:` block): projector + LM on VQA conversations;
3. exact-match VQA per question type on val (seen pairs) and novel (held-out pairs), and report.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LLAVA_RECIPE = "llava-shapes.yaml"


def _steps(overrides: list[str], steps: int | None, eval_every: int | None = None) -> list[str]:
    extra = list(overrides)
    if steps is not None:
        extra += [f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 30)}",
                  f"train.ckpt_every={max(1, steps // 4)}"]
        if eval_every is not None:
            extra.append(f"train.eval_every={eval_every}")
    return extra


def quickstart_llava(out: Path, tower: Path, overrides: list[str] | None = None,
                     steps: tuple[int, int] | None = None, eval_size: int = 500) -> dict[str, Any]:
    """Train and evaluate the quickstart's tiny LLaVA under `out` on the CLIP in `tower`; `steps` = (stage 1,
    stage 2) steps (default: the recipe's own). `overrides` apply to both runs (e.g. train.progress=false)."""
    from .eval.cli import eval_vqa
    from .assets import recipe_path
    from .report import plot_training, write_report
    from .train.llava_run import train_llava
    from .train.recipes import load_recipe

    overrides = list(overrides or [])
    s1_steps, s2_steps = steps or (None, None)
    print(f"[LLaVA 1/3] stage 1: feature alignment on captions (vision tower: {tower}, frozen)")
    s1 = load_recipe("llava", recipe_path(LLAVA_RECIPE), _steps(overrides, s1_steps) + [f"vision_from={tower}"])
    train_llava(s1, out / "llava-s1")

    print("[LLaVA 2/3] stage 2: visual instruction tuning on VQA conversations")
    s2 = load_recipe("llava", recipe_path(LLAVA_RECIPE), ["stage=2", f"init_from={out / 'llava-s1' / 'final'}"]
                     + _steps(overrides, s2_steps, eval_every=s2_steps) + ["data.eval_size=0"])
    train_llava(s2, out / "llava-s2")
    final = out / "llava-s2" / "final"

    print("[LLaVA 3/3] evaluating VQA and writing the report")
    val = eval_vqa(final, "shapes", limit=eval_size)
    novel = eval_vqa(final, "shapes-novel", limit=eval_size)
    (out / "llava-eval.json").write_text(json.dumps({"vqa_val": val, "vqa_novel": novel}, indent=1))
    run = out / "llava-s2"
    figures = [(f, f) for f in plot_training(run, run)]
    answers_figure(final, run / "answers.png")
    figures.append(("Answered questions (val: seen colour-shape pairs)", "answers.png"))
    table = {"vqa_val": {"accuracy": val["accuracy"], **{k: v["accuracy"] for k, v in val["per_type"].items()}},
             "vqa_novel": {"accuracy": novel["accuracy"], **{k: v["accuracy"] for k, v in novel["per_type"].items()}}}
    report = write_report(run, "mmlm quickstart: LLaVA on shapes", {"eval": table}, figures,
                          notes=[f"Vision tower: the CLIP image tower of `{tower}` (frozen). Stage 1 "
                                 f"(`{out / 'llava-s1'}`) trained the projector and the from-scratch LM on captions; "
                                 "stage 2 trained both on VQA conversations. Exact-match accuracy, greedy decoding, "
                                 "one question per image; 'novel' images hold a colour-shape pair never seen in "
                                 "training."])
    return {"report": str(report), "model": str(final), **table}


def answers_figure(model_dir: Path, path: Path, n: int = 8) -> None:
    """A grid of val images, each with a question, the model's answer and the reference."""
    from .eval.cli import open_model
    from .eval.vqa import evaluate_vqa
    from .report import pyplot
    from .data.sources import ShapesConversations

    model, tok, processor = open_model(model_dir)
    ds = ShapesConversations("val", n, 11, model.config.vision.image_size, 1)
    items = [ds[i] for i in range(n)]
    result = evaluate_vqa(model, tok, processor, items, model.config.template, max_new_tokens=48)
    plt = pyplot()
    fig, axes = plt.subplots(2, (n + 1) // 2, figsize=(3.2 * ((n + 1) // 2), 7.4))
    for ax, item, ex in zip(axes.flat, items, result["examples"]):
        ax.imshow(item["images"][0])
        ax.axis("off")
        ok = ex["answer"] == ex["reference"].strip()
        question = ex["question"].replace("<image>\n", "")
        ax.set_title(f"Q: {question}\nA: {ex['answer']}" + ("" if ok else f"\n(ref: {ex['reference']})"),
                     fontsize=7, color="black" if ok else "red", wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
