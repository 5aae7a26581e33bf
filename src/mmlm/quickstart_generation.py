"""The generation half of `mmlm quickstart --generation`: a text-to-image UNet conditioned on the quickstart CLIP's
text tower, judged by that same CLIP.

1. trains `configs/diffusion-shapes.yaml` (pixel space, 32 px) with the CLIP's text tower frozen (`text_from`);
2. generates for held-out prompts (seen and novel colour-shape pairs, one to three objects) and lets the CLIP read
   colour, shape, position and count zero-shot, beside its reading of the rendered scenes (`eval/generation.py`);
3. writes report.md with the loss curve and a grid of prompts and images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DIFFUSION_RECIPE = "diffusion-shapes.yaml"


def quickstart_generation(out: Path, clip: Path, overrides: list[str] | None = None, steps: int | None = None,
                          per_group: int = 16, sample_steps: int = 50) -> dict[str, Any]:
    """Train and judge the quickstart's text-to-image model under `out / "diffusion"` on the CLIP in `clip`;
    `steps` replaces the recipe's training steps; `overrides` apply to the run (e.g. train.progress=false)."""
    from .assets import recipe_path
    from .eval.generation import ATTRIBUTES, eval_generation
    from .report import plot_training, write_report
    from .train.diffusion_task import train_diffusion
    from .train.recipes import load_recipe

    extra = list(overrides or []) + [f"text_from={clip}"]
    if steps is not None:
        extra += [f"train.steps={steps}", f"train.warmup_steps={max(1, min(100, steps // 10))}",
                  f"train.ckpt_every={max(1, steps // 4)}"]
    cfg = load_recipe("diffusion", recipe_path(DIFFUSION_RECIPE), extra)
    run = out / "diffusion"
    print(f"[generation 1/2] training a text-to-image UNet on shapes: {cfg.train.steps} steps, conditioned on the "
          f"text tower of {clip} (frozen)")
    summary = train_diffusion(cfg, run)

    print("[generation 2/2] generating for held-out prompts, judged by the CLIP, and writing the report")
    # guidance 1.5: the shapes model's colour and position follow the prompt there; at 3 and above they do not
    # (docs/results.md#text-to-image-on-shapes)
    result = eval_generation(run / "final", clip, per_group=per_group, steps=sample_steps, guidance=1.5, out=run)
    one = {split: result["groups"][f"{split}-1"] for split in ("val", "novel")}
    table = {"judged_all_prompts": {name: result["attributes"][name] for name in ATTRIBUTES},
             "judged_on_rendered_scenes": {name: result["real_attributes"][name] for name in ATTRIBUTES},
             "one_object_seen_pairs": {name: one["val"][name] for name in ATTRIBUTES if name != "count"},
             "one_object_novel_pairs": {name: one["novel"][name] for name in ATTRIBUTES if name != "count"},
             "frechet": {"generated_vs_rendered": result["frechet"], "rendered_vs_rendered": result["frechet_real_floor"]}}
    (out / "generation-eval.json").write_text(json.dumps(table, indent=1))
    figures = [(f, f) for f in plot_training(run, run)]
    figures.append(("Held-out prompts and the generated images", Path(result["grid"]).name))
    report = write_report(run, "mmlm quickstart: text-to-image on shapes", {"eval": table}, figures,
                          notes=[f"{summary['step']} steps of `{DIFFUSION_RECIPE}`, conditioned on the frozen text "
                                 f"tower of `{clip}`; model in `final/` (sampling uses the weights' moving average). "
                                 f"Each share: generated images whose colour / shape / position / count the CLIP reads "
                                 f"as the prompt's ({sample_steps} DDIM steps, guidance {result['guidance']}); "
                                 "'judged_on_rendered_scenes' is the same CLIP on the rendered scenes of the same "
                                 "prompts, the most a generator could score with this judge."])
    return {"report": str(report), "model": str(run / "final"), **table}
