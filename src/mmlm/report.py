"""A run's report: plots of its metrics and a CLIP similarity matrix, linked from report.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def pyplot():
    """matplotlib.pyplot, imported on first use and drawing to files only (the Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def read_metrics(run: Path) -> tuple[list[dict], list[dict]]:
    train, evals = [], []
    path = run / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            (evals if "eval" in rec else train).append(rec)
    return train, evals


def plot_training(run: Path, out: Path) -> list[str]:
    plt = pyplot()
    train, evals = read_metrics(run)
    files = []
    if train:
        steps = [r["step"] for r in train if "loss" in r]
        scale = any("logit_scale" in r for r in train)  # a contrastive run's temperature beside its loss
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.5)) if scale else plt.subplots(1, 1, figsize=(6, 3.5), squeeze=False)
        ax = ax.flat
        ax[0].plot(steps, [r["loss"] for r in train if "loss" in r])
        ax[0].set(xlabel="step", ylabel="loss", title="training loss")
        if scale:
            ax[1].plot(steps, [r.get("logit_scale", np.nan) for r in train if "loss" in r])
            ax[1].set(xlabel="step", ylabel="exp(logit_scale)", title="temperature$^{-1}$")
        fig.tight_layout()
        fig.savefig(out / "loss.png", dpi=100)
        plt.close(fig)
        files.append("loss.png")
    series: dict[str, list[tuple[int, float]]] = {}
    for r in evals:
        for suite, metrics in r["eval"].items():
            if isinstance(metrics, (int, float)):  # a single accuracy (LLaVA's VQA)
                series.setdefault(suite, []).append((r["step"], metrics))
                continue
            for k, v in metrics.items():
                if k in ("top1", "i2t_R@1", "t2i_R@1"):
                    series.setdefault(f"{suite} {k}", []).append((r["step"], v))
    if series:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, pts in series.items():
            ax.plot(*zip(*pts), marker="o", label=name)
        ax.set(xlabel="step", ylabel="accuracy / recall", ylim=(0, 1.02), title="evaluation")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "eval.png", dpi=100)
        plt.close(fig)
        files.append("eval.png")
    return files


def plot_similarity(images: np.ndarray, captions: Sequence[str], sims: np.ndarray, path: Path) -> None:
    """The CLIP paper's figure: images across the top, captions down the side, cosine similarities in cells."""
    plt = pyplot()
    rows, cols = sims.shape
    cell, left, pad = 0.8, 3.4, 0.2  # inches
    width, height = left + cols * cell + pad, (rows + 1) * cell + 2 * pad
    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes([left / width, pad / height, cols * cell / width, rows * cell / height])
    ax.imshow(sims, vmin=sims.min(), vmax=sims.max(), cmap="viridis", aspect="auto")
    for i in range(rows):
        for j in range(cols):
            ax.text(j, i, f"{sims[i, j]:.2f}", ha="center", va="center", fontsize=8, color="white")
    ax.set_yticks(range(rows), [c if len(c) <= 48 else c[:47] + "…" for c in captions], fontsize=8)
    ax.set_xticks([])
    for j, im in enumerate(images):
        iax = fig.add_axes([(left + j * cell) / width, (pad + rows * cell + 0.05) / height, cell / width, (cell - 0.1) / height])
        iax.imshow(im)
        iax.axis("off")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(confusion: Sequence[Sequence[int]], class_names: Sequence[str], path: Path, title: str) -> None:
    plt = pyplot()
    c = np.asarray(confusion, dtype=float)
    c = c / np.maximum(c.sum(axis=1, keepdims=True), 1)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(2 + 0.14 * n, 2 + 0.14 * n))
    ax.imshow(c, cmap="Blues", vmin=0, vmax=1)
    small = n > 20
    ax.set_xticks(range(n), class_names, rotation=90, fontsize=4 if small else 7)
    ax.set_yticks(range(n), class_names, fontsize=4 if small else 7)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(run: Path, title: str, summary: dict[str, Any], figures: list[tuple[str, str]],
                 notes: Sequence[str] = ()) -> Path:
    """report.md: the final numbers as a table, then each figure with its caption."""
    lines = [f"# {title}", ""]
    lines += list(notes) + [""] if notes else []
    lines += ["| evaluation | metric | value |", "|---|---|---|"]
    for suite, metrics in summary.get("eval", {}).items():
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                lines.append(f"| {suite} | {k} | {v:.4f} |" if isinstance(v, float) else f"| {suite} | {k} | {v} |")
    lines.append("")
    for caption, file in figures:
        lines += [f"## {caption}", "", f"![{caption}]({file})", ""]
    path = run / "report.md"
    path.write_text("\n".join(lines))
    return path
