"""The data-shapes chapter's figure (docs/01-data-shapes.md): one sample of each modality, as mmlm makes it.

    python scripts/guide_data_shapes.py --out docs/figures     # -> data_shapes.png
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import numpy as np

from mmlm.data.modalities import TABLE_COLUMNS, log_mel_spectrogram, moving_shapes_video, scene_table, tone
from mmlm.data.shapes import ShapesDataset
from mmlm.report import pyplot


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs/figures")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    shapes = ShapesDataset("val", 6, seed=0, image_size=64, n_questions=0)
    item = shapes[0]
    spec = log_mel_spectrogram(tone((440.0,), seconds=1.0, sweep_to=4000.0))  # (T, F)
    video = moving_shapes_video(n_frames=6, image_size=64, seed=1)  # (T, H, W, 3)
    table = scene_table([shapes[i]["scene"] for i in range(6)]).numpy()  # (N, F)

    plt = pyplot()
    fig = plt.figure(figsize=(12, 5.2))
    grid = fig.add_gridspec(2, 6, height_ratios=[1.2, 1])
    ax = fig.add_subplot(grid[0, 0])
    ax.imshow(item["image"])
    ax.set_title("image (C, H, W) = (3, 64, 64)\n" + textwrap.fill(repr(item["caption"]), 34), fontsize=7)
    ax.axis("off")
    ax = fig.add_subplot(grid[0, 1:4])
    ax.imshow(spec.T.numpy(), origin="lower", aspect="auto", cmap="magma")
    ax.set(xlabel="time frame (10 ms)", ylabel="mel band")
    ax.set_title(f"audio: log-mel spectrogram (T, F) = {tuple(spec.shape)}\n440 Hz tone + a sweep 440 → 4000 Hz",
                 fontsize=8)
    ax = fig.add_subplot(grid[0, 4:6])
    ax.imshow(table, aspect="auto", cmap="Blues")
    ax.set_xticks(range(len(TABLE_COLUMNS)), TABLE_COLUMNS, rotation=30, fontsize=6, ha="right")
    ax.set_ylabel("scene")
    for (r, c), v in np.ndenumerate(table):
        ax.text(c, r, f"{v:.3g}", ha="center", va="center", fontsize=6)
    ax.set_title(f"table (N, F) = {table.shape}", fontsize=8)
    for t in range(video.shape[0]):
        ax = fig.add_subplot(grid[1, t])
        ax.imshow(video[t])
        ax.set_title(f"frame t={t}", fontsize=8)
        ax.axis("off")
    fig.text(0.5, 0.02, f"video (T, C, H, W) = ({video.shape[0]}, 3, 64, 64): moving shapes", ha="center", fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path = out / "data_shapes.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    print(path)
    return path


if __name__ == "__main__":
    main()
