"""Does a text-to-image run use its prompt? The denoising loss with the true caption, with another scene's caption
(shuffled) and with the empty prompt, per band of timesteps, on 128 rendered held-out scenes (half one object).

    python scripts/diffusion_text_gap.py runs/diffusion-pooled/final

A UNet that ignores the text scores the three alike; the gap between "true" and "shuffled" is what the prompt is
worth to it at each noise level."""

import sys

import numpy as np
import torch
import torch.nn.functional as F

import mmlm
from mmlm.data.shapes import describe, render, sample_scene
from mmlm.schedulers import add_noise, training_target

torch.manual_seed(0)
pipe = mmlm.load(sys.argv[1]).float().eval()
rng = np.random.default_rng(123)
scenes = [sample_scene(rng, "val", single=(i % 2 == 0)) for i in range(128)]
x0 = torch.tensor(np.stack([render(s, 32, np.random.default_rng(i)) for i, s in enumerate(scenes)])).permute(0, 3, 1, 2).float() / 127.5 - 1
caps = [describe(s) for s in scenes]
tok = pipe.tokenizer; L = min(tok.context_length, pipe.config.text.context_length)
with torch.no_grad():
    ctx = pipe.encode_prompt(tok(caps, context_length=L))
    empty = pipe.encode_prompt(tok([""] * len(caps), context_length=L))
    sched = pipe.config.scheduler
    g = torch.Generator().manual_seed(0)
    for lo, hi in [(0, 100), (100, 300), (300, 600), (600, 850), (850, 1000)]:
        t = torch.randint(lo, hi, (len(caps),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        xt = add_noise(sched, x0, noise, t); target = training_target(sched, x0, noise, t)
        r = {}
        for name, c in [("true", ctx), ("shuffled", ctx.roll(1, 0)), ("empty", empty)]:
            r[name] = F.mse_loss(pipe.unet(xt, t, c), target).item()
        print(f"t {lo:4d}-{hi:4d}: " + "  ".join(f"{k} {v:.4f}" for k, v in r.items()), flush=True)
