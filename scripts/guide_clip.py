"""The CLIP chapter's figures and tables (docs/02-clip.md), from a trained shapes CLIP.

    python scripts/guide_clip.py --model runs/clip-shapes/final --out docs/figures

1. similarity matrix and contrastive loss of a real batch        -> clip_similarity.png, clip.md
2. temperature: the learned 1/T over training, loss vs 1/T        -> clip_temperature.png, clip.md
3. in-batch accuracy vs batch size (chance is 1/B)                -> clip.md
4. zero-shot: each prompt template alone vs their ensemble        -> clip.md
5. retrieval: the top images for a few text queries               -> clip_retrieval.png
6. (--batch-sizes) batch size under a fixed image budget, trained with feature caching -> clip_batch_size.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import mmlm
from mmlm.data.shapes import CLASS_NAMES, TEMPLATES, ShapesDataset
from mmlm.data.transforms import ImageProcessor
from mmlm.eval.zeroshot import classification_metrics, image_embeddings, text_classifier
from mmlm.report import pyplot, plot_similarity, read_metrics
from mmlm.train.objectives import clip_loss

EXTRA_TEMPLATES = ("an image of the {}.", "the {} on a dark background.", "{}")


def _images(split: str, n: int, seed: int, size: int, single: bool) -> list[dict[str, Any]]:
    ds = ShapesDataset(split, n, seed, size, single=single, n_questions=0)
    return [ds[i] for i in range(n)]


def _pixels(items: list[dict[str, Any]]) -> torch.Tensor:
    return ImageProcessor().normalize(torch.from_numpy(np.stack([x["image"] for x in items])), channels_last=True)


@torch.no_grad()
def _embed(model, tok, items: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    ctx = model.config.text.context_length
    img = torch.cat([image_embeddings(model, [_pixels(items[i:i + 256])]) for i in range(0, len(items), 256)])
    txt = F.normalize(model.encode_text(tok([x["caption"] for x in items], context_length=ctx)).float(), dim=-1)
    return img, txt


def similarity(model, tok, out: Path, lines: list[str]) -> None:
    items = _images("val", 8, 11, model.config.vision.image_size, single=False)
    img, txt = _embed(model, tok, items)
    sims = (txt @ img.t()).numpy()
    plot_similarity(np.stack([x["image"] for x in items]), [x["caption"] for x in items], sims,
                    out / "clip_similarity.png")
    loss = clip_loss(img, txt, model.logit_scale).item()
    diag = float(np.mean(np.diag(sims)))
    off = float((sims.sum() - np.trace(sims)) / (sims.size - len(sims)))
    lines += ["## A real batch", "",
              f"8 validation images and their own captions: mean cosine of matching pairs **{diag:.3f}**, "
              f"of the 56 non-matching pairs **{off:.3f}**; learned 1/T = {model.logit_scale.exp().item():.1f}; "
              f"contrastive loss on this batch **{loss:.3f}** (chance: ln 8 = {np.log(8):.3f}).", ""]


def temperature(model, tok, run: Path | None, out: Path, lines: list[str], batch: int = 128) -> None:
    items = _images("val", batch, 12, model.config.vision.image_size, single=False)
    img, txt = _embed(model, tok, items)
    scales = np.geomspace(1, 100, 25)
    losses = [clip_loss(img, txt, torch.tensor(float(np.log(s)))).item() for s in scales]
    learned = model.logit_scale.exp().item()
    plt = pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    train, _ = read_metrics(run) if run is not None else ([], [])
    pts = [(r["step"], r["logit_scale"]) for r in train if "logit_scale" in r]
    if pts:
        ax[0].plot(*zip(*pts))
    ax[0].set(xlabel="training step", ylabel="1/T = exp(logit_scale)", title="learned inverse temperature")
    ax[1].semilogx(scales, losses, marker=".")
    ax[1].axvline(learned, color="k", ls="--", label=f"learned 1/T = {learned:.0f}")
    ax[1].set(xlabel="1/T", ylabel="contrastive loss", title=f"loss of one batch of {batch} vs 1/T")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "clip_temperature.png", dpi=80)
    plt.close(fig)
    best = scales[int(np.argmin(losses))]
    lines += ["## Temperature", "",
              f"Loss of one batch of {batch} at 1/T = 1: {losses[0]:.3f} (ln {batch} = {np.log(batch):.3f}); at the learned "
              f"{learned:.1f}: {clip_loss(img, txt, model.logit_scale).item():.3f}; lowest on the grid at 1/T ≈ "
              f"{best:.0f}: {min(losses):.3f}.", ""]


def in_batch_accuracy(model, tok, lines: list[str], sizes: tuple[int, ...] = (2, 8, 32, 128, 512)) -> None:
    items = _images("val", max(sizes), 13, model.config.vision.image_size, single=False)
    img, txt = _embed(model, tok, items)
    lines += ["## The task gets harder as the batch grows", "",
              "Each image must pick its own caption among the B captions of its batch (validation batches, "
              "averaged over the batches that fit in 512 images):", "",
              "| batch size B | chance 1/B | image→text top-1 | loss | ln B |", "|---|---|---|---|---|"]
    for b in sizes:
        accs, losses = [], []
        for s in range(0, max(sizes), b):
            i, t = img[s:s + b], txt[s:s + b]
            accs.append(((i @ t.t()).argmax(-1) == torch.arange(len(i))).float().mean().item())
            losses.append(clip_loss(i, t, model.logit_scale).item())
        lines.append(f"| {b} | {1 / b:.3f} | {np.mean(accs):.3f} | {np.mean(losses):.3f} | {np.log(b):.2f} |")
    lines.append("")


def prompt_ensembles(model, tok, lines: list[str], n: int) -> None:
    size = model.config.vision.image_size
    lines += ["## Zero-shot: single prompts vs the ensemble", "",
              f"64-way zero-shot top-1 on {n} single-object images (`eval/zeroshot.py` `text_classifier` averages the "
              "normalised text embeddings of every template per class):", "",
              "| templates | seen pairs | held-out (novel) pairs |", "|---|---|---|"]
    sets = []
    for split in ("val", "novel"):
        items = _images(split, n, 0, size, single=True)
        sets.append((_embed(model, tok, items)[0], torch.tensor([x["label"] for x in items])))
    rows = [(f"`{t}`", (t,)) for t in TEMPLATES + EXTRA_TEMPLATES]
    rows += [("ensemble of the 3 training templates", TEMPLATES),
             ("ensemble of all 6", TEMPLATES + EXTRA_TEMPLATES)]
    for name, templates in rows:
        classifier = text_classifier(model, tok, CLASS_NAMES, templates)  # (64, E)
        accs = [classification_metrics(img @ classifier.t(), labels, CLASS_NAMES, with_confusion=False)["top1"]
                for img, labels in sets]
        lines.append(f"| {name} | {accs[0]:.3f} | {accs[1]:.3f} |")
    lines.append("")


def retrieval_figure(model, tok, out: Path, queries: tuple[str, ...], n: int = 300) -> None:
    items = _images("val", n, 14, model.config.vision.image_size, single=False)
    img, _ = _embed(model, tok, items)
    ctx = model.config.text.context_length
    with torch.no_grad():
        q = F.normalize(model.encode_text(tok(list(queries), context_length=ctx)).float(), dim=-1)
    top = (q @ img.t()).topk(4, dim=-1)
    plt = pyplot()
    fig, axes = plt.subplots(len(queries), 4, figsize=(6, 1.6 * len(queries)))
    for r, query in enumerate(queries):
        for c in range(4):
            ax = axes[r][c]
            ax.imshow(items[int(top.indices[r, c])]["image"])
            ax.set_title(f"{top.values[r, c]:.2f}", fontsize=7)
            ax.axis("off")
        axes[r][0].text(-8, 32, query, ha="right", va="center", fontsize=8)
    fig.subplots_adjust(left=0.4, wspace=0.05, hspace=0.3)
    fig.savefig(out / "clip_retrieval.png", dpi=80)
    plt.close(fig)


def batch_size_runs(recipe: str, sizes: list[int], images: int, micro: int, runs: Path, out: Path,
                    eval_size: int, tokenizer: list[str]) -> None:
    """Train the recipe at each batch size on the same number of images, each with feature caching in micro-batches
    of `micro` (so all fit the memory of a `micro`-image batch); tabulate the final evaluation."""
    from mmlm.train.clip_run import train_clip
    from mmlm.train.recipes import load_recipe

    lines = [f"Same recipe, same {images:,} training images seen, embedded {micro} at a time (feature caching: "
             "`train.micro_batch`); lr warmup 10% of the steps then cosine.", "",
             "| batch size | steps | zero-shot seen | zero-shot novel | i2t R@1 | t2i R@1 | train s |",
             "|---|---|---|---|---|---|---|"]
    for b in sizes:
        steps = max(1, images // b)
        run = runs / f"batch-{b}"
        done = run / "guide_summary.json"
        if not done.is_file():
            cfg = load_recipe("clip", recipe, [*tokenizer, f"train.batch_size={b}", f"train.steps={steps}", f"train.micro_batch={micro}",
                                       f"train.warmup_steps={max(1, steps // 10)}", "train.eval_every=0",
                                       "train.ckpt_every=0", f"data.eval_size={eval_size}", "train.progress=false",
                                       "train.num_workers=0"])
            import time

            start = time.perf_counter()
            summary = train_clip(cfg, run, resume=False)
            summary["seconds"] = time.perf_counter() - start
            done.write_text(json.dumps(summary))
        s = json.loads(done.read_text())
        e = s["eval"]
        lines.append(f"| {b} | {s['step']} | {e['zeroshot_seen']['top1']:.3f} | {e['zeroshot_novel']['top1']:.3f} | "
                     f"{e['retrieval_val']['i2t_R@1']:.3f} | {e['retrieval_val']['t2i_R@1']:.3f} | "
                     f"{s['seconds']:.0f} |")
    (out / "clip_batch_size.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="figures and tables of docs/02-clip.md")
    p.add_argument("--model", required=True, help="a trained shapes CLIP (a run's final/ directory)")
    p.add_argument("--out", default="docs/figures")
    p.add_argument("--zeroshot-images", type=int, default=1000)
    p.add_argument("--batch-sizes", default="", help="e.g. 16,64,256: also run the batch-size experiment")
    p.add_argument("--images", type=int, default=12288, help="batch-size experiment: training images per run")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--recipe", default="configs/clip-shapes.yaml")
    p.add_argument("--runs", default="runs/guide-batch-size")
    p.add_argument("--eval-size", type=int, default=500)
    p.add_argument("--quick", action="store_true", help="small batches and image sets (the docs test)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = mmlm.load(args.model), mmlm.load_tokenizer(args.model)
    run = Path(args.model).parent if (Path(args.model).parent / "metrics.jsonl").is_file() else None
    lines = [f"# CLIP chapter figures (`python scripts/guide_clip.py --model {args.model}`)", ""]
    similarity(model, tok, out, lines)
    temperature(model, tok, run, out, lines, batch=16 if args.quick else 128)
    in_batch_accuracy(model, tok, lines, sizes=(2, 8) if args.quick else (2, 8, 32, 128, 512))
    prompt_ensembles(model, tok, lines, 16 if args.quick else args.zeroshot_images)
    retrieval_figure(model, tok, out, ("a red star.", "three objects.", "a large blue square in the top left."),
                     n=16 if args.quick else 300)
    (out / "clip.md").write_text("\n".join(lines))
    print("\n".join(lines))
    if args.batch_sizes:
        # every run tokenizes as the trained model does (the recipe's BPE, fitted once)
        tokenizer = ["tokenizer.kind=file", f"tokenizer.path={Path(args.model) / 'tokenizer.json'}"]
        batch_size_runs(args.recipe, [int(b) for b in args.batch_sizes.split(",")], args.images, args.micro_batch,
                        Path(args.runs), out, args.eval_size, tokenizer)


if __name__ == "__main__":
    main()
