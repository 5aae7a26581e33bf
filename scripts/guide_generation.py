"""The generation chapter's figures and tables (docs/05-generation.md), from a trained text-to-image run.

    python scripts/guide_generation.py --run runs/diffusion-shapes --judge runs/clip-shapes/final --out docs/figures

1. the training curve: the noise-prediction loss per step (and its moving average)   -> generation_loss.png
2. `mmlm eval generation`: held-out prompts generated and judged by the CLIP, per group and attribute, each
   beside the judge's score on the rendered scenes (its ceiling); the Frechet distance beside its floor
                                                                                      -> generation.md
3. a grid of prompts and their images                                                 -> generation_grid.png
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from mmlm.eval.generation import ATTRIBUTES, eval_generation
from mmlm.report import pyplot, read_metrics


def plot_loss(run: Path, out: Path) -> Path:
    train, _ = read_metrics(run)
    pts = [(r["step"], r["loss"]) for r in train if "loss" in r and r["loss"] == r["loss"]]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    if pts:
        steps, losses = zip(*pts)
        ax.plot(steps, losses, lw=0.6, alpha=0.4, label="logged steps")
        k = max(1, len(losses) // 20)
        avg = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
        ax.plot(steps, avg, label=f"moving average of {k}")
        ax.legend()
    ax.set(xlabel="training step", ylabel="MSE of the predicted noise", title="diffusion training on shapes")
    fig.tight_layout()
    path = out / "generation_loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(result: dict) -> str:
    names = list(ATTRIBUTES)
    lines = ["| prompts | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for group, scores in result["groups"].items():
        split, n = group.split("-")
        label = f"{'seen' if split == 'val' else 'novel'} pairs, {n} object{'s' if n != '1' else ''}"
        cells = [f"{scores[a]:.0%} ({scores['real'][a]:.0%})" for a in names]
        lines.append(f"| {label} ({scores['prompts']}) | " + " | ".join(cells) + " |")
    cells = [f"**{result['attributes'][a]:.0%}** ({result['real_attributes'][a]:.0%})" for a in names]
    lines.append("| all | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the run directory of `mmlm train diffusion`")
    ap.add_argument("--judge", required=True, help="a CLIP trained on shapes (e.g. runs/clip-shapes/final)")
    ap.add_argument("--out", default="docs/figures")
    ap.add_argument("--per-group", type=int, default=16, help="prompts per (split, object count) group")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    ap.add_argument("--quick", action="store_true", help="2 prompts per group, 2 steps (a smoke run)")
    args = ap.parse_args()
    run, out = Path(args.run), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    per_group, steps = (2, 2) if args.quick else (args.per_group, args.steps)
    plot_loss(run, out)
    with tempfile.TemporaryDirectory() as tmp:
        result = eval_generation(run / "final", args.judge, per_group=per_group, steps=steps, guidance=args.guidance,
                                 out=tmp)
        shutil.copy(Path(tmp) / "generation_grid.png", out / "generation_grid.png")
    result.pop("grid")
    text = (f"Judged by `{args.judge}`: the share of generated images whose attribute the judge reads as the "
            f"prompt's ({steps} DDIM steps, guidance {result['guidance']}, seed {result['seed']}); in brackets the "
            f"same judge on the rendered scenes of the same prompts.\n\n{table(result)}\n\n"
            f"Frechet distance of the judge's image features, generated vs rendered: **{result['frechet']:.2f}**; "
            f"rendered vs rendered images of other scenes (the floor for {result['images']} images): "
            f"{result['frechet_real_floor']:.2f}.\n")
    (out / "generation.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
