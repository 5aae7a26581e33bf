"""What the generation judge can read: a CLIP's zero-shot colour and shape on rendered held-out one-object scenes,
asked with bare attribute prompts ("a red shape.", "a hexagon.") and with its own zero-shot classes (every colour-shape
pair in its training templates, what `mmlm eval generation` asks), and, with --vae, on the same scenes through an
autoencoder (encode, a draw, decode): the most a generator judged by this CLIP can score.

    python scripts/judge_ceiling.py --judge runs/clip-shapes/final [--size 64] [--vae runs/vae-shapes/final]

Prints one table (seen and novel pairs, colour / shape per reading) and, for the autoencoded scenes, the shape read
per shape."""

import argparse

import numpy as np

import mmlm
from mmlm.data.shapes import CLASS_NAMES, COLOURS, SHAPES, TEMPLATES, render
from mmlm.eval.cli import array_batches, open_model
from mmlm.eval.generation import autoencode, judge_attributes, scenes, wanted
from mmlm.eval.zeroshot import image_embeddings, text_classifier
from mmlm.image_generation import to_uint8

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--judge", required=True)
ap.add_argument("--size", type=int, default=64, help="rendered image size")
ap.add_argument("--vae", default=None, help="an autoencoder (mmlm train vae's run, a diffusers AutoencoderKL folder)")
ap.add_argument("--per-group", type=int, default=96, help="one-object scenes per split")
ap.add_argument("--seed", type=int, default=0)
args = ap.parse_args()

clip, tokenizer, processor = open_model(args.judge)
pairs = text_classifier(clip, tokenizer, CLASS_NAMES, TEMPLATES)
bare = {"colour": text_classifier(clip, tokenizer, COLOURS, ["a {} shape."]),
        "shape": text_classifier(clip, tokenizer, SHAPES, ["a {}."])}
vae = mmlm.load(args.vae).float().eval() if args.vae else None

print(f"| {args.size} px, {args.per_group} one-object scenes per split | seen pairs: colour / shape (bare prompts) "
      "| colour / shape (colour-shape pairs) | novel pairs: colour / shape (bare) | colour / shape (pairs) |")
print("|---|---|---|---|---|")
rows, per_shape = {"rendered": [], "autoencoded": []}, {}
for split in ("val", "novel"):
    group = scenes(split, 1, args.per_group, args.seed)
    images = {"rendered": [render(s, args.size) for s in group]}
    if vae is not None:
        images["autoencoded"] = list(to_uint8(autoencode(vae, images["rendered"], args.seed)))
    for name, imgs in images.items():
        f = image_embeddings(clip, array_batches(imgs, processor))
        by_pairs = judge_attributes(f, pairs, {})
        by_bare = {a: (f @ w.T).argmax(-1).tolist() for a, w in bare.items()}
        score = lambda tops, a: np.mean([t in wanted(s, a) for t, s in zip(tops[a], group)])  # noqa: E731
        rows[name].append(f"{score(by_bare, 'colour'):.1%} / {score(by_bare, 'shape'):.1%} | "
                          f"{score(by_pairs, 'colour'):.1%} / {score(by_pairs, 'shape'):.1%}")
        if name == "autoencoded":
            for top, s in zip(by_pairs["shape"], group):
                per_shape.setdefault(s.objects[0].shape, []).append(top in wanted(s, "shape"))
for name, cells in rows.items():
    if cells:
        print(f"| {name} | " + " | ".join(cells) + " |")
if per_shape:
    print("\nautoencoded, shape read (pairs), per shape: " + ", ".join(
        f"{k} {np.mean(v):.0%} of {len(v)}" for k, v in sorted(per_shape.items())))
