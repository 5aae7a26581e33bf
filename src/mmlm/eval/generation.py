"""`mmlm eval generation`: how well a text-to-image model draws held-out shapes scenes, judged by a CLIP.

    scenes (val: seen colour-shape pairs; novel: held-out pairs) x (one, two, three objects)
        -> prompt = the scene's full description -> generate_image -> images
    the judge, zero-shot per attribute (colour, shape, position, count): correct when its top choice among
        the attribute's values is one the prompt asked for (for count: the number of objects); the same judge on
        the rendered (real) images of the same scenes is the ceiling beside each share
    colour and shape are read from the judge's own zero-shot classes, every "colour shape" pair in its training
        templates: a colour scores its best pair over the shapes, a shape its best pair over the colours (a
        bare "a hexagon." is a phrase its captions never use, and reads far fewer shapes right:
        scripts/judge_ceiling.py compares the two)
    a latent model: the judge on the rendered images through its autoencoder too (a latent generator's ceiling)
    Frechet distance between the judge's image features of generated and real (rendered) images of the same
        scenes, beside the floor: real against real images of other scenes (what the metric reads for a perfect
        generator with this many images)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..data.shapes import (CLASS_NAMES, COLOURS, POSITIONS, SHAPES, TEMPLATES, describe, position_phrase, render,
                           sample_scene)

GROUPS = [(split, n) for split in ("val", "novel") for n in (1, 2, 3)]
COUNT_WORDS = ("one", "two", "three")
ATTRIBUTES = {  # attribute -> (its values, the judge's template; none: read from the colour-shape pairs)
    "colour": (COLOURS, None),
    "shape": (SHAPES, None),
    "position": (tuple(position_phrase(p) for p in POSITIONS), "a shape {}."),
    "count": (tuple(f"{w} object{'s' if w != 'one' else ''}" for w in COUNT_WORDS), "{} on a dark background."),
}


def scenes(split: str, n_objects: int, count: int, seed: int) -> list[Any]:
    """`count` scenes of `split` with exactly `n_objects` objects, deterministic from `seed`."""
    rng = np.random.default_rng([seed, ("val", "novel").index(split), n_objects])
    found = []
    while len(found) < count:
        scene = sample_scene(rng, split, max_objects=3)
        if len(scene.objects) == n_objects:
            found.append(scene)
    return found


def wanted(scene: Any, attribute: str) -> set[int]:
    """Indices of the attribute's values that the scene's prompt asks for."""
    if attribute == "count":
        return {len(scene.objects) - 1}
    if attribute == "position":
        return {POSITIONS.index(o.position) for o in scene.objects}
    values = COLOURS if attribute == "colour" else SHAPES
    return {values.index(getattr(o, attribute)) for o in scene.objects}


def judge_attributes(features: torch.Tensor, pairs: torch.Tensor, classifiers: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """(B, E) normalised image features -> the judge's top value index per attribute and image.

    pairs (C*S, E): the classifier of every CLASS_NAMES pair (row = colour * S + shape); classifiers: the others'."""
    by_pair = (features @ pairs.T).view(len(features), len(COLOURS), len(SHAPES))  # (B, C, S) cosine similarities
    tops = {"colour": by_pair.amax(2).argmax(-1), "shape": by_pair.amax(1).argmax(-1)}
    tops.update({name: (features @ weights.T).argmax(-1) for name, weights in classifiers.items()})
    return {name: tops[name].tolist() for name in ATTRIBUTES if name in tops}


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^1/2) of two (N, D) feature sets (FID's formula), in float64.

    tr (C_a C_b)^1/2 = sum of sqrt(eigenvalues of C_a^1/2 C_b C_a^1/2), a symmetric matrix: no complex roots."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(cov_a)
    root_a = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def _grid(images: Sequence[np.ndarray], prompts: Sequence[str], out: Path, cell: int = 128) -> Path:
    """One row per image: the image (scaled up, pixels kept sharp) and its prompt."""
    from PIL import Image, ImageDraw

    width = cell * 5
    grid = Image.new("RGB", (width, cell * len(images)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        grid.paste(Image.fromarray(image).resize((cell, cell), Image.NEAREST), (0, i * cell))
        words, lines = prompt.split(), [""]
        for w in words:  # wrap at about 60 characters
            lines[-1:] = [f"{lines[-1]} {w}".strip()] if len(lines[-1]) + len(w) < 60 else [lines[-1], w]
        draw.multiline_text((cell + 8, i * cell + 8), "\n".join(lines), fill="black")
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    return out


@torch.no_grad()
def autoencode(vae: Any, images: Sequence[np.ndarray], seed: int) -> torch.Tensor:
    """(H, W, 3) uint8 images -> the same through an autoencoder (encode, a draw, decode): (B, 3, H, W) in [0, 1]."""
    p = next(vae.parameters())
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(p.device, p.dtype) / 127.5 - 1  # [-1, 1]
    mean, logvar = vae.encode(x)
    x_hat = vae.decode(vae.sample(mean, logvar, torch.Generator(p.device).manual_seed(seed)))
    return (x_hat / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def eval_generation(model: str | Path, judge: str | Path, per_group: int = 8, steps: int = 50,
                    guidance: float | None = None, seed: int = 0, out: str | Path | None = None, dtype: Any = None,
                    device: Any = None) -> dict[str, Any]:
    """Generate for held-out scene prompts and judge them (see the module docstring); writes
    `generation.json` and `generation_grid.png` under `out` (default: the model's run directory)."""
    from ..formats import load
    from ..image_generation import generate_image, to_uint8
    from .cli import array_batches, open_model
    from .zeroshot import image_embeddings, text_classifier

    if per_group < 2:
        raise ValueError(f"per_group must be at least 2 (a Frechet distance needs 2 images per set), got {per_group}")
    pipe = load(model, dtype=dtype, device=device)
    if not hasattr(pipe, "unet"):
        raise ValueError(f"--model {model} is not a text-to-image model")
    if guidance is None:
        guidance = pipe.config.guidance  # the model's own scale
    clip, tokenizer, processor = open_model(judge, dtype=dtype, device=device)
    if not hasattr(clip, "encode_image") or not hasattr(clip, "encode_text"):
        raise ValueError(f"--judge {judge} is not a CLIP model")
    pairs = text_classifier(clip, tokenizer, CLASS_NAMES, TEMPLATES)
    classifiers = {name: text_classifier(clip, tokenizer, values, [template])
                   for name, (values, template) in ATTRIBUTES.items() if template is not None}
    real_size = max(24, pipe.config.image_size)  # the renderer's smallest size; the judge resizes both
    groups, generated, real, grid_images, grid_prompts = {}, [], [], [], []
    for g, (split, n) in enumerate(GROUPS):
        group = scenes(split, n, per_group, seed)
        prompts = [describe(s) for s in group]
        images = to_uint8(generate_image(pipe, prompts, steps=steps, guidance=guidance, seed=seed + g))
        feats = image_embeddings(clip, array_batches(list(images), processor))
        rendered = [render(s, real_size) for s in group]
        real_feats = image_embeddings(clip, array_batches(rendered, processor))

        def judged(f: torch.Tensor) -> dict[str, float]:
            tops = judge_attributes(f, pairs, classifiers)
            return {name: float(np.mean([t in wanted(s, name) for t, s in zip(top, group)]))
                    for name, top in tops.items()}

        # the judge on the rendered images of the same scenes: the most a perfect generator could score
        groups[f"{split}-{n}"] = {"prompts": len(group), **judged(feats), "real": judged(real_feats)}
        if pipe.vae is not None:  # the rendered scenes through the autoencoder: what a perfect latent generator scores
            recon = to_uint8(autoencode(pipe.vae, rendered, seed + g))
            groups[f"{split}-{n}"]["autoencoded"] = judged(image_embeddings(clip, array_batches(list(recon), processor)))
        generated.append(feats)
        real.append(real_feats)
        grid_images += list(images[:2])
        grid_prompts += prompts[:2]
    other = [s for split, n in GROUPS for s in scenes(split, n, per_group, seed + 1)]  # other scenes, real
    floor_feats = image_embeddings(clip, array_batches([render(s, real_size) for s in other], processor))
    generated_all, real_all = torch.cat(generated), torch.cat(real)
    result = {
        "images": len(generated_all), "steps": steps, "guidance": guidance, "seed": seed,
        "attributes": {name: float(np.mean([v[name] for v in groups.values()])) for name in ATTRIBUTES},
        "real_attributes": {name: float(np.mean([v["real"][name] for v in groups.values()])) for name in ATTRIBUTES},
        **({"autoencoded_attributes": {name: float(np.mean([v["autoencoded"][name] for v in groups.values()]))
                                       for name in ATTRIBUTES}} if pipe.vae is not None else {}),
        "groups": groups,
        "frechet": frechet_distance(generated_all, real_all),
        "frechet_real_floor": frechet_distance(floor_feats, real_all),
    }
    model_path = Path(model)
    out = Path(out) if out is not None else (model_path.parent if model_path.name == "final" else model_path)
    result["grid"] = str(_grid(grid_images, grid_prompts, out / "generation_grid.png"))
    import json

    (out / "generation.json").write_text(json.dumps(result, indent=1))
    return result
