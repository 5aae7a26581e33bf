#!/usr/bin/env python3
"""CLIP train step and image/text embedding: mmlm vs open_clip, A/B in one process.

open_clip needs torchvision, which does not install beside the project's torch, so this runs from the
open_clip venv (see scripts/openclip_reference.py for how it is made), importing mmlm from src/:

    .venv-openclip/bin/python benchmarks/bench_openclip.py [--quick] [--threads 1] [--batch 64]

Both libraries run the same random "bench-vit" weights (open_clip's state dict converted by mmlm's own
converter) with the same optimiser (fused AdamW), loss (CLIP's symmetric cross-entropy) and precision (fp32;
bf16 autocast). Prints JSON lines like `mmlm bench clip`. CI never runs it (it needs that venv).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mmlm.bench_common import rates, time_ab  # noqa: E402
from mmlm.bench_models import (EMBED_CALLS, clip_batch, count_flops, matmul_peak, precision_context,  # noqa: E402
                                repeated)

OPEN_CLIP_CFG = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 256, "patch_size": 16, "head_width": 64},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4},
}


def pair(seed: int = 0):
    import open_clip

    from mmlm.checkpoint import build_model, load_state_dict_strict
    from mmlm.convert.openai_clip import config_from_open_clip, state_dict_from_openai

    torch.manual_seed(seed)
    theirs = open_clip.CLIP(**copy.deepcopy(OPEN_CLIP_CFG)).eval()
    cfg = config_from_open_clip(copy.deepcopy(OPEN_CLIP_CFG))
    ours = build_model(cfg)
    load_state_dict_strict(ours, state_dict_from_openai(theirs.state_dict(), cfg, "open_clip"), "open_clip")
    return ours.eval(), theirs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 5
    emit = lambda row: print(json.dumps({**row, "model": "bench-vit", "batch": args.batch,  # noqa: E731
                                         "threads": torch.get_num_threads(), "torch": torch.__version__}), flush=True)
    from mmlm.train.feature_cache import contrastive_step
    from mmlm.train.objectives import contrastive_loss

    ours0, theirs0 = pair()
    pixels, ids = clip_batch(args.batch)
    with torch.inference_mode():
        emit({"bench": "clip_parity", "vs": "open_clip",
              "image_max_abs_diff": (ours0.encode_image(pixels) - theirs0.encode_image(pixels)).abs().max().item(),
              "text_max_abs_diff": (ours0.encode_text(ids) - theirs0.encode_text(ids)).abs().max().item()})

    for precision in ("fp32", "bf16"):
        ours, theirs = copy.deepcopy(ours0).train(), copy.deepcopy(theirs0).train()
        # the same fused AdamW kernel for both (as `mmlm bench clip` gives mmlm and transformers' Trainer): the step
        # then measures the models and the loss; open_clip's own training loop uses the slower foreach AdamW
        opt_o = torch.optim.AdamW(ours.parameters(), lr=1e-5, fused=True)
        opt_t = torch.optim.AdamW(theirs.parameters(), lr=1e-5, fused=True)

        def step_ours():
            contrastive_step(ours, pixels, ids, lambda i, t: contrastive_loss("clip", i, t, ours.logit_scale),
                             autocast=lambda: precision_context(precision))
            opt_o.step()
            opt_o.zero_grad(set_to_none=True)

        def step_theirs():
            with precision_context(precision):
                img, txt, scale = theirs(pixels, ids)  # normalised features, logit_scale.exp()
                logits = scale * img @ txt.t()
                labels = torch.arange(len(img))
                loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
            loss.backward()
            opt_t.step()
            opt_t.zero_grad(set_to_none=True)

        peak = matmul_peak(torch.bfloat16 if precision == "bf16" else torch.float32)
        flops = count_flops(step_ours)
        times = time_ab({"mmlm": step_ours, "open_clip": step_theirs}, repeats)
        med = {}
        for lib, secs in times.items():
            r = rates(args.batch, secs)
            med[lib] = r["per_s_median"]
            emit({"bench": "clip_train", "precision": precision, "library": lib, "unit": "images/s", **r,
                  "mfu": round(flops / (args.batch / r["per_s_median"]) / peak, 3)})
        emit({"bench": "clip_train", "precision": precision, "library": "mmlm/open_clip",
              "ratio": round(med["mmlm"] / med["open_clip"], 2), "target": 1.5, "met": med["mmlm"] / med["open_clip"] >= 1.5})

    for precision in ("fp32", "bf16"):
        for what, ours_fn, theirs_fn in (
            ("image_embed", lambda: ours0.encode_image(pixels), lambda: theirs0.encode_image(pixels)),
            ("text_embed", lambda: ours0.encode_text(ids), lambda: theirs0.encode_text(ids)),
        ):
            with torch.inference_mode():
                times = time_ab({"mmlm": repeated(ours_fn, precision), "open_clip": repeated(theirs_fn, precision)},
                                repeats)
            med = {lib: rates(args.batch * EMBED_CALLS, secs)["per_s_median"] for lib, secs in times.items()}
            for lib, secs in times.items():
                emit({"bench": what, "precision": precision, "library": lib, "unit": "items/s",
                      **rates(args.batch * EMBED_CALLS, secs)})
            emit({"bench": what, "precision": precision, "library": "mmlm/open_clip",
                  "ratio": round(med["mmlm"] / med["open_clip"], 2)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
